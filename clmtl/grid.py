"""A grid of trainings — strategies × seeds on one config — run resumably, several at once, for benchmark tables.

Each (strategy, seed) run writes ``OUT/seed<N>/<strategy>/`` (results.json and the usual report); a run whose
results.json exists is skipped, so an interrupted grid resumes where it stopped. Single-task baselines are trained
once per seed (``OUT/seed<N>/baselines.json``) and shared by every strategy of that seed. ``jobs`` trainings run at
once in spawned processes, one thread each; stopping the grid (Ctrl-C, SIGTERM) stops them too.

Every job names the strategy files it needs (``--plugin-file``), so a worker registers the same strategies as the
process that planned the grid.
"""
from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Sequence
from multiprocessing import get_context
from pathlib import Path
from typing import Any

EARLIER_NUMERICS = ("train.precision=fp32", "train.channels_last=false", "train.parallel_baselines=false")
"""How every training ran before bfloat16 autocast, NHWC weights and baselines beside the stream existed: float32,
NCHW, and the stream on all of ``train.threads``. Pinned where a published table must reproduce digit for digit."""
SHIPPED_BUDGET = ("data.image_size=96", "train.epochs.seg=6", "train.epochs.det=15", "train.epochs.cls=15",
                  "train.warmup=0", "train.ema=0", *EARLIER_NUMERICS)
"""The recipe of the shipped strategy-comparison and backbone tables (docs/benchmarks.md): smaller images and
shorter training than ``clmtl run``'s default (128 px, 15 / 25 / 60 epochs), a constant rate without warmup and
without weight averaging, in float32, so ten strategies x three seeds fit in an hour on 2 CPU cores."""

Job = tuple[Callable[..., str], tuple]
"""A function and its arguments; it returns a short name of what it did, for the progress line."""


def run_dir(out: Path, seed: int, strategy: str) -> Path:
    return out / f"seed{seed}" / strategy.replace("+", "-")


def seed_config(config_file: Path | None, overrides: Sequence[str], seed: int, threads: int | None,
                strategy_files: Sequence[Path] = ()):
    """The config of one training of the grid (after registering ``strategy_files``, so their keys validate)."""
    from clmtl.config import load_config
    from clmtl.registry import strategy_schemas, use_strategy_files

    use_strategy_files(strategy_files)
    extra = [f"seed={seed}"] + ([f"train.threads={threads}"] if threads else [])
    return load_config(config_file, [*overrides, *extra], strategies=strategy_schemas())


def train_baselines(config_file: Path | None, overrides: Sequence[str], seed: int, threads: int | None,
                    strategy_files: Sequence[Path], path: Path) -> str:
    """Train the seed's single-task baselines and store them as JSON."""
    from clmtl.baselines import baselines_alone
    from clmtl.io import atomic_write_json

    config = seed_config(config_file, overrides, seed, threads, strategy_files)
    with open(path.with_suffix(".log"), "w") as log:
        baselines, _ = baselines_alone(config, log)
    atomic_write_json(path, {"scores": baselines.scores, "seconds": baselines.seconds})
    return f"baselines seed {seed}"


def train_strategy(config_file: Path | None, overrides: Sequence[str], seed: int, threads: int | None,
                   strategy_files: Sequence[Path], strategy: str, out: Path, baselines_path: Path) -> str:
    """One sequential run with the seed's stored baselines."""
    from clmtl.baselines import Baselines
    from clmtl.run import run

    config = seed_config(config_file, overrides, seed, threads, strategy_files)
    stored = json.loads(baselines_path.read_text())
    run(config, strategy, out, baselines=Baselines(stored["scores"], stored["seconds"]))
    return f"{strategy} seed {seed}"


def run_grid(config_file: Path | None, overrides: Sequence[str], strategies: Sequence[str], seeds: Sequence[int],
             out: Path, jobs: int = 2, strategy_files: Sequence[Path] = ()) -> list[dict[str, Any]]:
    """Run what is missing (baselines first), then return every run's results, seed by seed in strategy order."""
    threads = 1 if jobs > 1 else None
    common = (config_file, list(overrides))
    baselines = {seed: out / f"seed{seed}" / "baselines.json" for seed in seeds}
    phases = [
        [(train_baselines, (*common, seed, threads, list(strategy_files), path))
         for seed, path in baselines.items() if not path.exists()],
        [(train_strategy, (*common, seed, threads, list(strategy_files), strategy, run_dir(out, seed, strategy),
                           baselines[seed]))
         for seed in seeds for strategy in strategies if not (run_dir(out, seed, strategy) / "results.json").exists()],
    ]
    skipped = len(seeds) * len(strategies) - len(phases[1])
    if skipped:
        print(f"resuming: {skipped} finished run(s) in {out} are reused")
    for phase in phases:
        for path in baselines.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        execute(phase, jobs)
    return [json.loads((run_dir(out, seed, s) / "results.json").read_text()) for seed in seeds for s in strategies]


def execute(jobs: list[Job], workers: int) -> None:
    """Run the jobs, ``workers`` at a time in spawned processes; stopping this process (Ctrl-C, SIGTERM) terminates
    the running trainings too, instead of leaving them to finish as orphans."""
    start = time.perf_counter()
    if workers == 1:
        for done, (function, arguments) in enumerate(jobs, start=1):
            _report(function(*arguments), done, len(jobs), start)
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with get_context("spawn").Pool(workers) as pool:  # leaving the block terminates the workers
            for done, name in enumerate(pool.imap_unordered(_call, jobs), start=1):
                _report(name, done, len(jobs), start)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _call(job: Job) -> str:
    function, arguments = job
    return function(*arguments)


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def _report(name: str, done: int, total: int, start: float) -> None:
    elapsed = time.perf_counter() - start
    remaining = elapsed / done * (total - done)
    print(f"[{done}/{total}] {name} done — {elapsed / 60:.1f} min elapsed, ~{remaining / 60:.1f} min left", flush=True)
