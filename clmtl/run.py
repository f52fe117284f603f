"""`clmtl run`: single-task baselines, then sequential training on the stream, then the report.

Data flows one way: config -> datasets -> stream -> template (+ strategy plugins) -> metrics -> report.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import platform
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch.utils.data import Dataset

from clmtl import distributed
from clmtl.averaging import WeightAveraging
from clmtl.checkpoint import (ResumeError, clock_state, load_run_checkpoint, plugin_states, restore_plugins,
                              rng_state, save_run_checkpoint, set_clock_state, set_rng_state, task_model_states)
from clmtl.config import Config, ConfigError
from clmtl.data.files import files_benchmark
from clmtl.data.shapes import make_shapes_dataset, shapes_task
from clmtl.data.transforms import train_augmentation
from clmtl.decode import decode_detections
from clmtl.losses import MultiTaskLoss
from clmtl.metrics.forgetting import bwt, drop_vs_baseline, forgetting, forgetting_max
from clmtl.metrics.plugin import task_metrics, task_scores
from clmtl.models import UnifiedModel
from clmtl.precision import resolve_precision
from clmtl.progress import ProgressBar
from clmtl.registry import build_plugins
from clmtl.report import prediction_overlays, write_report
from clmtl.schedule import LRSchedule
from clmtl.stream import build_stream
from clmtl.tasks import CLASSIFICATION, SEGMENTATION, TASK_KINDS, TaskSpec
from clmtl.template import MultiTaskTemplate

VERSIONED_PACKAGES = ("clmtl", "torch", "torchvision", "avalanche-lib", "ultralytics", "pycocotools", "numpy")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a run is repeatable on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class Benchmark:
    """The stream plus the task descriptions its task labels index, and the raw validation datasets."""

    tasks: list[TaskSpec]
    stream: Any  # avalanche CLScenario with train_stream / test_stream
    val_sets: list[Dataset]
    """Validation datasets in task order, unwrapped (real-format ones know each sample's file: ``meta(i)``)."""


def build_benchmark(config: Config) -> Benchmark:
    """The configured benchmark as one Avalanche stream: ``shapes`` (generated from the seed, nothing downloaded)
    or ``files`` (the three datasets on disk; ``data.root`` alone selects it)."""
    data = config.data
    if config.benchmark == "files":
        loaded = files_benchmark(config)
        tasks, train, val = [d.task for d in loaded], [d.train for d in loaded], [d.val for d in loaded]
    else:
        tasks = [shapes_task(TASK_KINDS[name], name) for name in config.tasks]
        train = [make_shapes_dataset(t.kind, "train", data.train_size, data.image_size, config.seed) for t in tasks]
        val = [make_shapes_dataset(t.kind, "val", data.val_size, data.image_size, config.seed) for t in tasks]
    augmented = [train_augmentation(ds, t.kind, data.hflip, data.hue[t.name]) for ds, t in zip(train, tasks)]
    return Benchmark(tasks, build_stream(tasks, augmented, val), val)


def build_model(config: Config, tasks: Sequence[TaskSpec], initial_weights: bool = True) -> UnifiedModel:
    """A freshly initialised model; the same seed gives the same initial weights for baselines and the stream.

    ``initial_weights=False`` skips ``model.weights`` (a model about to receive a checkpoint's state: the file may
    have moved since training, and reading it would be wasted).
    """
    torch.manual_seed(config.seed)
    model = UnifiedModel(
        tasks,
        fpn_channels=config.model.fpn_channels,
        fpn_smooth=config.model.fpn_smooth,
        image_size=config.data.image_size,
        weights=config.model.weights if initial_weights else None,
        backbone=config.model.backbone,
    )
    # NHWC conv weights: the convs then return NHWC maps for NCHW images too, so inputs need no conversion
    return model.to(memory_format=torch.channels_last) if config.train.channels_last else model


def make_optimizer(config: Config, model: UnifiedModel) -> torch.optim.Optimizer:
    """The configured optimizer with one named parameter group per model part (backbone, neck, head).

    All groups start at ``train.lr``; the groups let plugins (``layerlr``) give each part its own rate.
    """
    train = config.train
    groups = [{"params": params, "name": name} for name, params in model.parameter_groups().items()]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=0.9, weight_decay=train.weight_decay)
    optimizer_class = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=train.lr, weight_decay=train.weight_decay)


def make_decoder(config: Config, model: UnifiedModel):
    """Raw detection output -> per-image boxes, with the config's ``eval`` thresholds and the model's anchors."""
    return functools.partial(
        decode_detections,
        layout=model.anchor_layout,
        score_threshold=config.eval.score_threshold,
        iou_threshold=config.eval.iou_threshold,
        max_detections=config.eval.max_detections,
    )


def build_strategy(strategy: str, config: Config, benchmark: Benchmark) -> list:
    """The plugins of ``strategy`` with the config's parameters; those that need the stream (joint) get it."""
    plugins = build_plugins(strategy, config.strategy)
    for plugin in plugins:
        if hasattr(plugin, "bind_benchmark"):
            plugin.bind_benchmark(benchmark)
    return plugins


def recipe_plugins(config: Config) -> list:
    """The stateful plugins of the training recipe (weight averaging), which go before a strategy's plugins: those
    see the averaged weights at the end of an experience, and run checkpoints keep their state with the strategy's."""
    ema = config.train.ema
    return [WeightAveraging(ema, config.train.ema_tau)] if ema else []


def make_schedule(config: Config) -> LRSchedule | None:
    """The learning-rate schedule plugin, or None for a constant rate without warmup."""
    train = config.train
    if train.schedule == "constant" and train.warmup == 0:
        return None
    return LRSchedule(cosine=train.schedule == "cosine", warmup_epochs=train.warmup)


def make_template(config: Config, model: UnifiedModel, tasks: Sequence[TaskSpec], plugins: list, loggers: list,
                  label: str = "", progress: bool = True) -> MultiTaskTemplate:
    """The Avalanche template with our criterion, metrics and (``progress``, on the main process) progress bar."""
    from avalanche.training.plugins import EvaluationPlugin

    evaluator = EvaluationPlugin(*task_metrics(tasks, make_decoder(config, model)), loggers=loggers)
    schedule = make_schedule(config)
    template = MultiTaskTemplate(
        model=model,
        optimizer=make_optimizer(config, model),
        criterion=MultiTaskLoss(model.anchor_layout),
        train_mb_size=config.train.batch_size,
        eval_mb_size=config.train.eval_batch_size,
        train_epochs=1,
        device="cpu",
        plugins=[*plugins, *([schedule] if schedule else []),
                 ProgressBar(label, disable=None if progress and distributed.is_main_process() else True)],
        evaluator=evaluator,
    )
    template.precision = resolve_precision(config.train.precision)
    return template


def train_experience(template: MultiTaskTemplate, experience, epochs: int, num_workers: int) -> float:
    """Train on one experience for ``epochs`` epochs with a fresh optimizer state; returns wall-clock seconds."""
    template.train_epochs = epochs
    template.train(experience, num_workers=num_workers, reset_optimizer_state=True)
    return template.experience_seconds


@dataclass
class Baselines:
    """Single-task results: every metric of each task, and the training seconds of each."""

    scores: dict[str, dict[str, float]]
    seconds: dict[str, float]


def single_task_baselines(config: Config, benchmark: Benchmark, loggers: list,
                          only: Sequence[str] | None = None, progress: bool = True) -> Baselines:
    """Each task (or those named in ``only``) trained alone from the same initial weights with the same budget: the
    reference for drops."""
    scores, seconds = {}, {}
    for label, task in enumerate(benchmark.tasks):
        if only is not None and task.name not in only:
            continue
        model = build_model(config, benchmark.tasks)
        template = make_template(config, model, benchmark.tasks, recipe_plugins(config), loggers, label="baseline ",
                                 progress=progress)
        seconds[task.name] = train_experience(template, benchmark.stream.train_stream[label],
                                              config.train.epochs[task.name], config.data.num_workers)
        metrics = template.eval([benchmark.stream.test_stream[label]])
        scores[task.name] = task_scores(metrics, benchmark.tasks)[label]
    return Baselines(scores, seconds)


def baselines_alone(config: Config, log: TextIO, only: Sequence[str] | None = None,
                    progress: bool = True) -> tuple[Baselines, list[TaskSpec]]:
    """``single_task_baselines`` in a process of their own (the run's second process, benchmark workers), with the
    config's threads and the data and seeds rebuilt as ``run`` builds them, so the scores equal ``clmtl run``'s with
    the same threads; returns them and the tasks, the text log going to ``log``."""
    from avalanche.logging import TextLogger

    torch.set_num_threads(config.train.threads)
    seed_everything(config.seed)
    benchmark = build_benchmark(config)
    return single_task_baselines(config, benchmark, [TextLogger(log)], only, progress), benchmark.tasks


def _baselines_beside(config: Config) -> tuple[Baselines, str]:
    """``baselines_alone`` in ``BackgroundBaselines``'s process, ended with its parent; returns them and their log."""
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    log = io.StringIO()
    baselines, _ = baselines_alone(config, log, progress=False)
    return baselines, log.getvalue()


def _exit_with_parent(parent: int) -> None:
    """End this process once ``parent`` is gone: a run killed outright (SIGKILL) runs no cleanup that would stop it,
    and orphaned baselines would only waste the cores."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def baseline_threads(config: Config) -> int:
    """Threads of the single-task baselines when they train in a second process beside the stream, else 0.

    On this machine a training step runs only 1.2-1.6x faster on 2 threads than on 1 (README, Training speed), so two
    1-thread trainings side by side (baselines and stream) finish sooner than one 2-thread training after the other.
    The stream keeps the other threads whether or not the run trains baselines (``--no-baselines``, resumed runs):
    its numbers depend on its thread count, and must not depend on the baselines.
    """
    if not config.train.parallel_baselines or distributed.is_distributed():
        return 0
    return config.train.threads // 2


class BackgroundBaselines:
    """The single-task baselines, trained in a spawned process while this one trains the stream.

    ``close`` stops that process: an error or a stop in the stream must not leave it running.
    """

    def __init__(self, config: Config, threads: int) -> None:
        self._pool = get_context("spawn").Pool(1)
        own_threads = dataclasses.replace(config, train=dataclasses.replace(config.train, threads=threads))
        self._job = self._pool.apply_async(_baselines_beside, (own_threads,))

    def ready(self) -> bool:
        return self._job.ready()

    def result(self) -> tuple[Baselines, str]:
        """The baselines and their log, once trained (an error in their process is raised here)."""
        result = self._job.get()
        self._pool.close()  # the process then exits by itself, releasing what it holds (tqdm's lock)
        self._pool.join()
        return result

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()


def make_loggers(config: Config, out_dir: Path, log_file) -> list:
    """Every metric to OUT/metrics.csv and the text log (and TensorBoard when asked)."""
    from avalanche.logging import TensorboardLogger, TextLogger

    from clmtl.csv_logger import MetricsCSVLogger

    loggers = [MetricsCSVLogger(out_dir / "metrics.csv"), TextLogger(log_file)]
    if config.output.tensorboard:
        loggers.append(TensorboardLogger(out_dir / "tensorboard"))
    return loggers


def run(config: Config, strategy: str, out_dir: str | Path, baselines: bool | Baselines = True,
        resume: bool = False) -> dict:
    """Baselines, then the stream with ``strategy``; writes the report into ``out_dir`` and returns results.

    ``baselines``: True trains them, False skips them, a ``Baselines`` reuses ones trained before with the same
    config and seed (benchmark scripts share them between strategies). ``resume`` continues the interrupted run in
    ``out_dir`` after its last finished experience (``clmtl.checkpoint``); config and strategy must be the run's.

    In a process group (``torchrun``, see ``clmtl.distributed``) every process trains its share and gets the same
    results; only rank 0 writes to ``out_dir``.
    """
    from avalanche.logging import TextLogger

    start = time.perf_counter()
    out_dir = Path(out_dir)
    writes = distributed.is_main_process()
    processes = distributed.world_size()
    if config.train.batch_size % processes:
        raise ConfigError(f"train.batch_size={config.train.batch_size} must be a multiple of the {processes} "
                          "processes: each process takes an equal share of every batch")
    saved = _resumable_checkpoint(out_dir, config, strategy) if resume else None
    if writes:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.train.threads)
    seed_everything(config.seed)
    benchmark = build_benchmark(config)
    tasks = benchmark.tasks
    if saved is None and writes:
        (out_dir / "metrics.csv").unlink(missing_ok=True)  # a rerun into the same folder starts a fresh log
    log_path = out_dir / "log.txt" if writes else Path(os.devnull)
    background, threads = None, {"stream": config.train.threads - baseline_threads(config), "baselines": None}
    with open(log_path, "a" if saved else "w") as log_file, contextlib.ExitStack() as cleanup:
        if saved is not None and saved["baselines"] is not None:
            baselines = Baselines(**saved["baselines"])
        elif baselines is True and baseline_threads(config):
            threads["baselines"] = baseline_threads(config)
            background = BackgroundBaselines(config, threads["baselines"])
            cleanup.callback(background.close)
            if writes:
                print(f"single-task baselines: training in a second process beside the stream ({threads['baselines']}"
                      f" + {threads['stream']} threads)", flush=True)
            baselines = None  # until that process delivers them
        elif baselines is True:
            threads["baselines"] = config.train.threads
            log_file.write("== single-task baselines ==\n")
            baselines = single_task_baselines(config, benchmark, [TextLogger(log_file)])
        else:
            baselines = baselines or Baselines({}, {})
        log_file.write(f"== sequential training, strategy {strategy} ==\n")
        torch.set_num_threads(threads["stream"])
        seed_everything(config.seed)
        model = build_model(config, tasks)
        plugins = [*recipe_plugins(config), *build_strategy(strategy, config, benchmark)]
        loggers = make_loggers(config, out_dir, log_file) if writes else []
        template = make_template(config, model, tasks, plugins, loggers)
        matrix: list[list[float | None]] = []
        train_seconds: dict[str, float] = {}
        per_task: list[dict[str, float]] = []
        finished = -1  # the last experience trained and evaluated
        if saved is not None:
            model.load_state_dict(saved["model"])
            matrix, train_seconds, per_task, finished = (saved["matrix"], saved["train_seconds"], saved["scores"],
                                                         saved["experience"])
            if "partial" in saved:  # stopped inside experience finished + 1: the template continues it
                template.resume_point = {**saved["partial"],
                                         "restore": lambda: restore_plugins(plugins, saved["plugins"], model)}
                log_file.write(f"== resumed inside experience {finished + 1} (epoch {saved['partial']['epoch']}, "
                               f"iteration {saved['partial']['iteration']}) ==\n")
            else:
                restore_plugins(plugins, saved["plugins"], model)
                set_clock_state(template.clock, saved["clock"])
                set_rng_state(saved["rng"])
                log_file.write(f"== resumed after experience {finished} ==\n")

        def snapshot() -> dict:
            """Everything resuming needs, as of now; `clmtl export` also rebuilds the model from it without data."""
            return {"model": model.state_dict(), "experience": finished, "matrix": matrix, "scores": per_task,
                    "train_seconds": train_seconds,
                    "baselines": None if baselines is None else {"scores": baselines.scores,
                                                                 "seconds": baselines.seconds},
                    "plugins": plugin_states(plugins), "task_states": task_model_states(plugins),
                    "clock": clock_state(template.clock), "rng": rng_state(),
                    "config": config.to_dict(), "strategy": strategy, "tasks": [t.as_dict() for t in tasks]}

        checkpoints = config.output.checkpoints and writes
        if checkpoints:
            template.checkpoint_every = config.output.checkpoint_every
            template.on_checkpoint = lambda position: save_run_checkpoint(
                {**snapshot(), "partial": position}, out_dir / "checkpoints", None)
        for label, experience in enumerate(benchmark.stream.train_stream):
            if label <= finished:
                continue
            task = tasks[label]
            train_seconds[task.name] = train_experience(
                template, experience, config.train.epochs[task.name], config.data.num_workers
            )
            if distributed.is_distributed():
                distributed.broadcast_plugin_states(plugins, model)
            per_task = task_scores(template.eval(benchmark.stream.test_stream), tasks)
            matrix.append([per_task[j][t.metric] for j, t in enumerate(tasks)])
            finished = label
            if checkpoints:
                save_run_checkpoint(snapshot(), out_dir / "checkpoints", label)
        if background is not None:
            if writes and not background.ready():
                print("waiting for the single-task baselines...", flush=True)
            baselines, baseline_log = background.result()
            log_file.write(f"== single-task baselines (trained beside the stream) ==\n{baseline_log}")
            if checkpoints:  # the last checkpoint, now with them: resuming a finished run needs no retraining
                save_run_checkpoint(snapshot(), out_dir / "checkpoints", finished)

    torch.set_num_threads(config.train.threads)  # the run's threads again, for the caller (the stream had a share)
    final_scores = {t.name: per_task[j] for j, t in enumerate(tasks)}
    measured = {"train_seconds": train_seconds, "baseline_train_seconds": baselines.seconds,
                "memory_bytes": sum(getattr(plugin, "memory_bytes", 0) for plugin in plugins),
                "strategy_stats": {type(p).__name__: p.stats() for p in plugins if hasattr(p, "stats")},
                "total_seconds": time.perf_counter() - start, "processes": processes,
                "threads": threads,
                "precision": template.precision}
    results = assemble_results(config, strategy, tasks, matrix, final_scores, baselines.scores, model, measured)
    if not writes:
        return results
    write_report(results, out_dir)
    if config.output.overlays:
        draw_overlays(model, benchmark, config, out_dir / "plots")
    return results


def _resumable_checkpoint(out_dir: Path, config: Config, strategy: str) -> dict:
    """The run's last checkpoint, if it belongs to this config and strategy."""
    saved = load_run_checkpoint(out_dir)
    if saved["strategy"] != strategy:
        raise ResumeError(f"{out_dir} holds a run of strategy {saved['strategy']!r}, not {strategy!r}")
    if saved["config"] != config.to_dict():
        raise ResumeError(f"{out_dir} holds a run with another config; resume with the run's own config")
    return saved


def assemble_results(config: Config, strategy: str, tasks: Sequence[TaskSpec], matrix: list[list[float | None]],
                     final_scores: dict[str, dict[str, float]], baseline_scores: dict[str, dict[str, float]],
                     model: torch.nn.Module, measured: dict[str, Any]) -> dict:
    """The results.json contract of DESIGN.md; ``measured`` holds timings and the strategy's memory."""
    names = [t.name for t in tasks]
    versions = package_versions()
    final = {t.name: final_scores[t.name][t.metric] for t in tasks}
    baseline = {t.name: baseline_scores[t.name][t.metric] for t in tasks if t.name in baseline_scores}

    def secondary(scores: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        return {t.name: {m: scores[t.name][m] for m in t.extra_metrics} for t in tasks if t.name in scores}

    return {
        "clmtl_version": versions["clmtl"],
        "config": config.to_dict(),
        "seed": config.seed,
        "benchmark": config.benchmark,
        "strategy": strategy,
        "tasks": [t.as_dict() for t in tasks],
        "matrix": matrix,
        "baseline": baseline,
        "final": final,
        "extra": {"baseline": secondary(baseline_scores), "final": secondary(final_scores)},
        "forgetting": dict(zip(names, forgetting(matrix))),
        "forgetting_max": dict(zip(names, forgetting_max(matrix))),
        "bwt": bwt(matrix),
        "drop_vs_baseline": drop_vs_baseline(final, baseline) if baseline else {},
        "params": sum(p.numel() for p in model.parameters()),
        **measured,
        "versions": versions,
    }


@torch.inference_mode()
def draw_overlays(model: UnifiedModel, benchmark: Benchmark, config: Config, plot_dir: Path) -> None:
    """A few validation images per task with what the final model predicts on them."""
    model.eval()
    count = config.output.overlays
    for label, task in enumerate(benchmark.tasks):
        dataset = benchmark.val_sets[label]
        samples = [dataset[i] for i in range(min(count, len(dataset)))]
        images = torch.stack([s[0] for s in samples])
        output = model(images, label)
        if task.kind == SEGMENTATION:
            predictions = list(output.argmax(1))
        elif task.kind == CLASSIFICATION:
            predictions = output.argmax(1).tolist()
        else:
            predictions = decode_detections(output, model.anchor_layout, score_threshold=0.3,
                                            iou_threshold=config.eval.iou_threshold)
        prediction_overlays(images, predictions, task.kind, task.classes, plot_dir / f"predictions_{task.name}.png",
                            targets=[s[1] for s in samples])
