"""Compare continual-learning strategies over seeds and write one paper-ready table.

    python benchmarks/compare_strategies.py                       # the default set x seeds 0,1,2 on shapes
    python benchmarks/compare_strategies.py --strategies naive,ewc,ewc+replay --seeds 0,1 train.epochs.cls=10
    python benchmarks/compare_strategies.py --check               # do the shipped numbers still reproduce?

Every run trains with ``clmtl.grid.SHIPPED_BUDGET`` (``--recipe shipped``, the default; overrides win), or with the
config's own recipe (``--recipe config``, for streams of your own: ``--config examples/streams/two_digit_tasks.yaml``).
The grid (``clmtl.grid.run_grid``) resumes: a finished (strategy, seed) run is reused, and single-task baselines are
trained once per seed. ``--jobs N`` runs N trainings at once with one thread each (on 2 cores, two 1-thread jobs
finish sooner than one 2-thread job); ``--engine ray`` runs them as Ray tasks, on this machine or, with
``--address``, on a Ray cluster (``clmtl.engines``). OUT gets table.md (with the command that reproduces it), table.csv,
table.tex and plots/.

``--check`` reruns the small configuration of benchmarks/targets.csv (the shipped table's seed-0 runs of a few
strategies) into OUT/check and reports each number against its target; it exits 1 when one is off by more than
the tolerance. Runs on CPU with the same stack reproduce bit for bit; the tolerance absorbs other CPUs' BLAS.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from clmtl.engines import Engine, add_engine_arguments

DEFAULT_STRATEGIES = ("naive", "ewc", "replay", "lwf", "bnfreeze", "ewc+replay", "ewc+lwf", "replay+lwf",
                      "ewc+replay+lwf+bnfreeze", "joint")
TARGETS = Path(__file__).with_name("targets.csv")
TOLERANCE = 0.02
"""Largest absolute difference of a final score, on a 0-1 scale, that still counts as reproduced."""


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
    add_engine_arguments(parser)
    parser.add_argument("--check", action="store_true", help="rerun the targets.csv configuration and compare")
    parser.add_argument("--recipe", choices=("shipped", "config"), default="shipped",
                        help="shipped: the published table's reduced budget (SHIPPED_BUDGET); config: the config's own")
    parser.add_argument("--plugin-file", type=Path, action="append", default=[], metavar="PATH",
                        help="Python file registering extra strategies (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    args = parser.parse_args(argv)

    from clmtl.compare import Comparison
    from clmtl.grid import SHIPPED_BUDGET, run_grid
    from clmtl.registry import parse_strategy, use_strategy_files

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
    recipe = SHIPPED_BUDGET if args.recipe == "shipped" or args.check else ()
    results = run_grid(args.config, [*recipe, *args.overrides], strategies, seeds, out, Engine.from_arguments(args),
                       args.plugin_file)
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
