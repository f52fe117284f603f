"""The ``results.json`` contract: what a run reports, assembled in one place.

Fields: the config and seed, the stream (``benchmark``, ``scenario``, ``tasks``), the accuracy matrix ``R[i][j]``
(primary metric of task j after training experience i), the single-task baselines and final scores (primary, plus
``extra`` secondary metrics such as mAP50), the stream metrics computed from ``R`` (``clmtl.metrics.forgetting``:
forgetting in Avalanche's and Mammoth's definitions, BWT, FWT against the random-init scores, average accuracy),
the relative drop against each baseline, the model's size, timings and package versions.
"""
from __future__ import annotations

import dataclasses
import json
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from clmtl.config import Config
from clmtl.metrics.forgetting import average_accuracy, bwt, drop_vs_baseline, forgetting, forgetting_max, fwt
from clmtl.report.summary import summary_markdown
from clmtl.stream.benchmark import Benchmark

VERSIONED_PACKAGES = ("clmtl", "torch", "torchvision", "avalanche-lib", "ultralytics", "pycocotools", "numpy")

Scores = dict[str, dict[str, float]]
"""Every metric of each task, by task name."""


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def assemble_results(config: Config, strategy: str, benchmark: Benchmark, matrix: list[list[float | None]],
                     final_scores: Scores, baseline_scores: Scores, random_init: list[float | None],
                     model: torch.nn.Module, **measured: Any) -> Results:
    """The results of one run; ``measured`` are what it measured of itself, the ``Results`` fields from
    ``train_seconds`` to ``device_name`` (timings, the strategy's memory, threads, device), and a continued run's
    ``parent``."""
    tasks = benchmark.tasks
    names = [t.name for t in tasks]
    versions = package_versions()
    final = {t.name: final_scores[t.name][t.metric] for t in tasks}
    baseline = {t.name: baseline_scores[t.name][t.metric] for t in tasks if t.name in baseline_scores}

    def secondary(scores: Scores) -> Scores:  # baselines saved before a metric existed lack it
        return {t.name: {m: scores[t.name][m] for m in t.extra_metrics if m in scores[t.name]}
                for t in tasks if t.name in scores}

    return Results(
        clmtl_version=versions["clmtl"],
        config=config.to_dict(),
        seed=config.seed,
        benchmark=benchmark.name,
        strategy=strategy,
        scenario=benchmark.scenario,
        tasks=[t.as_dict() for t in tasks],
        matrix=matrix,
        random_init=dict(zip(names, random_init)),
        baseline=baseline,
        final=final,
        extra={"baseline": secondary(baseline_scores), "final": secondary(final_scores)},
        forgetting=dict(zip(names, forgetting(matrix))),
        forgetting_max=dict(zip(names, forgetting_max(matrix))),
        bwt=bwt(matrix),
        fwt=fwt(matrix, random_init),
        average_accuracy=average_accuracy(matrix),
        held_out=benchmark.held_out,
        drop_vs_baseline=drop_vs_baseline(final, baseline) if baseline else {},
        params=sum(p.numel() for p in model.parameters()),
        **measured,
        versions=versions,
    )


@dataclass(frozen=True)
class Results:
    """One run's results.json as an object: each field is the key of the same name (docs/metrics.md)."""

    clmtl_version: str
    config: dict[str, Any]
    seed: int
    benchmark: str
    strategy: str
    scenario: str
    tasks: list[dict[str, Any]]
    matrix: list[list[float | None]]
    """``matrix[i][j]``: task j's primary metric after training experience i."""
    random_init: dict[str, float | None]
    baseline: dict[str, float]
    final: dict[str, float]
    extra: dict[str, Any]
    forgetting: dict[str, float | None]
    forgetting_max: dict[str, float | None]
    bwt: float | None
    fwt: float | None
    average_accuracy: float | None
    held_out: dict[str, list[int]]
    """With ``data.holdout``: each task's training samples evaluated on instead of its validation data."""
    drop_vs_baseline: dict[str, float | None]
    params: int
    train_seconds: dict[str, float]
    baseline_train_seconds: dict[str, float]
    memory_bytes: int
    strategy_stats: dict[str, Any]
    total_seconds: float
    processes: int
    threads: dict[str, int | None]
    precision: str
    device: str
    device_name: str
    versions: dict[str, str]
    parent: dict[str, Any] | None = None
    """A continued run's parent: its folder (``run``), the SHA-256 of its results.json, how many of the stream's
    tasks are its (``tasks``), its strategy, and what the new strategy did not take over (``not_taken_over``)."""

    @classmethod
    def from_dict(cls, results: Mapping[str, Any]) -> Results:
        """From a results dict; keys a results.json of an earlier clmtl lacks (``fwt``, ``device``...) are None."""
        return cls(**{field.name: results.get(field.name) for field in dataclasses.fields(cls)})

    @classmethod
    def load(cls, path: str | Path) -> Results:
        """A run's results: its folder or its results.json."""
        path = Path(path)
        return cls.from_dict(json.loads((path / "results.json" if path.is_dir() else path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        """The results.json dict."""
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """The markdown tables ``clmtl run`` prints (and writes to summary.md)."""
        return summary_markdown(self.to_dict())

    def _repr_markdown_(self) -> str:  # a notebook shows the tables
        return self.summary()
