"""Config -> the parts of a run, each built in one place: model, optimizer, detection decoder, strategy plugins,
learning-rate schedule, loggers and the Avalanche template that joins them.

The benchmark (the stream) is built by ``clmtl.stream.benchmark``; ``clmtl.runner`` puts the parts together.
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from avalanche.logging import TensorboardLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin

from clmtl.config import CLASSIFIER_NAMES, Config
from clmtl.errors import ConfigError
from clmtl.metrics.plugin import task_metrics
from clmtl.models.unified import UnifiedModel
from clmtl.models.classifier import build_classifier
from clmtl.models.decode import decode_detections
from clmtl.models.heads import HeadedModel
from clmtl.models.user import UserModelError, user_model
from clmtl.report.csv_logger import MetricsCSVLogger
from clmtl.stream.benchmark import Benchmark
from clmtl.stream.scenario import output_spaces
from clmtl.stream.tasks import TaskSpec
from clmtl.training import distributed
from clmtl.training.averaging import WeightAveraging
from clmtl.training.devices import resolve_device
from clmtl.training.losses import MultiTaskLoss
from clmtl.training.plugin import Plugin
from clmtl.training.precision import resolve_precision
from clmtl.training.progress import ProgressBar
from clmtl.training.registry import build_plugins, check_stream
from clmtl.training.schedule import LRSchedule
from clmtl.training.template import MultiTaskTemplate


def build_model(config: Config, tasks: Sequence[TaskSpec], initial_weights: bool = True,
                module: torch.nn.Module | None = None) -> HeadedModel:
    """A freshly initialised model; the same seed gives the same initial weights for baselines and the stream.

    ``model.backbone`` picks the unified model (yolov8n ...) or one of the papers' classifiers (mlp,
    reduced_resnet18, ``clmtl.models.classifier``); ``module``, a user's own module, replaces both: a copy of it is
    the model, as initialised (``clmtl.models.user``). ``initial_weights=False`` skips ``model.weights`` (a model
    about to receive a checkpoint's state: the file may have moved since training, and reading it would be wasted).
    """
    torch.manual_seed(config.seed)
    spaces = output_spaces(tasks)
    if module is not None:
        try:
            model = user_model(copy.deepcopy(module), spaces)
        except UserModelError as error:
            raise ConfigError(str(error)) from None
    elif config.model.backbone in CLASSIFIER_NAMES:
        try:
            model = build_classifier(spaces, config.model.backbone, config.data.channels, config.data.image_size,
                                     config.model.hidden)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    else:
        model = UnifiedModel(
            spaces,
            fpn_channels=config.model.fpn_channels,
            fpn_smooth=config.model.fpn_smooth,
            image_size=config.data.image_size,
            weights=config.model.weights if initial_weights else None,
            backbone=config.model.backbone,
        )
    # NHWC conv weights: the convs then return NHWC maps for NCHW images too, so inputs need no conversion
    return model.to(memory_format=torch.channels_last) if config.train.channels_last else model


def make_optimizer(config: Config, model: HeadedModel) -> torch.optim.Optimizer:
    """The configured optimizer with one named parameter group per model part (backbone, neck, head).

    All groups start at ``train.lr``; the groups let plugins (``layerlr``) give each part its own rate. Rows a head
    grows later join the ``head`` group (Avalanche's ``update_optimizer`` places a new parameter by its name).
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
    """The plugins of ``strategy`` with the config's parameters; those that need the stream (joint) get it. A strategy
    that does not handle the stream's tasks (their kinds, or a check it declares:
    ``clmtl.training.registry.check_stream``) is refused first."""
    check_stream(strategy, benchmark.tasks)
    plugins = build_plugins(strategy, config.strategy)
    for plugin in plugins:
        if isinstance(plugin, Plugin):
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


def make_template(config: Config, model: HeadedModel, tasks: Sequence[TaskSpec], plugins: Sequence = (),
                  loggers: Sequence = (), label: str = "", progress: bool = True, preload: bool = False,
                  val_sets: Sequence = (), **checkpointing: Any) -> MultiTaskTemplate:
    """The Avalanche template with our criterion, metrics and (``progress``, on the main process) progress bar;
    ``val_sets`` (the stream's evaluation sets, ``Benchmark.val_sets``) let segmentation be scored at its files'
    resolution; ``preload`` (the stream's ``Benchmark.fixed_samples``) and ``checkpointing`` (``checkpoint_every``,
    ``on_checkpoint``, ``stop``) go to ``MultiTaskTemplate``.

    Training is Avalanche's: ``template.train_for(experience, epochs)`` trains one experience of the stream (its
    ``train_stream``), ``template.eval(test_stream)`` scores (``clmtl.metrics.plugin.task_scores`` reads them)."""
    evaluator = EvaluationPlugin(*task_metrics(tasks, make_decoder(config, model), datasets=val_sets),
                                 loggers=list(loggers))
    schedule = make_schedule(config)
    return MultiTaskTemplate(
        model=model,
        optimizer=make_optimizer(config, model),
        criterion=MultiTaskLoss(model.anchor_layout),
        train_mb_size=config.train.batch_size,
        eval_mb_size=config.train.eval_batch_size,
        train_epochs=1,
        device=resolve_device(config.train.device),
        plugins=[*plugins, *([schedule] if schedule else []),
                 ProgressBar(label, disable=None if progress and distributed.is_main_process() else True)],
        evaluator=evaluator,
        precision=resolve_precision(config.train.precision, resolve_device(config.train.device)),
        clip_grad_norm=config.train.clip_grad_norm,
        reset_optimizer=config.train.reset_optimizer,
        preload=preload,
        **checkpointing,
    )


def make_loggers(config: Config, out_dir: Path, log_file: TextIO) -> list:
    """Every metric to OUT/metrics.csv and the text log (and TensorBoard when asked)."""
    loggers = [MetricsCSVLogger(out_dir / "metrics.csv"), TextLogger(log_file)]
    if config.output.tensorboard:
        loggers.append(TensorboardLogger(out_dir / "tensorboard"))
    return loggers
