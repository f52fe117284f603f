"""Where the task-incremental gap comes from: the earlier three-scenario setup, then one factor at a time set to the
papers' protocol (data, optimizer, budget, model), on Split MNIST's task scenario.

The earlier setup is the three-scenario check's (``benchmarks/three_scenarios.py``): clmtl's unified model at 64 px,
SGD (lr 0.01, gradients clipped to norm 1, batch 16), 5 epochs per task, scikit-learn's 8x8 digits. Each row changes
ONE of those to what van de Ven & Tolias (2019) ran: MNIST, Adam (lr 1e-3, batch 128, one state for the stream),
2,000 iterations per task, the 784-400-400 MLP on 28x28 grey images. The last row is the papers' protocol in full
(``benchmarks/protocols/split_mnist_2019.yaml``).

    python benchmarks/task_gap.py --root DIR --out runs/task_gap          # MNIST at DIR (torchvision files)

``--out`` receives ``table.md`` (average accuracy of naive and EWC, or those of ``--strategies``, per row, with the
command) and every run.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from clmtl.studies.engines import Engine, Job, add_engine_arguments, run_jobs
from clmtl.studies.protocols import Protocol, mnist_source, train_clmtl

PROTOCOL = Path(__file__).parent / "protocols" / "split_mnist_2019.yaml"

THREE_SCENARIO_SETUP = {"data": {"image_size": 64, "channels": 3},
                        "model": {"backbone": "yolov8n"},
                        "train": {"optimizer": "sgd", "lr": 0.01, "clip_grad_norm": 1.0, "batch_size": 16,
                                  "iterations": None, "epochs": 5, "reset_optimizer": True}}
"""The three-scenario check's model, optimizer and budget, over the papers' config (its data is a separate
factor)."""

FACTORS: dict[str, dict] = {
    "earlier setup": {},
    "data: MNIST": {"mnist": True},
    "optimizer: Adam 1e-3, batch 128": {"train": {"optimizer": "adam", "lr": 0.001, "clip_grad_norm": 0.0,
                                                  "batch_size": 128, "reset_optimizer": False}},
    "budget: 2,000 iterations": {"train": {"iterations": 2000}},
    "model: MLP 784-400-400": {"data": {"image_size": 28, "channels": 1}, "model": {"backbone": "mlp"}},
}
"""Each row: what it sets to the papers' value, over the earlier setup."""

STRATEGIES = ("naive", "ewc")


def merged(base: dict, change: dict) -> dict:
    """``base`` with ``change``'s sections updated key by key."""
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for section, values in change.items():
        out[section] = {**out.get(section, {}), **values}
    return out


def row_config(protocol: Protocol, row: str, mnist: dict, digits: dict) -> dict:
    """The config of one row (``paper protocol``: the protocol itself on MNIST)."""
    if row == "paper protocol":
        return protocol.config("task", mnist)
    change = dict(FACTORS[row])
    data = mnist if change.pop("mnist", False) else digits
    return merged(protocol.config("task", data), merged(THREE_SCENARIO_SETUP, change))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="MNIST: DIR/MNIST/raw/ or DIR/{train,val}/<digit>/")
    parser.add_argument("--out", type=Path, default=Path("runs/task_gap"))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="naive, ewc or both (default)")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)

    from clmtl.data.digits import write_digit_folders

    protocol = Protocol.load(PROTOCOL)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    strategies = [s for s in STRATEGIES if s in args.strategies.split(",")]
    folders = args.out / "digits"
    if not (folders / "val").is_dir():
        write_digit_folders(folders)
    mnist, digits = mnist_source(args.root), {"format": "folder", "root": str(folders)}
    rows = [*FACTORS, "paper protocol"]
    start = time.perf_counter()
    jobs, folders_of = [], {}
    for index, row in enumerate(rows):
        config = row_config(protocol, row, mnist, digits)
        for strategy in strategies:
            _, overrides = protocol.strategy_for(strategy, "task")
            for seed in seeds:
                folder = args.out / f"row{index}" / f"seed{seed}" / strategy
                folders_of.setdefault((row, strategy), []).append(folder)
                if not (folder / "results.json").exists():
                    jobs.append(Job(f"{row} {strategy} seed {seed}", train_clmtl,
                                    (config, strategy, overrides, seed, folder)))
    failures = run_jobs(jobs, Engine.from_arguments(args))
    if failures:
        raise SystemExit(f"task_gap: {len(failures)} training(s) failed: {failures[0].error}")
    lines = ["| setup | " + " | ".join(strategies) + " |", "|---|" + "---|" * len(strategies)]
    for row in rows:
        cells = []
        for strategy in strategies:
            scores = [json.loads((folder / "results.json").read_text())["average_accuracy"]
                      for folder in folders_of[row, strategy]]
            cells.append(f"{sum(scores) / len(scores):.3f}")
        lines.append(f"| {row} | {' | '.join(cells)} |")
    text = "\n".join([
        "# The task-incremental gap, one factor at a time",
        "",
        f"Split MNIST, task scenario, average accuracy after the last task (seeds {args.seeds})"
        + ("; EWC at the papers' lambda (protocols/split_mnist_2019.yaml)." if "ewc" in strategies else "."),
        "",
        *lines,
        "",
        f"Command: `python benchmarks/task_gap.py {shlex.join(argv)}`; wall time "
        f"{(time.perf_counter() - start) / 60:.1f} min.",
        "",
    ])
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
