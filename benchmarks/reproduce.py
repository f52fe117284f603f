"""Reproduce a published continual-learning experiment under its own protocol, cell by cell.

A protocol (``benchmarks/protocols/<name>.yaml``, ``--list`` names them) is one paper's experiment: its stream,
network, optimizer and budget, and the published mean and spread of every (scenario, method) cell. This script trains
clmtl's strategies the paper's way on MNIST read from ``--root`` (torchvision's files ``ROOT/MNIST/raw/`` or class
folders ``ROOT/{train,val}/<digit>/``; never downloaded) over ``--seeds``, and judges each cell: reproduced when the
paper's mean lies inside our 95 % interval widened by the paper's standard error (``clmtl.studies.protocols.verdict``).

    python benchmarks/reproduce.py --list
    python benchmarks/reproduce.py --protocol split_mnist_2019 --root DIR --out runs/split_mnist_2019
    python benchmarks/reproduce.py --protocol split_mnist_2019 --root DIR --avalanche     # + Avalanche's own rows
    python benchmarks/reproduce.py --protocol split_mnist_2019 --check   # rerun reproduce_targets.csv's cells

``--out`` receives ``table.md`` (with the command, the images used and the wall time), ``table.csv``
(``protocol,scenario,strategy,seeds,mean,low,high,paper,verdict``), ``plots/<protocol>.png`` and every run under
``<scenario>/seed<N>/<strategy>/``; finished runs are reused, so an interrupted reproduction resumes. Without
``--root`` the bundled digits (scikit-learn's 8x8 images, not MNIST) run instead, and the table says so.
``--avalanche`` adds rows ``avalanche:<Name>``: Avalanche's stock strategies on the same data, network and budget
(``clmtl.studies.avalanche_reference``).
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from clmtl.studies.engines import Engine, Job, add_engine_arguments, run_jobs
from clmtl.studies.protocols import train_avalanche_cell, train_clmtl

PROTOCOLS = Path(__file__).parent / "protocols"
TARGETS = Path(__file__).parent / "reproduce_targets.csv"
TARGET_TOLERANCE = 0.02
"""How far a rerun cell's mean may lie from the shipped one (``--check``): CPU numerics move single runs a little."""


def plan(protocol, scenarios: Sequence[str], methods: Sequence[str], seeds: Sequence[int], data: dict,
         iterations: int | None, out: Path, avalanche: bool,
         changes: Sequence[str] = ()) -> list[tuple[str, str, int, Path, Job]]:
    """Every (scenario, row, seed, folder, job) of the table; ``changes`` (``KEY=VALUE``) go to every clmtl cell, a
    ``strategy.<name>.`` one only to the cells of that strategy."""
    runs = []
    for scenario in scenarios:
        config = protocol.config(scenario, data, iterations)
        for method in methods:
            strategy, overrides = protocol.strategy_for(method, scenario)
            overrides = [*overrides, *(change for change in changes if applies(change, strategy))]
            for seed in seeds:
                folder = out / scenario / f"seed{seed}" / method
                runs.append((scenario, method, seed, folder,
                             Job(f"{scenario} {method} seed {seed}", train_clmtl, (config, strategy, overrides, seed,
                                                                                   folder))))
            reference = protocol.avalanche_for(method, scenario) if avalanche else None
            if reference is not None:
                name, hyper = reference
                for seed in seeds:
                    folder = out / scenario / f"seed{seed}" / f"avalanche_{name}"
                    runs.append((scenario, f"avalanche:{name}", seed, folder,
                                 Job(f"{scenario} avalanche:{name} seed {seed}", train_avalanche_cell,
                                     (config, name, hyper, seed, folder))))
    return runs


def check_runs(protocol, targets: Sequence[dict], data: dict, iterations: int | None, out: Path,
               changes: Sequence[str] = ()) -> list[tuple[str, str, int, Path, Job]]:
    """The runs ``--check`` reruns: each target cell on its own number of seeds (one cell may average more orders
    than the others), a run two cells share planned once."""
    runs: dict[Path, tuple] = {}
    for target in targets:
        row, scenario, seeds = target["strategy"], target["scenario"], range(int(target["seeds"]))
        if row.startswith("avalanche:"):
            method = next(m for m in protocol.methods if (protocol.avalanche_for(m, scenario) or ("",))[0] ==
                          row.split(":", 1)[1])
            planned = [run for run in plan(protocol, [scenario], [method], seeds, data, iterations, out, True, changes)
                       if run[1] == row]
        else:
            planned = plan(protocol, [scenario], [row], seeds, data, iterations, out, False, changes)
        for run in planned:
            runs.setdefault(run[3], run)
    return list(runs.values())


def applies(change: str, strategy: str) -> bool:
    """Whether override ``change`` concerns a cell of ``strategy`` (a ``strategy.<name>.`` key: only its own)."""
    parts = change.split("=", 1)[0].split(".")
    return parts[0] != "strategy" or len(parts) < 2 or parts[1] in strategy.split("+")


def train_missing(runs, engine: Engine, out: Path) -> None:
    from clmtl.studies.grid import write_failures

    todo = [job for _, _, _, folder, job in runs if not (folder / "results.json").exists()]
    if len(todo) < len(runs):
        print(f"resuming: {len(runs) - len(todo)} finished run(s) are reused")
    failures = run_jobs(todo, engine)
    write_failures(out / "failures.log", failures)
    if failures:
        raise SystemExit(f"reproduce: {len(failures)} training(s) failed (see {out / 'failures.log'}); the table "
                         "needs every run")


def cells(protocol, runs) -> list:
    """The table's cells, in scenario then row order."""
    from clmtl.studies.protocols import Cell

    scores: dict[tuple[str, str], list[float]] = {}
    for scenario, row, _, folder, _ in runs:
        results = json.loads((folder / "results.json").read_text())
        scores.setdefault((scenario, row), []).append(results["average_accuracy"])
    table = []
    for (scenario, row), values in scores.items():
        method = protocol.methods.get(row)
        paper = method.published[scenario] if method is not None else None
        table.append(Cell(protocol.name, scenario, row, tuple(values), paper))
    return table


def markdown(protocol, table: Sequence, command: str, minutes: float, images: str) -> str:
    lines = ["| scenario | strategy | seeds | ours: mean [95 % CI] | paper: mean ± SEM | verdict |",
             "|---|---|---|---|---|---|"]
    for cell in table:
        low, high = cell.interval
        paper = "–" if cell.paper is None else (f"{cell.paper.mean:.4f}" + (
            f" ± {cell.paper.sem:.4f}" if cell.paper.sem is not None else ""))
        method = protocol.methods.get(cell.strategy)
        mark = "" if method is None or method.checked else " (transcribed)"
        lines.append(f"| {cell.scenario} | {cell.strategy} | {cell.seeds} | {cell.mean:.4f} [{low:.4f}, {high:.4f}] "
                     f"| {paper}{mark} | {cell.verdict} |")
    source = protocol.source
    return "\n".join([
        f"# {protocol.title}",
        "",
        f"Average accuracy over the tasks after the last one. Paper: {source.get('citation', '')}, "
        f"{source.get('table', '')}, mean ± SEM of {protocol.runs} runs; (transcribed): not checked against the "
        "paper. Reproduced: the paper's mean lies in our 95 % interval widened by its SEM.",
        "",
        *lines,
        "",
        f"Data: {images}.",
        f"Command: `{command}`; wall time {minutes:.1f} min.",
        "",
    ])


def plot(table: Sequence, path: Path) -> None:
    """One panel per scenario: our means with their 95 % intervals, the paper's means as black ticks."""
    from clmtl.report.summary import plot_against_published

    panels = []
    for scenario in dict.fromkeys(cell.scenario for cell in table):
        row = [cell for cell in table if cell.scenario == scenario]
        errors = [[cell.mean - cell.interval[0] for cell in row], [cell.interval[1] - cell.mean for cell in row]]
        panels.append((f"{scenario}-incremental", [cell.strategy for cell in row], [cell.mean for cell in row],
                       errors, [None if cell.paper is None else cell.paper.mean for cell in row]))
    plot_against_published(panels, path, ours="ours (95 % CI)")


def describe_images(config: dict) -> str:
    """What the table's runs trained and were scored on, counted from the data itself."""
    from clmtl.config import load_config
    from clmtl.stream.benchmark import build_benchmark

    benchmark = build_benchmark(load_config(None, base=config, base_source="protocol"))
    train = sum(len(experience.dataset) for experience in benchmark.stream.train_stream)
    test = sum(len(experience.dataset) for experience in benchmark.stream.test_stream)
    source = config.get("split", config.get("domains"))["data"]
    name = "MNIST" if source["format"] == "torchvision" else f"class folders at {source['root']}"
    return f"{name}, {train:,} training and {test:,} test images over {len(benchmark.tasks)} tasks"


def read_targets(protocol: str) -> list[dict]:
    with open(TARGETS, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["protocol"] == protocol]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the protocols and exit")
    parser.add_argument("--protocol", help="protocol name (--list)")
    parser.add_argument("--root", type=Path, help="MNIST: ROOT/MNIST/raw/ or ROOT/{train,val}/<digit>/ (default: the "
                                                  "bundled 8x8 digits, not MNIST)")
    parser.add_argument("--out", type=Path, help="output folder (default runs/<protocol>)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0-4)")
    parser.add_argument("--strategies", help="comma-separated methods of the protocol (default: all)")
    parser.add_argument("--scenarios", help="comma-separated scenarios of the protocol (default: all)")
    parser.add_argument("--iterations", type=int, help="iterations per task instead of the paper's (a quick look)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="changes",
                        help="a config override for clmtl's cells, e.g. strategy.ewc.fisher_max_samples=1000 (a "
                             "departure from the paper, recorded in protocol.yaml and table.md); repeatable")
    parser.add_argument("--avalanche", action="store_true", help="also train Avalanche's own strategies")
    parser.add_argument("--check", action="store_true",
                        help=f"rerun the cells of {TARGETS.name} for --protocol and compare with them")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)

    from clmtl.errors import ConfigError
    from clmtl.studies.protocols import CSV_COLUMNS, Protocol, available_protocols, mnist_source

    protocols = available_protocols(PROTOCOLS)
    if args.list:
        for name, path in protocols.items():
            print(f"{name}: {Protocol.load(path).title}")
        return 0
    if args.protocol not in protocols:
        parser.error(f"--protocol must be one of {', '.join(protocols)} (got {args.protocol})")
    protocol = Protocol.load(protocols[args.protocol])
    methods = list(protocol.methods) if not args.strategies else [s.strip() for s in args.strategies.split(",")]
    unknown = [m for m in methods if m not in protocol.methods]
    if unknown:
        parser.error(f"{protocol.name} has no methods {unknown}; it has {list(protocol.methods)}")
    scenarios = protocol.scenarios if not args.scenarios else [s.strip() for s in args.scenarios.split(",")]
    if not set(scenarios) <= set(protocol.scenarios):
        parser.error(f"{protocol.name} has the scenarios {protocol.scenarios}, not {scenarios}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out or Path("runs") / protocol.name
    targets = read_targets(protocol.name) if args.check else []
    if args.check:
        if not targets:
            parser.error(f"{TARGETS.name} has no cell of {protocol.name}")
        out = out / "check"
        scenarios = list(dict.fromkeys(t["scenario"] for t in targets))
    try:
        data = mnist_source(args.root) if args.root else None
    except ConfigError as error:
        raise SystemExit(f"reproduce: {error}") from None
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        from clmtl.data.digits import write_digit_folders

        folders = out / "digits"
        if not (folders / "val").is_dir():
            write_digit_folders(folders)
        data = {"format": "folder", "root": str(folders)}
    start = time.perf_counter()
    (out / "protocol.yaml").write_text(yaml.safe_dump({"protocol": protocol.name, "data": data,
                                                       "iterations": args.iterations, "changes": args.changes},
                                                      sort_keys=False))
    runs = (check_runs(protocol, targets, data, args.iterations, out, args.changes) if args.check else
            plan(protocol, scenarios, methods, seeds, data, args.iterations, out, args.avalanche, args.changes))
    train_missing(runs, Engine.from_arguments(args), out)
    table = cells(protocol, runs)
    with open(out / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(cell.row() for cell in table)
    images = describe_images(protocol.config(scenarios[0], data, args.iterations))
    if args.root is None:
        images += " — scikit-learn's 8x8 digits, NOT MNIST"
    if args.iterations:
        images += f"; {args.iterations} iterations per task instead of the paper's {protocol.iterations}"
    if args.changes:
        images += "; changed from the paper: " + ", ".join(args.changes)
    text = markdown(protocol, table, "python benchmarks/reproduce.py " + shlex.join(argv),
                    (time.perf_counter() - start) / 60, images)
    (out / "table.md").write_text(text)
    plot(table, out / "plots" / f"{protocol.name}.png")
    print(text)
    print(f"wrote {out}/table.md, table.csv, plots/{protocol.name}.png")
    if args.check:
        return check(table, targets)
    return 0


def check(table: Sequence, targets: Sequence[dict]) -> int:
    """Compare each rerun cell's mean with its target; non-zero exit when one is off by more than the tolerance."""
    by_key = {(cell.scenario, cell.strategy): cell for cell in table}
    failed = 0
    for target in targets:
        cell = by_key.get((target["scenario"], target["strategy"]))
        expected = float(target["mean"])
        ok = cell is not None and abs(cell.mean - expected) <= TARGET_TOLERANCE
        failed += not ok
        shown = "missing" if cell is None else f"{cell.mean:.4f}"
        print(f"{'ok  ' if ok else 'FAIL'} {target['scenario']} {target['strategy']}: {shown} vs target "
              f"{expected:.4f} (± {TARGET_TOLERANCE})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
