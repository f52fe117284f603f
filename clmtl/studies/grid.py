"""A grid of trainings — strategies × seeds on one config — run resumably, several at once, for benchmark tables.

Each (strategy, seed) run writes ``OUT/seed<N>/<strategy>/`` (results.json and the usual report); a run whose
results.json exists is skipped, so an interrupted grid resumes where it stopped. Single-task baselines are trained
once per seed (``OUT/seed<N>/baselines.json``) and shared by every strategy of that seed. ``jobs`` trainings run at
at once, one thread each, on this machine or on a Ray cluster (``clmtl.studies.engines``); stopping the grid (Ctrl-C,
SIGTERM) stops them too, and a training that fails is reported in ``OUT/failures.log`` while the others run on.

Every job names the strategy files it needs (``--plugin-file``), so a worker registers the same strategies as the
process that planned the grid.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clmtl.baselines import Baselines, baselines_alone
from clmtl.config import load_config
from clmtl.io import atomic_write_json
from clmtl.runner import run
from clmtl.studies.engines import Engine, Failure, Job, run_jobs
from clmtl.training.registry import available, parse_strategy, strategy_schemas, use_strategy_files

FP32_NCHW_SEQUENTIAL = ("train.precision=fp32", "train.channels_last=false", "train.parallel_baselines=false")
"""Float32 without autocast, NCHW weights, and the baselines trained in the run's process, one training after the
other on all of ``train.threads``: what a table pins so that its numbers do not depend on the CPU's bfloat16 units."""
REDUCED_BUDGET = ("data.image_size=96", "train.epochs.seg=6", "train.epochs.det=15", "train.epochs.cls=15",
                  "train.warmup=0", "train.ema=0", *FP32_NCHW_SEQUENTIAL)
"""The budget of the backbone study and of the strategy comparison's ``--recipe reduced``: smaller images and
shorter training than ``clmtl run``'s default (128 px, 15 / 25 / 60 epochs), a constant rate without warmup and
without weight averaging, in float32, so three backbones x strategies x seeds fit on 2 CPU cores."""

def run_dir(out: Path, seed: int, strategy: str) -> Path:
    return out / f"seed{seed}" / strategy.replace("+", "-")


def seed_config(config_file: Path | None, overrides: Sequence[str], seed: int, threads: int | None,
                strategy_files: Sequence[Path] = ()):
    """The config of one training of the grid (after registering ``strategy_files``, so their keys validate)."""
    use_strategy_files(strategy_files)
    extra = [f"seed={seed}"] + ([f"train.threads={threads}"] if threads else [])
    return load_config(config_file, [*overrides, *extra], strategies=strategy_schemas())


def train_baselines(config_file: Path | None, overrides: Sequence[str], seed: int, threads: int | None,
                    strategy_files: Sequence[Path], path: Path) -> None:
    """Train the seed's single-task baselines and store them as JSON."""
    config = seed_config(config_file, overrides, seed, threads, strategy_files)
    with open(path.with_suffix(".log"), "w") as log:
        baselines, _ = baselines_alone(config, log)
    atomic_write_json(path, {"scores": baselines.scores, "seconds": baselines.seconds})


def train_strategy(config_file: Path | None, overrides: Sequence[str], seed: int, threads: int | None,
                   strategy_files: Sequence[Path], strategy: str, out: Path, baselines_path: Path | None) -> None:
    """One sequential run with the seed's stored baselines (``baselines_path`` None: without baselines)."""
    config = seed_config(config_file, overrides, seed, threads, strategy_files)
    reused = None
    if baselines_path is not None:
        stored = json.loads(baselines_path.read_text())
        reused = Baselines(stored["scores"], stored["seconds"])
    run(config, strategy, out, baselines=False, reuse_baselines=reused)


def run_grid(config_file: Path | None, overrides: Sequence[str], strategies: Sequence[str], seeds: Sequence[int],
             out: Path, engine: Engine = Engine(), strategy_files: Sequence[Path] = ()) -> list[dict[str, Any]]:
    """Run what is missing (baselines first) on ``engine`` (``clmtl.studies.engines``), then return the results of every
    finished run, seed by seed in strategy order; failed trainings are listed in ``OUT/failures.log``."""
    threads = engine.job_threads
    common = (config_file, list(overrides))
    baselines = {seed: out / f"seed{seed}" / "baselines.json" for seed in seeds}
    for seed in seeds:
        planned = seed_config(config_file, overrides, seed, None, strategy_files)
        for strategy in strategies:
            check_reused(run_dir(out, seed, strategy) / "results.json", strategy, planned)
    missing = [(seed, strategy) for seed in seeds for strategy in strategies
               if not (run_dir(out, seed, strategy) / "results.json").exists()]
    skipped = len(seeds) * len(strategies) - len(missing)
    if skipped:
        print(f"resuming: {skipped} finished run(s) in {out} are reused")
    for path in baselines.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    work = missing or not all(path.exists() for path in baselines.values())
    with engine.session(threads or 1) if work else contextlib.nullcontext():  # one Ray for both waves, if any
        failures = run_jobs([Job(f"baselines seed {seed}", train_baselines,
                                 (*common, seed, threads, list(strategy_files), path))
                             for seed, path in baselines.items() if not path.exists()], engine, threads or 1)
        failures += run_jobs([Job(f"{strategy} seed {seed}", train_strategy,
                                  (*common, seed, threads, list(strategy_files), strategy,
                                   run_dir(out, seed, strategy), baselines[seed]))
                              for seed, strategy in missing if baselines[seed].exists()],  # not where baselines failed
                             engine, threads or 1)
    write_failures(out / "failures.log", failures)
    finished = [run_dir(out, seed, s) / "results.json" for seed in seeds for s in strategies]
    return [json.loads(path.read_text()) for path in finished if path.exists()]


def check_reused(path: Path, strategy: str, planned: Any) -> None:
    """Refuse to reuse the finished run ``path`` (its results.json; nothing to check where it does not exist) when it
    was trained with another config than ``planned`` (other overrides, or ``--tune`` selected other values): its
    folder name alone cannot tell. Thread counts may differ, keys one side lacks are skipped (a run of an earlier
    clmtl), and of the ``strategy`` section only the run's own components count, with their defaults filled in."""
    if not path.exists():
        return

    def compared(config: dict[str, Any]) -> dict[str, Any]:
        keys = {key: value for key, value in flatten(config).items() if not key.startswith("strategy.")}
        for name in parse_strategy(strategy):
            settings = {**available()[name].defaults, **config.get("strategy", {}).get(name, {})}
            keys |= flatten({"strategy": {name: settings}})
        return keys

    trained, wanted = compared(json.loads(path.read_text())["config"]), compared(planned.to_dict())
    differing = sorted(key for key in trained.keys() & wanted.keys()
                       if key != "train.threads" and trained[key] != wanted[key])
    if differing:
        key = differing[0]
        raise ValueError(f"{path}: trained with {key}={trained[key]!r}, but this grid asks for {wanted[key]!r}; "
                         "use another --out (or remove the run)")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b": value}``."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {key: value for name, sub in tree.items() for key, value in flatten(sub, f"{prefix}{name}.").items()}


def write_failures(path: Path, failures: Sequence[Failure]) -> None:
    """Each failed training's label and traceback (no file when none failed; an old one is removed)."""
    if not failures:
        path.unlink(missing_ok=True)
        return
    path.write_text("".join(f"== {f.label}: {f.error}\n{f.details}\n" for f in failures))
    print(f"{len(failures)} training(s) failed: {', '.join(f.label for f in failures)}; see {path}")
