"""Split digits in van de Ven & Tolias's three scenarios, beside their published Split MNIST numbers.

Five tasks of two digits (0-1, 2-3, 4-5, 6-7, 8-9) in the task-, domain- and class-incremental scenarios, trained by
naive fine-tuning, joint training, EWC, online EWC, Synaptic Intelligence (Avalanche's plugin), LwF and replay, over
several seeds; the score is the average accuracy over the five tasks after the last one (mean ± SEM over seeds).

    python benchmarks/three_scenarios.py --out runs/three_scenarios          # scikit-learn's digits, 3 seeds
    python benchmarks/three_scenarios.py --root DIR --out runs/three_mnist   # your MNIST: DIR/{train,val}/<digit>/

``--out`` receives ``table.md`` (ours beside the published numbers, with the command and the wall time),
``table.csv`` (``scenario,strategy,seeds,mean,sem``), ``plots/three_scenarios.png`` and every run's report under
``<scenario>/seed<N>/<strategy>/``; runs already there are reused, so an interrupted benchmark resumes.

What differs from the papers' protocol (stated in the table too): the digits are scikit-learn's 1,797 8x8 images
(about 1,350 for training, against MNIST's 60,000 28x28 images), enlarged to 64 px; the network is clmtl's unified
model (YOLOv8n layers 0-9, FPN, a classification head per task or per scenario) instead of a 784-400-400 MLP; training
is ``EPOCHS`` epochs of SGD per task instead of 2,000 Adam iterations; hyperparameters are clmtl's defaults, not
selected per scenario; and there are 3 seeds instead of 20.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from clmtl.studies.engines import Engine, add_engine_arguments

SCENARIOS = ("task", "domain", "class")

STRATEGIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "naive": ("naive", ()),
    "joint": ("joint", ()),
    "ewc": ("ewc", ()),
    "online ewc": ("ewc", ("strategy.ewc.mode=online",)),
    "si": ("avalanche.SynapticIntelligence", ()),
    "lwf": ("lwf", ()),
    "replay": ("replay", ()),
}
"""Each row of the table: the clmtl strategy and the overrides that make it that method."""

SEARCH: dict[str, tuple[str, tuple[float, ...]]] = {
    "ewc": ("strategy.ewc.lambda", (1, 10, 100, 1000, 10000)),
    "online ewc": ("strategy.ewc.lambda", (1, 10, 100, 1000, 10000)),
    "si": ("strategy.avalanche.SynapticIntelligence.si_lambda", (1, 100, 10000, 1000000, 100000000)),
    "lwf": ("strategy.lwf.alpha", (0.5, 1, 2, 4)),
}
"""The hyperparameter ``--select`` picks per scenario for each regularising strategy, and its candidates."""

SELECTION_SEED = 100
"""The seed ``--select`` trains with: not one of the table's seeds."""

SELECTED: dict[str, dict[str, float]] = {
    "task": {"ewc": 100, "online ewc": 100, "si": 1e6, "lwf": 1},
    "domain": {"ewc": 100, "online ewc": 1e4, "si": 1e6, "lwf": 0.5},
    "class": {"ewc": 1000, "online ewc": 1000, "si": 1e8, "lwf": 2},
}
"""The values the table uses, per scenario: what ``--select`` picked (docs/benchmarks.md has the command)."""

EPOCHS = 5
"""Epochs per task: the budget that fits 3 seeds x 3 scenarios x 7 strategies in 30 minutes on 2 CPU cores."""

RECIPE = {
    "split": {"kind": "classification", "data": {"format": "folder"}, "experiences": 5, "class_order": "sorted"},
    "data": {"image_size": 64},
    "train": {"optimizer": "sgd", "lr": 0.01, "clip_grad_norm": 1.0, "warmup": 0, "epochs": EPOCHS},
    "output": {"overlays": 0, "checkpoints": False},
}
"""The stream and training of every run (``split.data.root`` and ``seed`` are added per run)."""

PUBLISHED: dict[str, dict[str, tuple[float | None, float | None, float | None]]] = {
    "2019": {
        "naive": (87.19, 59.21, 19.90),
        "joint": (99.66, 98.42, 97.94),
        "ewc": (98.64, 63.95, 20.01),
        "online ewc": (99.12, 64.32, 19.96),
        "si": (99.09, 65.36, 19.99),
        "lwf": (99.57, 71.50, 23.85),
        "replay": (None, None, None),
    },
    "2022": {
        "naive": (84.32, 60.13, 19.89),
        "joint": (99.67, 98.59, 98.17),
        "ewc": (99.06, 63.03, 20.64),
        "online ewc": (None, None, None),
        "si": (None, None, None),
        "lwf": (99.60, 71.18, 21.89),
        "replay": (None, 93.75, 88.79),
    },
}
"""Split MNIST average accuracy (%) in the task, domain and class scenarios: van de Ven & Tolias, "Three scenarios for
continual learning" (2019, arXiv 1904.07734, Table 4; "None" is naive, "Offline" joint; 20 runs) and van de Ven,
Tuytelaars & Tolias, "Three types of incremental learning" (Nature Machine Intelligence 2022, Table 2; 20 runs, replay
("ER") with 100 samples per class). None: not reported for that method."""

PUBLISHED_CHECKED = {("2019", "ewc"), ("2019", "joint")}
"""Entries read in the paper itself; the others are transcriptions of its tables, marked * in the output."""


def digits_root(root: Path | None, work: Path) -> Path:
    """``root`` (class folders ``{train,val}/<digit>/``), or scikit-learn's digits written under ``work``."""
    if root is not None:
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise SystemExit(f"three_scenarios: {root / split}: missing; --root needs DIR/{{train,val}}/<digit>/")
        return root
    from clmtl.data.digits import write_digit_folders

    folders = work / "digits"
    if not (folders / "val").is_dir():
        write_digit_folders(folders)
    return folders


def plan(out: Path, seeds: Sequence[int], strategies: Sequence[str]) -> list[tuple[str, str, int, Path]]:
    """Every (scenario, row, seed, run folder) of the table."""
    from clmtl.studies.grid import run_dir

    return [(scenario, row, seed, run_dir(out / scenario, seed, row.replace(" ", "_")))
            for scenario in SCENARIOS for seed in seeds for row in strategies]


def hyperparameter(scenario: str, row: str, selected: dict[str, dict[str, float]]) -> list[str]:
    """The override setting ``row``'s searched hyperparameter to its value selected for ``scenario`` (if any)."""
    if row not in SEARCH:
        return []
    return [f"{SEARCH[row][0]}={selected[scenario][row]}"]


def run_all(runs: Sequence[tuple[str, str, int, Path, list[str]]], config_file: Path, overrides: Sequence[str],
            engine: Engine) -> None:
    """Train every (scenario, row, seed, folder, extra overrides) whose results.json is missing."""
    from clmtl.studies.engines import Job, run_jobs
    from clmtl.studies.grid import train_strategy, write_failures

    todo = [Job(f"{scenario} {row} seed {seed} {' '.join(extra)}".strip(), train_strategy,
                (config_file, [f"scenario={scenario}", *STRATEGIES[row][1], *extra, *overrides], seed, 1, [],
                 STRATEGIES[row][0], folder, None))
            for scenario, row, seed, folder, extra in runs if not (folder / "results.json").exists()]
    if len(todo) < len(runs):
        print(f"resuming: {len(runs) - len(todo)} finished run(s) are reused")
    failures = run_jobs(todo, engine)
    write_failures(config_file.parent / "failures.log", failures)
    if failures:
        raise SystemExit(f"three_scenarios: {len(failures)} training(s) failed; the table needs every run")


def select(out: Path, strategies: Sequence[str], config_file: Path, overrides: Sequence[str],
           engine: Engine) -> dict[str, dict[str, float]]:
    """Each searched row's value with the best average accuracy per scenario, trained at ``SELECTION_SEED``."""
    from clmtl.report.results import Results

    rows = [row for row in strategies if row in SEARCH]
    runs = [(scenario, row, SELECTION_SEED, out / scenario / f"{row.replace(' ', '_')}_{value}",
             [f"{SEARCH[row][0]}={value}"])
            for scenario in SCENARIOS for row in rows for value in SEARCH[row][1]]
    run_all(runs, config_file, overrides, engine)
    selected: dict[str, dict[str, float]] = {scenario: {} for scenario in SCENARIOS}
    lines = ["| scenario | strategy | value: average accuracy |", "|---|---|---|"]
    for scenario in SCENARIOS:
        for row in rows:
            scores = {value: Results.load(out / scenario / f"{row.replace(' ', '_')}_{value}").average_accuracy
                      for value in SEARCH[row][1]}
            selected[scenario][row] = max(scores, key=scores.get)
            tried = ", ".join(f"{value}: {score:.3f}" for value, score in scores.items())
            lines.append(f"| {scenario} | {row} ({SEARCH[row][0]}) | {tried} |")
    (out / "selection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return selected


def mean_sem(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def table_rows(scores: dict[tuple[str, str], list[float]], strategies: Sequence[str]) -> list[dict]:
    return [dict(zip(("scenario", "strategy", "seeds", "mean", "sem"),
                     (scenario, row, len(scores[scenario, row]), *mean_sem(scores[scenario, row]))))
            for scenario in SCENARIOS for row in strategies]


def published_cell(paper: str, row: str, column: int) -> str:
    value = PUBLISHED[paper][row][column]
    if value is None:
        return "–"
    return f"{value / 100:.3f}" + ("" if (paper, row) in PUBLISHED_CHECKED else "*")


def markdown(rows: Sequence[dict], strategies: Sequence[str], selected: dict[str, dict[str, float]], command: str,
             minutes: float) -> str:
    by_key = {(r["scenario"], r["strategy"]): r for r in rows}
    header = ["strategy"] + [f"{scenario} {source}" for scenario in SCENARIOS for source in ("ours", "2019", "2022")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in strategies:
        cells = [row]
        for column, scenario in enumerate(SCENARIOS):
            ours = by_key[scenario, row]
            cells += [f"**{ours['mean']:.3f} ± {ours['sem']:.3f}**", published_cell("2019", row, column),
                      published_cell("2022", row, column)]
        lines.append("| " + " | ".join(cells) + " |")
    chosen = "; ".join(f"{row} {SEARCH[row][0].rsplit('.', 1)[1]} " +
                       "/".join(f"{selected[scenario][row]:g}" for scenario in SCENARIOS)
                       for row in strategies if row in SEARCH)
    seeds = rows[0]["seeds"]
    return "\n".join([
        "# Split digits in the three scenarios, beside published Split MNIST",
        "",
        (f"Average accuracy over the 5 tasks after the last, mean ± SEM over {seeds} seeds (ours); published: mean of "
         "20 runs (2019: van de Ven & Tolias, arXiv 1904.07734, Table 4; 2022: van de Ven, Tuytelaars & Tolias, "
         "Nature Machine Intelligence, Table 2). * transcribed, not checked against the paper; – not reported."),
        "",
        *lines,
        "",
        f"Command: `{command}`; wall time {minutes:.1f} min.",
        "",
        (f"Hyperparameters per scenario (task/domain/class), picked by `--select` at seed {SELECTION_SEED}: {chosen}. "
         "Replay keeps 200 samples in all; LwF's temperature is 2."),
        "",
        ("Protocol differences: scikit-learn's 8x8 digits (about 1,350 training images) enlarged to 64 px, not MNIST's "
         "60,000 28x28 images; clmtl's unified model (YOLOv8n layers 0-9 + FPN, BatchNorm) instead of an MLP "
         f"784-400-400; {EPOCHS} epochs of SGD per task instead of 2,000 Adam iterations; {seeds} seeds instead of "
         "20."),
        "",
    ])


def plot(rows: Sequence[dict], strategies: Sequence[str], path: Path) -> None:
    """One group of bars per scenario (ours, ± SEM), the published 2019 numbers as black ticks."""
    from clmtl.report.summary import plot_against_published

    by_key = {(r["scenario"], r["strategy"]): r for r in rows}
    panels = [(f"{scenario}-incremental", list(strategies), [by_key[scenario, row]["mean"] for row in strategies],
               [by_key[scenario, row]["sem"] for row in strategies],
               [None if PUBLISHED["2019"][row][column] is None else PUBLISHED["2019"][row][column] / 100
                for row in strategies])
              for column, scenario in enumerate(SCENARIOS)]
    plot_against_published(panels, path, published="2019 (Split MNIST)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="class folders DIR/{train,val}/<digit>/ (default: scikit-learn's "
                                                  "digits, written under --out)")
    parser.add_argument("--out", type=Path, default=Path("runs/three_scenarios"), help="output folder")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated rows of the table")
    parser.add_argument("--select", action="store_true",
                        help=f"pick each regularising strategy's hyperparameter per scenario (seed {SELECTION_SEED}) "
                             "and write OUT/select/selected.json instead of the table")
    parser.add_argument("--hyperparameters", type=Path, metavar="JSON",
                        help="the values --select wrote (default: the shipped SELECTED)")
    add_engine_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    args = parser.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; the table has {list(STRATEGIES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    engine = Engine.from_arguments(args)

    from clmtl.config import load_config
    from clmtl.report.results import Results

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = {**RECIPE, "split": {**RECIPE["split"], "data": {"format": "folder",
                                                              "root": str(digits_root(args.root, args.out))}}}
    config_file = args.out / "config.yaml"
    config_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    load_config(config_file, args.overrides)  # a bad override fails before anything trains
    if args.select:
        selected = select(args.out / "select", strategies, config_file, args.overrides, engine)
        (args.out / "select" / "selected.json").write_text(json.dumps(selected, indent=1) + "\n")
        print(f"wrote {args.out}/select/selection.md, selected.json")
        return 0
    selected = json.loads(args.hyperparameters.read_text()) if args.hyperparameters else SELECTED
    runs = [(scenario, row, seed, folder, hyperparameter(scenario, row, selected))
            for scenario, row, seed, folder in plan(args.out, seeds, strategies)]
    run_all(runs, config_file, args.overrides, engine)

    scores: dict[tuple[str, str], list[float]] = {}
    for scenario, row, _, folder, _ in runs:
        scores.setdefault((scenario, row), []).append(Results.load(folder).average_accuracy)
    rows = table_rows(scores, strategies)
    with open(args.out / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["scenario", "strategy", "seeds", "mean", "sem"])
        writer.writeheader()
        writer.writerows({**r, "mean": f"{r['mean']:.4f}", "sem": f"{r['sem']:.4f}"} for r in rows)
    command = "python benchmarks/three_scenarios.py " + shlex.join(argv)
    text = markdown(rows, strategies, selected, command, (time.perf_counter() - start) / 60)
    (args.out / "table.md").write_text(text)
    plot(rows, strategies, args.out / "plots" / "three_scenarios.png")
    print(text)
    print(f"wrote {args.out}/table.md, table.csv, plots/three_scenarios.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
