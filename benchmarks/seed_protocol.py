"""Reproduce the protocol of the report clmtl started from on any benchmark, and write its two tables.

    python benchmarks/seed_protocol.py                                   # the embedded shapes benchmark
    python benchmarks/seed_protocol.py --config examples/real_data.yaml  # that report's datasets, from disk

That report (the "seed report") trained one unified-head model on mini-VOC segmentation, then mini-COCO detection,
then Imagenette-160 classification, with EWC, and compared each task's final score with its single-task baseline.
Protocol: single-task baselines, then seg -> det + EWC -> cls + EWC with lambda 1000 and Adam. Overrides given on
the command line come after the protocol's values, so a deliberate variation (another lambda) is possible and
recorded. Writes OUT/seed_protocol.md and OUT/seed_protocol.json, beside the full run
report in OUT/run/.

Efficiency: parameters (total and per part), inference latency per image at the configured size (batch 1, median
over repeats after warm-up, in eval mode under inference_mode) of each task alone and of all three from one pass
(``forward_all`` with detection decode + NMS and segmentation argmax), and training seconds per stage.
"""
from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

PROTOCOL = ["train.optimizer=adam", "strategy.ewc.lambda=1000.0"]
REFERENCE_EWC_SCORES = {"seg": 0.134, "det": 0.000004, "cls": 0.367}
"""That report's final EWC scores on its real datasets (mIoU, mAP, top-1), for context."""


def inference_latency(model, tasks, config, repeats: int) -> dict[str, dict[str, float]]:
    """Median latency per image of each task's forward and of all three tasks from one pass."""
    import torch

    from clmtl.builders import make_decoder
    from clmtl.models.decode import predict
    from clmtl.studies.timing import measure_latency

    model.eval()
    image = torch.rand(1, 3, config.data.image_size, config.data.image_size)
    decode = make_decoder(config, model)

    def one_task(label: int) -> None:  # what a user gets: boxes after NMS, a label map, a class id
        predict(model(image, label), model.head_kinds[label], decode)

    def all_tasks() -> None:
        for label, output in model.forward_all(image).items():
            predict(output, model.head_kinds[label], decode)

    with torch.inference_mode():
        timings = {task.name: measure_latency(functools.partial(one_task, label), repeats).as_dict()
                   for label, task in enumerate(tasks)}
        timings["all three (forward_all)"] = measure_latency(all_tasks, repeats).as_dict()
    return timings


def protocol_markdown(results: dict, latency: dict, parts: dict[str, int]) -> str:
    from clmtl.report.summary import format_value

    tasks = results["tasks"]
    lines = [f"# Seed protocol on `{results['benchmark']}` (seed {results['seed']})", "",
             f"Baselines, then {' → '.join(t['name'] for t in tasks)} with EWC "
             f"(λ = {results['config']['strategy']['ewc']['lambda']}, {results['config']['train']['optimizer']}).", "",
             "## Table 1", "",
             "| Task | Metric | Baseline | EWC final | Drop (relative) | Drop (absolute) |",
             "|---|---|---|---|---|---|"]
    for t in tasks:
        name = t["name"]
        base, final = results["baseline"].get(name), results["final"][name]
        drop = results["drop_vs_baseline"].get(name)
        absolute = None if base is None else base - final
        lines.append(f"| {name} | {t['metric']} | {format_value(base, 3)} | {format_value(final, 3)} | "
                     f"{'–' if drop is None else f'{100 * drop:.1f} %'} | {format_value(absolute, 3)} |")
    if results["benchmark"] == "files":
        lines += ["", "The seed report's EWC final scores on its datasets: "
                  + ", ".join(f"{name} {value}" for name, value in REFERENCE_EWC_SCORES.items()) + "."]
    lines += ["", "## Efficiency", "", f"Parameters: {results['params']:,} ("
              + ", ".join(f"{part} {count:,}" for part, count in parts.items()) + ").", "",
              f"Inference per image at {results['config']['data']['image_size']} px, batch 1, "
              f"{results['config']['train']['threads']} thread(s), median (IQR) over repeats:", "",
              "| Forward | ms |", "|---|---|"]
    lines += [f"| {name} | {t['median_ms']:.1f} ({t['iqr_ms']:.1f}) |" for name, t in latency.items()]
    lines += ["", "| Training stage | seconds |", "|---|---|"]
    lines += [f"| baseline {name} | {s:.1f} |" for name, s in results["baseline_train_seconds"].items()]
    lines += [f"| sequential {name} | {s:.1f} |" for name, s in results["train_seconds"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="YAML config (default: clmtl's defaults, shapes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/seed_protocol"))
    parser.add_argument("--repeats", type=int, default=20, help="timed inference repeats (default 20)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from clmtl.builders import build_model
    from clmtl.config import load_config
    from clmtl.io import atomic_write_json, atomic_write_text
    from clmtl.runner import run
    from clmtl.stream.tasks import TaskSpec
    from clmtl.training.registry import strategy_schemas

    config = load_config(args.config, [*PROTOCOL, *args.overrides, f"seed={args.seed}"],
                         strategies=strategy_schemas())
    results = run(config, "ewc", args.out / "run", baselines=True)
    tasks = [TaskSpec.from_dict(t) for t in results.tasks]
    model = build_model(config, tasks)  # latency needs no weights
    parts = {part: sum(p.numel() for p in params) for part, params in model.parameter_groups().items()}
    latency = inference_latency(model, tasks, config, args.repeats)
    summary = {"table1": {t.name: {"metric": t.metric, "baseline": results.baseline.get(t.name),
                                   "ewc_final": results.final[t.name], "drop": results.drop_vs_baseline.get(t.name)}
                          for t in tasks},
               "params": {"total": results.params, **parts}, "inference_ms": latency,
               "train_seconds": results.train_seconds, "baseline_train_seconds": results.baseline_train_seconds,
               "config": results.config, "versions": results.versions}
    atomic_write_json(args.out / "seed_protocol.json", summary)
    text = protocol_markdown(results.to_dict(), latency, parts)
    atomic_write_text(args.out / "seed_protocol.md", text)
    print(text)
    print(f"wrote {args.out}/seed_protocol.md, seed_protocol.json and the run in {args.out}/run/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
