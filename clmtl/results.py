"""The ``results.json`` contract: what a run reports, assembled in one place.

Fields: the config and seed, the stream (``benchmark``, ``scenario``, ``tasks``), the accuracy matrix ``R[i][j]``
(primary metric of task j after training experience i), the single-task baselines and final scores (primary, plus
``extra`` secondary metrics such as mAP50), the stream metrics computed from ``R`` (``clmtl.metrics.forgetting``:
forgetting in Avalanche's and Mammoth's definitions, BWT, FWT against the random-init scores, average accuracy),
the relative drop against each baseline, the model's size, timings and package versions.
"""
from __future__ import annotations

import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from clmtl.benchmark import benchmark_name
from clmtl.config import Config
from clmtl.metrics.forgetting import average_accuracy, bwt, drop_vs_baseline, forgetting, forgetting_max, fwt
from clmtl.tasks import TaskSpec

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


def assemble_results(config: Config, strategy: str, tasks: Sequence[TaskSpec], matrix: list[list[float | None]],
                     final_scores: Scores, baseline_scores: Scores, random_init: list[float | None],
                     model: torch.nn.Module, measured: dict[str, Any]) -> dict:
    """The results dict of one run; ``measured`` holds timings and the strategy's memory."""
    names = [t.name for t in tasks]
    versions = package_versions()
    final = {t.name: final_scores[t.name][t.metric] for t in tasks}
    baseline = {t.name: baseline_scores[t.name][t.metric] for t in tasks if t.name in baseline_scores}

    def secondary(scores: Scores) -> Scores:
        return {t.name: {m: scores[t.name][m] for m in t.extra_metrics} for t in tasks if t.name in scores}

    return {
        "clmtl_version": versions["clmtl"],
        "config": config.to_dict(),
        "seed": config.seed,
        "benchmark": benchmark_name(config),
        "strategy": strategy,
        "scenario": config.scenario,
        "tasks": [t.as_dict() for t in tasks],
        "matrix": matrix,
        "random_init": dict(zip(names, random_init)),
        "baseline": baseline,
        "final": final,
        "extra": {"baseline": secondary(baseline_scores), "final": secondary(final_scores)},
        "forgetting": dict(zip(names, forgetting(matrix))),
        "forgetting_max": dict(zip(names, forgetting_max(matrix))),
        "bwt": bwt(matrix),
        "fwt": fwt(matrix, random_init),
        "average_accuracy": average_accuracy(matrix),
        "drop_vs_baseline": drop_vs_baseline(final, baseline) if baseline else {},
        "params": sum(p.numel() for p in model.parameters()),
        **measured,
        "versions": versions,
    }
