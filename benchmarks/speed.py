"""What multi-task inference and continual training cost on this machine, measured in one run.

    python benchmarks/speed.py                                  # 512 px inference, 128 px training, OUT=runs/speed
    python benchmarks/speed.py --repeats 50 --threads 1 --profile --compile
    python benchmarks/speed.py model.fpn_smooth=false          # config overrides apply to every model timed

Inference (batch 1, eval mode, ``torch.inference_mode``): the bare backbone (YOLOv8n layers 0-9), each single-task
forward ``model(x, label)``, ``forward_all`` alone (also of a model with ten classification heads, against one of its
heads alone) and as the deployed pipeline (``forward_all`` + detection decode
and NMS + segmentation / classification class maps), each for the eager model, the BatchNorm-folded one
(``clmtl.models.fuse``) in NCHW and in channels_last (the deployed variant); then the post-processing parts alone.
Decoding runs at the configured ``eval.score_threshold`` and at 0 (the worst case: ``PRE_NMS_TOP_K`` candidates
reach NMS), because its cost depends on how many candidates pass — and a randomly initialised model's scores sit
below the configured threshold, so the first is a lower bound and the second an upper one.

Training: one step (forward, loss, the strategy's ``before_backward`` terms, backward, update) of each strategy
on the detection task after one real experience of segmentation (so EWC has its Fisher, replay its memory, LwF
its teacher), with ``clmtl run``'s own template (``clmtl.builders.make_template``) driven by Avalanche's own
``training_epoch`` one pre-loaded mini-batch at a time, so data loading of the current batch is not timed
(joint's and replay's extra batches, drawn inside the step, are).

Every timed case runs interleaved with the others (round-robin over cases, after warm-up), so a change in
background load hits all cases alike and the ratios stay meaningful; medians and inter-quartile ranges resist the
remaining spikes. Writes OUT/speed.md and OUT/speed.json; ``--profile`` adds OUT/profile.txt.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from clmtl.builders import build_model, build_strategy, make_template  # noqa: E402
from clmtl.training.seeding import seed_everything  # noqa: E402
from clmtl.config import load_config  # noqa: E402
from clmtl.data.shapes import shapes_task  # noqa: E402
from clmtl.io import atomic_write_json, atomic_write_text  # noqa: E402
from clmtl.models.decode import PRE_NMS_TOP_K, class_indices, decode_detections, predict  # noqa: E402
from clmtl.models.fuse import fuse_batchnorm  # noqa: E402
from clmtl.stream.benchmark import build_benchmark  # noqa: E402
from clmtl.stream.tasks import CLASSIFICATION, DETECTION, TASK_KINDS, TaskSpec  # noqa: E402
from clmtl.studies.timing import time_interleaved  # noqa: E402
from clmtl.training.devices import device_name, resolve_device  # noqa: E402
from clmtl.training.registry import strategy_schemas  # noqa: E402

VARIANTS = {"eager": "eager", "fused": "BN folded", "fused_cl": "BN folded + channels_last"}
STRATEGIES = ("naive", "ewc", "replay", "lwf", "joint", "routing")
RATIOS = {
    # name: (numerator, denominator, target or None); keys of "latency" (inference) or "train" (training steps)
    "pipeline_over_backbone": ("eager/pipeline", "eager/backbone", 1.35),
    "deployed_pipeline_over_backbone": ("fused_cl/pipeline", "fused_cl/backbone", 1.35),
    "deployed_pipeline_over_eager_backbone": ("fused_cl/pipeline", "eager/backbone", None),
    "forward_all_over_backbone": ("eager/forward_all", "eager/backbone", None),
    "worst_pipeline_over_backbone": ("eager/pipeline_worst", "eager/backbone", None),
    "decode_share": ("decode", "eager/pipeline", 0.10),
    "ten_heads_forward_all_over_one_head": ("heads10/forward_all", "heads10/one_head", 1.10),
    "decode_share_worst": ("decode_worst", "eager/pipeline_worst", None),
    "class_maps_share": ("class_maps", "eager/pipeline", None),
    "argmax_over_max": ("class_maps_argmax", "class_maps", None),
    "fold_speedup": ("eager/pipeline", "fused/pipeline", None),
    "channels_last_speedup": ("fused/pipeline", "fused_cl/pipeline", None),
    "compile_speedup": ("fused_cl/pipeline", "compiled/pipeline", None),
    "ewc_over_naive": ("ewc", "naive", 1.10),
    "replay_over_naive": ("replay", "naive", None),
    "lwf_over_naive": ("lwf", "naive", None),
    "joint_over_naive": ("joint", "naive", None),
    "routing_over_naive": ("routing", "naive", None),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=512, help="inference input side (default 512)")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per case (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per case first (default 5)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    parser.add_argument("--train-image-size", type=int, default=128, help="training input side (default 128)")
    parser.add_argument("--train-batch-size", type=int, default=16, help="training mini-batch (default 16)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the deployed (folded, channels_last) forward_all")
    parser.add_argument("--profile", action="store_true",
                        help="print (and write OUT/profile.txt) the top ops of the eager and deployed pipelines")
    parser.add_argument("--out", type=Path, default=Path("runs/speed"), help="output folder (default runs/speed)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. model.fpn_smooth=false")
    args = parser.parse_args(argv)
    for size in (args.image_size, args.train_image_size):
        if size < 64 or size % 32:
            parser.error(f"image sizes must be multiples of 32 and >= 64, got {size}")
    if args.repeats < 1 or args.warmup < 0 or args.train_batch_size < 1:
        parser.error("--repeats and --train-batch-size must be >= 1, --warmup >= 0")
    return args


# ------------------------------------------------------------------------------------------------ measuring

def machine() -> dict[str, Any]:
    """Where the numbers come from: they mean little without it."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call as torch counts them (2 per multiply-add; convolutions and matmuls only)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def model_flops(model, x: torch.Tensor) -> dict[str, int]:
    """FLOPs of each timed forward, and forward_all's split into backbone, neck and head."""
    counts = {"backbone": flops(lambda: model.backbone(x)), "forward_all": flops(lambda: model.forward_all(x)),
              **{space.name: flops(lambda i=i: model(x, i)) for i, space in enumerate(model.spaces)}}
    neck = flops(lambda: model.neck(model.backbone(x))) - counts["backbone"]
    counts["forward_all_neck"] = neck
    counts["forward_all_head"] = counts["forward_all"] - counts["backbone"] - neck
    return counts


# ------------------------------------------------------------------------------------------------ inference

def postprocess(model, outputs: dict, decode_kwargs: dict) -> dict:
    """What a deployment does with forward_all's outputs: boxes after NMS, class maps, class ids."""
    decode = functools.partial(decode_detections, layout=model.anchor_layout, **decode_kwargs)
    return {head: predict(output, model.head_kinds[head], decode) for head, output in outputs.items()}


def ten_heads(config):
    """A model of ten two-class classification tasks, each with its own head (task scenario): ``forward_all`` runs
    the backbone and the coarsest pyramid level once for all of them."""
    tasks = [TaskSpec(f"cls{i}", CLASSIFICATION, ("a", "b")) for i in range(10)]
    return build_model(config, tasks).eval()


def inference_cases(models: dict, x: torch.Tensor, decode: dict, worst: dict) -> dict[str, Callable[[], Any]]:
    """Every timed inference call: each variant's forwards and pipeline, and the post-processing parts alone."""
    eager = models["eager"]
    outputs = eager.forward_all(x)
    det = [label for label, space in enumerate(eager.spaces) if space.kind == DETECTION]
    dense = [label for label in outputs if label not in det]
    cases: dict[str, Callable[[], Any]] = {
        "decode": lambda: [decode_detections(outputs[i], eager.anchor_layout, **decode) for i in det],
        "decode_worst": lambda: [decode_detections(outputs[i], eager.anchor_layout, **worst) for i in det],
        "class_maps": lambda: [class_indices(outputs[i]) for i in dense],
        "class_maps_argmax": lambda: [outputs[i].argmax(1) for i in dense],
        "eager/pipeline_worst": lambda: postprocess(eager, eager.forward_all(x), worst),
    }
    heads = models["heads10"]
    cases["heads10/forward_all"] = lambda: heads.forward_all(x)
    cases["heads10/one_head"] = lambda: heads(x, 0)
    for variant, model in ((v, m) for v, m in models.items() if v in VARIANTS):
        cases[f"{variant}/backbone"] = lambda m=model: m.backbone(x)
        for label, space in enumerate(model.spaces):
            cases[f"{variant}/{space.name}"] = lambda m=model, t=label: m(x, t)
        cases[f"{variant}/forward_all"] = lambda m=model: m.forward_all(x)
        cases[f"{variant}/pipeline"] = lambda m=model: postprocess(m, m.forward_all(x), decode)
    return cases


def compiled_case(fused, x: torch.Tensor, decode: dict) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """``torch.compile`` of the deployed (folded, channels_last) ``forward_all`` (NMS stays eager), or why it failed."""
    try:
        compiled = torch.compile(fused.forward_all)
        start = time.perf_counter()
        postprocess(fused, compiled(x), decode)  # the first call compiles
        seconds = time.perf_counter() - start
    except Exception as error:  # no compiler, no network, unsupported op...: report, do not stop the benchmark
        return {}, {"ok": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    return {"compiled/pipeline": lambda: postprocess(fused, compiled(x), decode)}, {"ok": True, "compile_s": seconds}


def profile_table(model, x: torch.Tensor, decode: dict, rows: int = 20) -> str:
    """Top ops by self CPU time over five pipeline calls of ``model``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            postprocess(model, model.forward_all(x), decode)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ------------------------------------------------------------------------------------------------ training

def trained_template(strategy: str, config, benchmark):
    """``clmtl run``'s template for ``strategy`` after training the first experience, set up on the second."""
    seed_everything(config.seed)
    model = build_model(config, benchmark.tasks)
    plugins = build_strategy(strategy, config, benchmark)
    with warnings.catch_warnings():  # "no loggers specified": none are wanted here
        warnings.simplefilter("ignore", UserWarning)
        template = make_template(config, model, benchmark.tasks, plugins, loggers=[])
    template.train_epochs = 1
    stream = benchmark.stream.train_stream
    template.train(stream[0])  # EWC's Fisher, replay's memory, LwF's teacher come from this experience
    # What Avalanche's train() does before its epochs, for the second experience:
    template.is_training, template._stop_training = True, False
    template.model.train()
    template.experience = stream[1]
    template._before_training_exp()
    return template


def synchronized(case: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``case`` waiting for the GPU to finish what it queued, so the time measured is the work's, not the queueing's."""
    if device.type != "cuda":
        return case

    def timed() -> Any:
        result = case()
        torch.cuda.synchronize(device)
        return result

    return timed


def train_step(template, batch) -> None:
    """One step of Avalanche's own training loop (``training_epoch`` over a one-batch loader)."""
    template.dataloader = [batch]
    template.training_epoch()


def training_config(image_size: int, batch_size: int, overrides: Sequence[str] = ()):
    """The default run's config (with ``overrides``) with two mini-batches of data per task."""
    sizes = [f"data.image_size={image_size}", f"train.batch_size={batch_size}",
             f"data.train_size={2 * batch_size}", "data.val_size=2"]
    return load_config(None, [*overrides, *sizes], strategies=strategy_schemas())


def training_cases(args: argparse.Namespace) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """One training step of each strategy, and what was timed."""
    config = training_config(args.train_image_size, args.train_batch_size, [*args.overrides,
                                                                             f"train.device={args.device}"])
    benchmark = build_benchmark(config)
    device = resolve_device(args.device)
    cases = {}
    for strategy in STRATEGIES:
        template = trained_template(strategy, config, benchmark)
        batches = itertools.cycle(list(template.dataloader))
        cases[strategy] = synchronized(lambda t=template, b=batches: train_step(t, next(b)), device)
    tasks = [t.name for t in benchmark.tasks]
    setting = {"image_size": args.train_image_size, "batch_size": args.train_batch_size, "timed_task": tasks[1],
               "after": tasks[0], "optimizer": config.train.optimizer}
    return cases, setting


# ------------------------------------------------------------------------------------------------ report

def ratios(latency: dict[str, dict], train: dict[str, dict]) -> dict[str, dict]:
    """Each ratio of two reported medians, with its target where ``TARGETS`` sets one."""
    medians = {name: entry["median_ms"] for name, entry in {**latency, **train}.items()}
    out = {}
    for name, (numerator, denominator, target) in RATIOS.items():
        if numerator in medians and denominator in medians:
            value = medians[numerator] / medians[denominator]
            out[name] = {"value": value, "numerator": numerator, "denominator": denominator, "target": target,
                         "met": None if target is None else value <= target}
    return out


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    size = s["image_size"]
    load = (f"; 1-min load average {m['load_average_start'][0]:.2f} at start, {m['load_average_end'][0]:.2f} at end"
            if m["load_average_start"] else "")
    lines = [
        f"# Speed — {result['date']}",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} logical CPUs), {m['platform']}, Python {m['python']}, "
        f"torch {m['torch']}, torch threads: {m['threads']}{load}.",
        "",
        f"## Inference: batch 1, {size}×{size}, eval mode, `torch.inference_mode`",
        "",
        f"Median ms (IQR) over {s['repeats']} interleaved runs after {s['warmup']} warm-up runs. *pipeline* = "
        f"forward_all + detection decode and NMS (score ≥ {s['score_threshold']}, IoU {s['iou_threshold']}) + class "
        "maps (max over classes) of the segmentation and classification logits. GFLOPs as "
        "`torch.utils.flop_counter` counts them (2 per multiply-add).",
        "",
        "| forward | GFLOPs | " + " | ".join(VARIANTS.values()) + " |",
        "|---|---:|" + "---:|" * len(VARIANTS),
    ]
    lat = result["latency"]

    def cell(key: str) -> str:
        return f"{lat[key]['median_ms']:.1f} ({lat[key]['iqr_ms']:.1f})" if key in lat else "–"

    for row, label in [("backbone", "backbone (YOLOv8n layers 0–9)"),
                       *[(t, f"`model(x, {i})` ({t})") for i, t in enumerate(s["tasks"])],
                       ("forward_all", "`forward_all`"), ("pipeline", "pipeline (forward_all + decode + class maps)")]:
        gflops = result["flops"].get(row)
        lines.append(f"| {label} | {'' if gflops is None else f'{gflops / 1e9:.2f}'} | "
                     + " | ".join(cell(f"{v}/{row}") for v in VARIANTS) + " |")
    f = result["flops"]
    lines += [
        "",
        f"forward_all's GFLOPs: backbone {f['backbone'] / 1e9:.2f}, neck {f['forward_all_neck'] / 1e9:.2f}, "
        f"head {f['forward_all_head'] / 1e9:.2f}.",
        "",
        f"Post-processing alone (on the eager outputs): detection decode + NMS {cell('decode')} ms at the configured "
        f"threshold ({result['detections']['configured']} detections kept); worst case (threshold 0: all "
        f"{PRE_NMS_TOP_K} top candidates reach NMS) {cell('decode_worst')} ms, its pipeline "
        f"{cell('eager/pipeline_worst')} ms. Class maps (segmentation + classification) {cell('class_maps')} ms with "
        f"`max(1).indices`, {cell('class_maps_argmax')} ms with `argmax(1)`.",
    ]
    if "compile" in result:
        c = result["compile"]
        lines.append(f"`torch.compile` (folded channels_last forward_all): pipeline {cell('compiled/pipeline')} ms, "
                     f"compiled in {c['compile_s']:.0f} s." if c["ok"] else f"`torch.compile` failed: {c['error']}")
    t = result["train_settings"]
    lines += [
        "",
        f"## Training step: batch {t['batch_size']}, {t['image_size']} px, task {t['timed_task']} after one "
        f"experience of {t['after']} ({t['optimizer']})",
        "",
        "| strategy | median ms (IQR) | images/s | × naive |",
        "|---|---:|---:|---:|",
    ]
    naive = result["train"]["naive"]["median_ms"]
    for name, entry in result["train"].items():
        lines.append(f"| {name} | {entry['median_ms']:.0f} ({entry['iqr_ms']:.0f}) | {entry['images_per_s']:.1f} | "
                     f"{entry['median_ms'] / naive:.2f} |")
    lines += ["", "## Parameters", "", "| part | parameters |", "|---|---:|"]
    lines += [f"| {part} | {count:,} |" for part, count in result["params"].items()]
    lines += ["", "## Ratios (of the medians above)", "", "| ratio | value | target | met |", "|---|---:|---:|---|"]
    for name, r in result["ratios"].items():
        target = "" if r["target"] is None else f"≤ {r['target']:.2f}"
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {name} = {r['numerator']} / {r['denominator']} | {r['value']:.3f} | {target} | {met} |")
    return "\n".join(lines) + "\n"


def measure_inference(args: argparse.Namespace) -> dict[str, Any]:
    """Parameters, FLOPs, latencies (and the profile) of the default model at ``args.image_size``."""
    config = load_config(None, [*args.overrides, f"data.image_size={args.image_size}"],
                         strategies=strategy_schemas())
    model = build_model(config, [shapes_task(TASK_KINDS[name], name) for name in config.tasks]).eval()
    decode = {"score_threshold": config.eval.score_threshold, "iou_threshold": config.eval.iou_threshold,
              "max_detections": config.eval.max_detections}
    worst = {**decode, "score_threshold": 0.0}
    result: dict[str, Any] = {
        "settings": {"image_size": args.image_size, "overrides": list(args.overrides), "repeats": args.repeats,
                     "device": device_name(resolve_device(args.device)),
                     "warmup": args.warmup, "tasks": [space.name for space in model.spaces], **decode},
        "params": {"total": sum(p.numel() for p in model.parameters()),
                   **{part: sum(p.numel() for p in params) for part, params in model.parameter_groups().items()}},
    }
    device = resolve_device(args.device)
    x = torch.rand(1, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0)).to(device)
    model.to(device)
    models = {"eager": model, "fused": fuse_batchnorm(model, channels_last=False),
              "fused_cl": fuse_batchnorm(model, channels_last=True), "heads10": ten_heads(config).to(device)}
    with torch.inference_mode():
        result["flops"] = model_flops(model, x)
        det_output = model.forward_all(x)[[space.kind for space in model.spaces].index(DETECTION)]
        result["detections"] = {name: sum(len(d["boxes"]) for d in decode_detections(det_output, model.anchor_layout,
                                                                                      **kwargs))
                                for name, kwargs in (("configured", decode), ("worst", worst))}
        cases = {name: synchronized(case, device) for name, case in inference_cases(models, x, decode, worst).items()}
        if args.compile:
            compiled, result["compile"] = compiled_case(models["fused_cl"], x, decode)
            cases.update(compiled)
        print(f"timing {len(cases)} inference cases x {args.warmup}+{args.repeats} runs...", file=sys.stderr)
        result["latency"] = {name: latency.as_dict()
                             for name, latency in time_interleaved(cases, args.repeats, args.warmup).items()}
        if args.profile:
            tables = [f"## {VARIANTS[v]} model: forward_all + decode + class maps, top ops by self CPU time\n\n"
                      + profile_table(models[v], x, decode) for v in ("eager", "fused_cl")]
            print("\n".join(tables))
            args.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out / "profile.txt", "\n".join(tables))
    return result


def measure_training(args: argparse.Namespace) -> dict[str, Any]:
    """Step times and throughput of every strategy, interleaved."""
    print(f"training {len(STRATEGIES)} strategies for one experience, then timing their steps...", file=sys.stderr)
    cases, settings = training_cases(args)
    train = {}
    for name, latency in time_interleaved(cases, args.repeats, args.warmup).items():
        entry = latency.as_dict()
        entry["images_per_s"] = args.train_batch_size / (entry["median_ms"] / 1000)
        train[name] = entry
    return {"train_settings": settings, "train": train}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                              "machine": machine()}
    result.update(measure_inference(args))
    result.update(measure_training(args))
    result["ratios"] = ratios(result["latency"], result["train"])
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    atomic_write_json(args.out / "speed.json", result)
    text = markdown(result)
    atomic_write_text(args.out / "speed.md", text)
    print(text)
    print(f"wrote {args.out / 'speed.md'} and {args.out / 'speed.json'}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
