"""Compare continual-learning strategies over seeds and write one paper-ready table.

    python benchmarks/compare_strategies.py --tune ewc data.val_size=200   # the shipped table (README)
    python benchmarks/compare_strategies.py --strategies naive,ewc,ewc+replay --seeds 0,1 train.epochs.cls=10
    python benchmarks/compare_strategies.py --engine ray --address HEAD:6379 --tune   # on a Ray cluster
    python benchmarks/compare_strategies.py --check               # do the shipped numbers still reproduce?

``--tune`` first selects the hyperparameters of every component that declares a search space (``clmtl.studies.tune``:
one seed, scored on a split carved from the training data, never on the evaluation sets), then runs the comparison with
the selected values; ``--tune ewc,lwf`` tunes only those. The table shows mean ± 95 % confidence intervals, marks
with ``*`` the scores that differ from EWC's seed by seed (exact Wilcoxon signed-rank test), and prints the minimum
detectable difference under it (``clmtl.studies.compare``). OUT/comparison.json records the protocol: strategies, seeds,
overrides, selected values, engine, wall time and versions.

Every run trains with the config's own recipe (``--recipe config``, the default: ``clmtl run``'s, or that of
``--config FILE``), or with the backbone study's shorter one (``--recipe reduced``:
``clmtl.studies.grid.REDUCED_BUDGET``); overrides win.
The grid (``clmtl.studies.grid.run_grid``) resumes: a finished (strategy, seed) run is reused, and single-task baselines
are trained once per seed. ``--jobs N`` runs N trainings at once with one thread each (on 2 cores, two 1-thread jobs
finish sooner than one 2-thread job); ``--engine ray`` runs them as Ray tasks, on this machine or, with
``--address``, on a Ray cluster (``clmtl.studies.engines``). OUT gets table.md (with the command that reproduces it),
table.csv, table.tex and plots/.

``--check`` reruns the runs of benchmarks/targets.csv (the shipped table's seed-0 runs of a few strategies, with
the overrides each row names) into OUT/check and reports each number against its target; it exits 1 when one is off
by more than the tolerance. Runs on CPU with the same stack and precision reproduce bit for bit; the tolerance
absorbs other CPUs' BLAS.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from clmtl.studies.engines import Engine, add_engine_arguments

DEFAULT_STRATEGIES = ("naive", "ewc", "replay", "ewc+replay")
DEFAULT_SEEDS = "0,1,2,3,4,5"
TARGETS = Path(__file__).with_name("targets.csv")
CHECKED = ("naive", "ewc", "replay")
"""The strategies whose seed-0 runs ``--save-targets`` keeps and ``--check`` reruns."""
TOLERANCE = 0.02
"""Largest absolute difference of a final score, on a 0-1 scale, that still counts as reproduced."""


# -- reproducibility check --------------------------------------------------------------------
def read_targets(path: Path = TARGETS) -> list[dict]:
    """The target rows; ``overrides`` (space-separated KEY=VALUE) say how their runs were trained, the same in all."""
    with open(path, newline="") as handle:
        rows = [{**row, "seed": int(row["seed"]), "value": float(row["value"]), "overrides": row["overrides"].split()}
                for row in csv.DictReader(handle)]
    if len({tuple(row["overrides"]) for row in rows}) > 1:
        raise SystemExit(f"{path}: every row must name the same overrides")
    return rows


def write_targets(results: Sequence[dict], overrides: Sequence[str], path: Path = TARGETS) -> None:
    """The seed-0 final scores of ``CHECKED`` as ``--check``'s targets, with the overrides that trained them."""
    from clmtl.io import atomic_write_text

    lines = ["strategy,seed,task,metric,value,overrides"]
    for run in results:
        if run["strategy"] in CHECKED and run["seed"] == 0:
            lines += [f"{run['strategy']},0,{task['name']},{task['metric']},{run['final'][task['name']]!r},"
                      f"{' '.join(overrides)}" for task in run["tasks"]]
    atomic_write_text(path, "\n".join(lines) + "\n")


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
    parser.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"comma-separated seeds (default {DEFAULT_SEEDS})")
    parser.add_argument("--config", type=Path, help="YAML config (default: clmtl's defaults)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default runs/compare)")
    add_engine_arguments(parser)
    parser.add_argument("--check", action="store_true", help="rerun the targets.csv configuration and compare")
    parser.add_argument("--save-targets", action="store_true",
                        help=f"write the seed-0 scores of {', '.join(CHECKED)} to {TARGETS.name} (what --check reruns)")
    parser.add_argument("--recipe", choices=("config", "reduced"), default="config",
                        help="config: the config's own training recipe (default); reduced: the backbone study's "
                             "shorter one (clmtl.studies.grid.REDUCED_BUDGET)")
    parser.add_argument("--tune", nargs="?", const="all", metavar="COMPONENTS",
                        help="select hyperparameters on held-out training data first (all components with a search "
                             "space, or a comma-separated list of them)")
    parser.add_argument("--tune-seed", type=int, help="seed of the tuning runs (default: the first of --seeds)")
    parser.add_argument("--reference", default="ewc", help="strategy the others are tested against (default ewc)")
    parser.add_argument("--plugin-file", type=Path, action="append", default=[], metavar="PATH",
                        help="Python file registering extra strategies (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    args = parser.parse_args(argv)

    from clmtl.io import atomic_write_json
    from clmtl.report.results import package_versions
    from clmtl.studies.compare import Comparison
    from clmtl.studies.grid import REDUCED_BUDGET, run_grid
    from clmtl.studies.tune import tunable_components, tune
    from clmtl.training.registry import parse_strategy, use_strategy_files

    use_strategy_files(args.plugin_file)

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
    engine = Engine.from_arguments(args)
    overrides = [*(REDUCED_BUDGET if args.recipe == "reduced" else ()),
                 *(targets[0]["overrides"] if args.check else ()), *args.overrides]
    started = time.perf_counter()
    selected = []
    if args.tune:
        try:
            components = tunable_components(strategies, None if args.tune == "all" else args.tune.split(","))
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        tune_seed = seeds[0] if args.tune_seed is None else args.tune_seed
        selected = tune(args.config, overrides, components, tune_seed, out, engine, args.plugin_file)
        print(f"selected on held-out training data (seed {tune_seed}): {' '.join(selected) or 'nothing'}; "
              f"see {out}/tune/selected.json")
    try:
        results = run_grid(args.config, [*overrides, *selected], strategies, seeds, out, engine, args.plugin_file)
    except ValueError as error:  # a finished run trained with other hyperparameters
        raise SystemExit(f"error: {error}") from None
    command = "python benchmarks/compare_strategies.py " + shlex.join(argv)
    comparison = Comparison.from_results(strategies, results, args.reference)
    comparison.write(out, command, [f"Hyperparameters selected on held-out training data ({out}/tune/selected.json): "
                                    + " ".join(f"`{value}`" for value in selected)] if selected else [])
    atomic_write_json(out / "comparison.json", {
        "command": command, "strategies": strategies, "seeds": seeds, "overrides": overrides, "selected": selected,
        "reference": comparison.reference,
        "engine": engine.name, "jobs": engine.jobs, "address": engine.address,
        "wall_seconds": time.perf_counter() - started, "versions": package_versions()})
    print(comparison.markdown())
    print(f"wrote {out}/table.md, table.csv, table.tex, plots/")
    if args.save_targets:
        write_targets(results, [*overrides, *selected])
        print(f"wrote {TARGETS}")
    if args.check:
        lines = check_against(targets, results)
        print("\n".join(lines))
        return 1 if any(line.startswith("FAIL") for line in lines) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
