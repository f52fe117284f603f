"""Compare continual-learning strategies over seeds and write one paper-ready table.

    python benchmarks/compare_strategies.py                       # the default set x seeds 0,1,2 on shapes
    python benchmarks/compare_strategies.py --strategies naive,ewc,ewc+replay --seeds 0,1 train.epochs.cls=10
    python benchmarks/compare_strategies.py --check               # do the shipped numbers still reproduce?

Every run trains for ``BUDGET`` epochs unless overridden (``--recipe shipped``, the default), or with the config's
own recipe (``--recipe config``, for streams of your own: ``--config examples/streams/two_digit_tasks.yaml``). Each
(strategy, seed) run writes OUT/seed<N>/<strategy>/ (results.json and the usual report); a run whose
results.json exists is skipped, so an interrupted comparison resumes where it stopped. Single-task baselines are
trained once per seed (OUT/seed<N>/baselines.json) and shared by every strategy of that seed. ``--jobs N`` runs N
trainings at once with one thread each (on 2 cores, two 1-thread jobs finish sooner than one 2-thread job).
OUT gets table.md (with the command that reproduces it), table.csv, table.tex and plots/.

``--check`` reruns the small configuration of benchmarks/targets.csv (the shipped table's seed-0 runs of a few
strategies) into OUT/check and reports each number against its target; it exits 1 when one is off by more than
the tolerance. Runs on CPU with the same stack reproduce bit for bit; the tolerance absorbs other CPUs' BLAS.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from multiprocessing import get_context
from pathlib import Path

DEFAULT_STRATEGIES = ("naive", "ewc", "replay", "lwf", "bnfreeze", "ewc+replay", "ewc+lwf", "replay+lwf",
                      "ewc+replay+lwf+bnfreeze", "joint")
EARLIER_NUMERICS = ("train.precision=fp32", "train.channels_last=false", "train.parallel_baselines=false")
"""How every training ran before bfloat16 autocast, NHWC weights and baselines beside the stream existed: float32,
NCHW, and the stream on all of ``train.threads``. Pinned where a published table must reproduce digit for digit."""
BUDGET = ("data.image_size=96", "train.epochs.seg=6", "train.epochs.det=15", "train.epochs.cls=15", "train.warmup=0",
          "train.ema=0", *EARLIER_NUMERICS)
"""Smaller images and shorter training than `clmtl run`'s default (128 px, 15 / 25 / 60 epochs), so the default
comparison — 10 strategies x 3 seeds, 33 trainings — fits in an hour on 2 CPU cores; a constant rate without warmup
and without weight averaging, in float32, the recipe the published tables (and benchmarks/targets.csv) were measured
with. Overrides on the command line come after and win."""
TARGETS = Path(__file__).with_name("targets.csv")
TOLERANCE = 0.02
"""Largest absolute difference of a final score, on a 0-1 scale, that still counts as reproduced."""


def run_dir(out: Path, seed: int, strategy: str) -> Path:
    return out / f"seed{seed}" / strategy.replace("+", "-")


def load_seed_config(config_file: Path | None, overrides: Sequence[str], seed: int, threads: int | None):
    from clmtl.config import load_config
    from clmtl.registry import strategy_schemas

    extra = [f"seed={seed}"] + ([f"train.threads={threads}"] if threads else [])
    return load_config(config_file, [*overrides, *extra], strategies=strategy_schemas())


def train_baselines(config_file: Path | None, overrides: Sequence[str], seed: int, threads: int | None,
                    path: Path) -> str:
    """Train the seed's single-task baselines and store them as JSON."""
    from clmtl.io import atomic_write_json
    from clmtl.baselines import baselines_alone

    config = load_seed_config(config_file, overrides, seed, threads)
    with open(path.with_suffix(".log"), "w") as log:
        baselines, _ = baselines_alone(config, log)
    atomic_write_json(path, {"scores": baselines.scores, "seconds": baselines.seconds})
    return f"baselines seed {seed}"


def train_strategy(config_file: Path | None, overrides: Sequence[str], seed: int, threads: int | None,
                   strategy: str, out: Path, baselines_path: Path) -> str:
    """One sequential run with the seed's stored baselines."""
    from clmtl.baselines import Baselines
    from clmtl.run import run

    config = load_seed_config(config_file, overrides, seed, threads)
    stored = json.loads(baselines_path.read_text())
    run(config, strategy, out, baselines=Baselines(stored["scores"], stored["seconds"]))
    return f"{strategy} seed {seed}"


def run_all(config_file: Path | None, overrides: Sequence[str], strategies: Sequence[str], seeds: Sequence[int],
            out: Path, jobs: int = 2) -> list[dict]:
    """Run what is missing (baselines first), then return every run's results; ``overrides`` apply to every run
    (``BUDGET`` first for the shipped recipe), ``jobs`` trainings at once with one thread each when above 1."""
    threads = 1 if jobs > 1 else None
    common = (config_file, list(overrides))
    baselines = {seed: out / f"seed{seed}" / "baselines.json" for seed in seeds}
    phases = [
        [(train_baselines, (*common, seed, threads, path)) for seed, path in baselines.items() if not path.exists()],
        [(train_strategy, (*common, seed, threads, strategy, run_dir(out, seed, strategy), baselines[seed]))
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


def execute(jobs: list, workers: int) -> None:
    """Run ``(function, arguments)`` jobs, ``workers`` at a time in spawned processes; stopping this process (Ctrl-C,
    SIGTERM) terminates the running trainings too, instead of leaving them to finish as orphans."""
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


def _call(job: tuple) -> str:
    function, arguments = job
    return function(*arguments)


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def _report(name: str, done: int, total: int, start: float) -> None:
    elapsed = time.perf_counter() - start
    remaining = elapsed / done * (total - done)
    print(f"[{done}/{total}] {name} done — {elapsed / 60:.1f} min elapsed, ~{remaining / 60:.1f} min left", flush=True)


# -- reproducibility check --------------------------------------------------------------------
def read_targets(path: Path = TARGETS) -> list[dict]:
    with open(path, newline="") as handle:
        return [{**row, "seed": int(row["seed"]), "value": float(row["value"])} for row in csv.DictReader(handle)]


def check_against(targets: Sequence[dict], results: Sequence[dict], tolerance: float = TOLERANCE) -> list[str]:
    """One line per target: measured vs expected; lines of failures start with 'FAIL'."""
    by_run = {(r["strategy"], r["seed"]): r for r in results}
    lines = []
    for target in targets:
        run = by_run.get((target["strategy"], target["seed"]))
        measured = None if run is None else run["final"].get(target["task"])
        ok = measured is not None and abs(measured - target["value"]) <= tolerance
        shown = "missing" if measured is None else f"{measured:.4f}"
        lines.append(f"{'ok  ' if ok else 'FAIL'} {target['strategy']} seed {target['seed']} {target['task']}: "
                     f"{shown} vs target {target['value']:.4f} (± {tolerance})")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES), help="comma-separated strategy specs")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--config", type=Path, help="YAML config (default: clmtl's defaults)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default runs/compare)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once, one thread each (default 2)")
    parser.add_argument("--check", action="store_true", help="rerun the targets.csv configuration and compare")
    parser.add_argument("--recipe", choices=("shipped", "config"), default="shipped",
                        help="shipped: the published table's reduced budget (BUDGET); config: the config's own")
    parser.add_argument("--plugin-file", type=Path, action="append", default=[], metavar="PATH",
                        help="Python file registering extra strategies (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    args = parser.parse_args(argv)

    from clmtl.cli import _use_plugin_files
    from clmtl.compare import Comparison
    from clmtl.registry import parse_strategy

    _use_plugin_files(args.plugin_file)  # also exported to the worker processes

    if args.check:
        targets = read_targets()
        strategies = list(dict.fromkeys(t["strategy"] for t in targets))
        seeds = sorted({t["seed"] for t in targets})
        out = args.out / "check"
    else:
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        seeds = [int(s) for s in args.seeds.split(",")]
        out = args.out
    for spec in strategies:
        parse_strategy(spec)  # unknown names fail before anything trains
    recipe = BUDGET if args.recipe == "shipped" or args.check else ()
    results = run_all(args.config, [*recipe, *args.overrides], strategies, seeds, out, args.jobs)
    comparison = Comparison.from_results(strategies, results)
    comparison.write(out, "python benchmarks/compare_strategies.py " + shlex.join(argv))
    print(comparison.markdown())
    print(f"wrote {out}/table.md, table.csv, table.tex, plots/")
    if args.check:
        lines = check_against(targets, results)
        print("\n".join(lines))
        return 1 if any(line.startswith("FAIL") for line in lines) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
