"""The observation of the report clmtl started from, that with a stronger backbone EWC no longer keeps every task
within 5 % of its baseline, as a table: per backbone, its cost and how much each strategy
lets the tasks drop from their single-task baselines.

    python benchmarks/backbone_study.py                                # 3 backbones x ewc, ewc+replay x seeds 0,1,2
    python benchmarks/backbone_study.py --backbones yolov8n,efficientnet_b0 --seeds 0 --strategies ewc

Each backbone is one strategy comparison (``compare_strategies.py``, same budget, resumable, baselines shared per
seed) in OUT/<backbone>/. Cost is measured in this process: parameters, FLOPs of ``forward_all`` and its median
latency at ``--image-size`` (batch 1, eval mode). OUT gets backbones.md, backbones.json and plots/drops.png.
"""
from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

from clmtl.studies.engines import Engine, add_engine_arguments
from clmtl.studies.grid import REDUCED_BUDGET, run_grid

BACKBONES = ("yolov8n", "mobilenet_v3_small", "efficientnet_b0")
STRATEGIES = ("ewc", "ewc+replay")


def backbone_cost(name: str, image_size: int, repeats: int) -> dict[str, float]:
    """Parameters, GFLOPs and median latency of ``forward_all`` at ``image_size`` (shapes tasks, random weights)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clmtl.data.shapes import shapes_task
    from clmtl.models.unified import UnifiedModel
    from clmtl.stream.scenario import output_spaces
    from clmtl.stream.tasks import TASK_KINDS
    from clmtl.studies.timing import measure_latency

    tasks = [shapes_task(kind, name) for name, kind in TASK_KINDS.items()]
    model = UnifiedModel(output_spaces(tasks), image_size=image_size, backbone=name).eval()
    image = torch.rand(1, 3, image_size, image_size)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            model.forward_all(image)
        latency = measure_latency(functools.partial(model.forward_all, image), repeats)
    return {"params": sum(p.numel() for p in model.parameters()), "gflops": counter.get_total_flops() / 1e9,
            "forward_all_ms": latency.median_ms, "forward_all_iqr_ms": latency.iqr_ms}


def study_markdown(rows: list[dict], strategies: Sequence[str], image_size: int) -> str:
    tasks = rows[0]["tasks"]
    headers = ["backbone", "params", f"GFLOPs @{image_size}", f"forward_all ms @{image_size}",
               *[f"baseline {t}" for t in tasks], *[f"{s}: {t} drop %" for s in strategies for t in tasks]]
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    for row in rows:
        cells = [row["backbone"], f"{row['params'] / 1e6:.2f} M", f"{row['gflops']:.2f}",
                 f"{row['forward_all_ms']:.1f}", *[row["baseline"][t] for t in tasks],
                 *[row["drops"][s][t] for s in strategies for t in tasks]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_drops(rows: list[dict], strategies: Sequence[str], path: Path) -> None:
    """One panel per strategy: each task's relative drop, one bar per backbone, error bars one std over seeds."""
    import numpy as np
    from matplotlib.figure import Figure

    tasks = rows[0]["tasks"]
    figure = Figure(figsize=(4.2 * len(strategies), 3.4), layout="constrained")
    width = 0.8 / len(rows)
    for index, strategy in enumerate(strategies):
        ax = figure.add_subplot(1, len(strategies), index + 1)
        for offset, row in enumerate(rows):
            stats = [row["drop_stats"][strategy][t] for t in tasks]
            x = np.arange(len(tasks)) + (offset - (len(rows) - 1) / 2) * width
            ax.bar(x, [100 * (s.mean or 0.0) for s in stats], width, yerr=[100 * (s.std or 0.0) for s in stats],
                   capsize=2, label=row["backbone"])
        ax.axhline(5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_title(strategy, fontsize=10)
        ax.set_ylabel("drop vs baseline, % (dashed: 5 %)")
    figure.axes[0].legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/backbones"))
    add_engine_arguments(parser)
    parser.add_argument("--image-size", type=int, default=512, help="input side for FLOPs and latency (default 512)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per backbone (default 10)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from clmtl.io import atomic_write_json, atomic_write_text
    from clmtl.studies.compare import Comparison
    from clmtl.training.registry import parse_strategy

    backbones = [b.strip() for b in args.backbones.split(",")]
    strategies = [s.strip() for s in args.strategies.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    for spec in strategies:
        parse_strategy(spec)
    rows = []
    for name in backbones:
        overrides = [*REDUCED_BUDGET, *args.overrides, f"model.backbone={name}"]
        results = run_grid(args.config, overrides, strategies, seeds, args.out / name, Engine.from_arguments(args))
        comparison = Comparison.from_results(strategies, results)
        tasks = [t["name"] for t in comparison.tasks]
        drop_columns = {c.key[1]: i for i, c in enumerate(comparison.columns) if c.key[0] == "drop_vs_baseline"}
        baselines = dict(zip(tasks, [s for s in comparison.baseline_stats() if s is not None]))
        drop_stats = {s: {t: comparison.stats(s)[drop_columns[t]] for t in tasks} for s in strategies}
        rows.append({"backbone": name, "tasks": tasks, **backbone_cost(name, args.image_size, args.repeats),
                     "baseline": {t: baselines[t].text() for t in tasks},
                     "drops": {s: {t: drop_stats[s][t].text(1, 100.0) for t in tasks} for s in strategies},
                     "drop_stats": drop_stats})
    text = (f"Backbones on the `{results[0]['benchmark']}` benchmark, seeds {seeds}: cost of `forward_all`, "
            "single-task baselines (primary metric) and relative drop vs baseline per strategy (mean ± std; "
            "positive = worse).\n\nReproduce with:\n\n```\npython benchmarks/backbone_study.py "
            + " ".join(argv) + "\n```\n\n" + study_markdown(rows, strategies, args.image_size))
    atomic_write_text(args.out / "backbones.md", text)
    atomic_write_json(args.out / "backbones.json",
                      [{k: v for k, v in row.items() if k != "drop_stats"} for row in rows])
    plot_drops(rows, strategies, args.out / "plots" / "drops.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
