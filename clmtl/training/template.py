"""MultiTaskTemplate: Avalanche's SupervisedTemplate on a stream whose tasks have different target kinds.

Only two things in the stock template assume class-int targets: the minibatch is moved to the device
with ``.to`` on every element (a detection batch holds a list of dicts), and the loss is a single
``CrossEntropyLoss``. The loss routing lives in the criterion (``clmtl.training.losses.MultiTaskLoss``), so
plugins that call ``strategy._criterion`` directly (EWC's Fisher) route the same way; this class only
moves nested batches. Everything else — callbacks, plugins, evaluator, loggers — is Avalanche's.

Training forwards (the mini-batch's and ``task_batch_loss``'s) run in the configured precision: under bfloat16
autocast for ``bf16``, their outputs cast back to float32 (``clmtl.training.precision``).

It can also stop and continue inside an experience: ``checkpoint_every`` / ``on_checkpoint`` hand the caller the
training position every N iterations (and when a stop was requested, ``clmtl.training.checkpoint.StopRequest``), and
``train_for(resume=...)`` continues from such a position (``clmtl.training.checkpoint``).

Under ``torchrun`` (``clmtl.training.distributed``) it also shards each global training batch and the evaluation sets
between the processes, averages gradients after every backward pass and BatchNorm statistics after every
experience.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from avalanche.benchmarks.utils.data_loader import SingleDatasetDataLoader, TaskBalancedDataLoader
from avalanche.models.utils import avalanche_forward
from avalanche.training.templates import SupervisedTemplate

from clmtl.data.preload import PRELOAD_LIMIT_BYTES, PreloadedLoader, image_bytes
from clmtl.training import distributed
from clmtl.training.checkpoint import StopRequest, StopRequested, clock_state, rng_state, set_clock_state, set_rng_state
from clmtl.training.plugin import Plugin, to_device
from clmtl.training.precision import GradientScaler, autocast, to_float


class MultiTaskTemplate(SupervisedTemplate):
    """SupervisedTemplate whose minibatches may hold targets of any kind (label maps, box lists, class ids)."""

    def __init__(self, *, precision: str = "fp32", clip_grad_norm: float = 0.0, reset_optimizer: bool = True,
                 checkpoint_every: int = 0, on_checkpoint: Callable[[dict], None] | None = None,
                 stop: StopRequest | None = None, preload: bool = False, **kwargs) -> None:
        """Avalanche's ``SupervisedTemplate`` arguments, plus:

        - ``precision``: ``fp32``, ``bf16`` or ``fp16`` (training forwards under autocast,
          ``clmtl.training.precision``; fp16 with a gradient scaler);
        - ``clip_grad_norm``: rescale the gradients to at most this total norm before each update (0: never);
        - ``reset_optimizer``: start every experience with a fresh optimizer state (False: one state for the stream);
        - ``on_checkpoint``: receives the training position (``position()``) every ``checkpoint_every`` training
          iterations of an experience (0: never), and when ``stop`` is requested, before training stops;
        - ``preload``: the samples never change (no random augmentation), so an experience of one task may be read into
          memory and batched by indexing (``clmtl.data.preload``): a training experience each time it trains, a test
          experience once for every evaluation.
        """
        super().__init__(**kwargs)
        self.preload = preload
        self._test_sets: dict[int, tuple[Any, PreloadedLoader]] = {}
        """The test experiences read so far: ``id`` of the experience's dataset -> (that dataset, kept so the id stays
        its own, and its loader)."""
        self.precision = precision
        self.scaler = GradientScaler(precision, self.device)
        self.clip_grad_norm = clip_grad_norm
        self.reset_optimizer = reset_optimizer
        self.checkpoint_every = checkpoint_every
        self.on_checkpoint = on_checkpoint
        self.stop = stop or StopRequest()
        self.resume_point: dict | None = None
        """What ``train_for(resume=...)`` continues: set for that call only."""
        self.iteration_limit: int | None = None
        """The experience's budget in iterations, when it is counted so (``train_for``)."""
        self._carried_optimizer_state: dict[str, dict[str, Any]] | None = None
        """A checkpoint's ``optimizer_state``, for the next experience's optimizer (``carry_optimizer_state``)."""

    def forward(self):
        return self.task_output(self.mb_x, self.mb_task_id)

    def criterion(self) -> torch.Tensor:
        """The training loss: the task criterion's, or the one a plugin that acts on the criterion puts in its place
        (``Plugin.batch_loss``). Evaluation computes none: its scores come from the metrics, and a task not trained
        yet may hold classes its head cannot predict (class scenario), which no loss accepts."""
        if not self.is_training:
            return torch.zeros((), device=self.device)
        for plugin in self.plugins:
            replaced = plugin.batch_loss(self) if isinstance(plugin, Plugin) else None
            if replaced is not None:
                return replaced
        return super().criterion()

    def train_for(self, experience, epochs: int, iterations: int | None = None, num_workers: int = 0,
                  resume: dict | None = None) -> float:
        """Train on one experience for ``epochs`` epochs (a fresh optimizer state unless ``reset_optimizer`` is False);
        returns wall-clock seconds.

        ``iterations``: train for exactly that many iterations (mini-batches) instead, across as many epochs as it
        takes, the last one cut short (the papers' budget). ``resume``: a ``position()`` saved earlier plus
        ``"restore"``, a callable that puts the plugins' states back; the experience then continues from there
        instead of starting."""
        self.train_epochs = epochs
        self.iteration_limit = iterations
        self.resume_point = resume
        self.train(experience, num_workers=num_workers, reset_optimizer_state=self.reset_optimizer)
        return self.experience_seconds

    def task_output(self, x: torch.Tensor, task_label: int):
        """The model's output for a batch of one task: while training at ``bf16`` under autocast and returned in
        float32, so losses and plugins never see bfloat16; evaluation always runs in float32."""
        if not self.is_training:
            return avalanche_forward(self.model, x, task_label)
        with autocast(self.precision, self.device):
            output = avalanche_forward(self.model, x, task_label)
        return to_float(output)

    def _before_training_exp(self, **kwargs) -> None:
        resumed = self.resume_point["seconds"] if self.resume_point is not None else 0.0
        self._experience_start = time.perf_counter() - resumed  # a resumed experience counts its time before the stop
        if self.resume_point is not None:  # plugins set up the experience by its index (layerlr's rates, schedules)
            set_clock_state(self.clock, self.resume_point["clock"])
        super()._before_training_exp(**kwargs)
        if self.iteration_limit:  # the loader as the plugins left it (replay's are longer)
            self.train_epochs = math.ceil(self.iteration_limit / max(1, len(self.dataloader)))

    @property
    def planned_iterations(self) -> int:
        """Training iterations this experience takes in all (schedules and progress read it)."""
        return self.iteration_limit or self.train_epochs * len(self.dataloader)

    @property
    def experience_seconds(self) -> float:
        """Wall-clock seconds of the experience being (or last) trained, including any time before a resume."""
        return time.perf_counter() - self._experience_start

    def _before_training_epoch(self, **kwargs) -> None:
        self._epoch_rng = rng_state()  # before the loader draws the epoch's order: resuming redraws the same
        super()._before_training_epoch(**kwargs)

    def _after_training_iteration(self, **kwargs) -> None:
        super()._after_training_iteration(**kwargs)  # every plugin, the clock last, has finished the iteration
        due = self.checkpoint_every and self.clock.train_exp_iterations % self.checkpoint_every == 0
        if self.on_checkpoint is not None and (due or self.stop.requested):
            self.on_checkpoint(self.position())
        if self.stop.requested:
            raise StopRequested("stopped by a signal after a training iteration")
        if self.iteration_limit and self.clock.train_exp_iterations >= self.iteration_limit:
            self.stop_training()

    def position(self) -> dict[str, Any]:
        """Where training is inside the experience, with what continuing from here needs."""
        return {"epoch": self.clock.train_exp_epochs, "iteration": self.clock.train_epoch_iterations,
                "epoch_rng": self._epoch_rng, "rng": rng_state(), "clock": clock_state(self.clock),
                "optimizer": self.optimizer.state_dict(), "seconds": self.experience_seconds}

    def optimizer_step(self) -> None:
        for param in self.model.untrained_parameters():  # heads of tasks to come stay as initialised
            param.grad = None
        self.scaler.step(self.optimizer)

    def _unpack_minibatch(self) -> None:
        self.mbatch = [to_device(item, self.device) for item in self.mbatch]

    def backward(self) -> None:
        self.scaler.backward(self.loss, self.optimizer, self.retain_graph)  # gradients unscaled when it returns
        if distributed.is_distributed():
            distributed.average_gradients(self.model)
        if self.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)

    def _train_exp(self, experience, eval_streams=None, **kwargs) -> None:
        if self.resume_point is None:
            super()._train_exp(experience, eval_streams, **kwargs)
        else:
            self._resume_train_exp(**kwargs)
        if distributed.is_distributed():
            distributed.average_buffers(self.model)

    def _resume_train_exp(self, **kwargs) -> None:
        """Avalanche's epoch loop from a saved position: the optimizer, clock and plugins as they were, and the
        interrupted epoch's order redrawn from its starting random state, its finished batches loaded and skipped
        (so augmentation draws the same numbers), then the generators set to where the run stopped."""
        point, self.resume_point = self.resume_point, None
        self.optimizer.load_state_dict(point["optimizer"])  # moments and the learning rates the schedule had set
        point["restore"]()
        for epoch in range(point["epoch"], self.train_epochs):
            resumed = epoch == point["epoch"]
            if resumed:
                set_rng_state(point["epoch_rng"])
            self._before_training_epoch(**kwargs)
            loader = self.dataloader
            if resumed:
                set_clock_state(self.clock, point["clock"])
                self.dataloader = _SkipBatches(loader, point["iteration"], lambda: set_rng_state(point["rng"]))
            try:
                self.training_epoch(**kwargs)
            finally:
                self.dataloader = loader
            self._after_training_epoch(**kwargs)

    def make_optimizer(self, reset_optimizer_state: bool = False, **kwargs) -> None:
        """Avalanche's optimizer update, also dropping parameters the model no longer has: a head grown outside an
        experience's adaptation (joint grows every head before training) leaves its old tensor behind otherwise.
        Then a carried state (``carry_optimizer_state``) goes to the parameters of the same name and shape."""
        super().make_optimizer(reset_optimizer_state=reset_optimizer_state, remove_params=True, **kwargs)
        carried, self._carried_optimizer_state = self._carried_optimizer_state, None
        if carried is None:
            return
        for name, param in self.model.named_parameters():
            state = carried.get(name)
            if state is not None and all(value.shape == param.shape for value in state.values()
                                         if isinstance(value, torch.Tensor) and value.dim() > 0):
                self.optimizer.state[param] = {key: value.to(param.device) if isinstance(value, torch.Tensor)
                                               else value for key, value in state.items()}

    def optimizer_state(self) -> dict[str, dict[str, Any]]:
        """The optimizer's per-parameter state (Adam's moments, SGD's momentum) by parameter name: what a resumed or
        continued run needs when one state runs through the stream (``reset_optimizer=False``). By name, as
        Avalanche maps parameters, so it fits a model with more heads (a continued run) as well."""
        names = {param: name for name, param in self.model.named_parameters()}
        return {names[param]: dict(state) for param, state in self.optimizer.state.items() if param in names}

    def carry_optimizer_state(self, state: dict[str, dict[str, Any]]) -> None:
        """Start the next experience's optimizer from ``state`` (an ``optimizer_state``) instead of a fresh one. A
        grown head's old state does not fit its new shape and is left out, as Avalanche drops it in one run."""
        self._carried_optimizer_state = state

    def make_train_dataloader(self, num_workers=0, shuffle=True, pin_memory=None, persistent_workers=False,
                              drop_last=False, **kwargs) -> None:
        """Avalanche's loader (pinned memory on CUDA), or with ``preload`` the experience read into memory; under
        torchrun each process loads its share of every global batch."""
        pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        if shuffle and self._preloadable(PRELOAD_LIMIT_BYTES):
            self.dataloader = PreloadedLoader(self.adapted_dataset, self.train_mb_size, self.adapted_dataset.collate_fn)
            return None
        if not distributed.is_distributed():
            return super().make_train_dataloader(num_workers, shuffle, pin_memory, persistent_workers, drop_last,
                                                 **kwargs)
        args = self._obtain_common_dataloader_parameters(
            batch_size=self.train_mb_size, num_workers=num_workers, shuffle=shuffle, pin_memory=pin_memory,
            persistent_workers=persistent_workers, drop_last=drop_last)
        self.dataloader = _ShardedLoader(self.adapted_dataset, oversample_small_groups=True,
                                         distributed_sampling=False, **args)

    def _preloadable(self, room: int) -> bool:
        """Whether this experience's loader may be a ``PreloadedLoader``: one task (Avalanche balances the batches of
        several), one process, and ``room`` bytes for its images."""
        dataset = self.adapted_dataset
        if not self.preload or distributed.is_distributed() or len(dataset.targets_task_labels.uniques) != 1:
            return False
        size = image_bytes(dataset)
        return size is not None and size <= room

    def make_eval_dataloader(self, num_workers=0, shuffle=False, pin_memory=None, persistent_workers=False,
                             **kwargs) -> None:
        """Avalanche's loader (pinned memory on CUDA), or with ``preload`` the experience as read at its first
        evaluation; under torchrun each process evaluates a contiguous slice, with no padding."""
        pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        if not shuffle:
            source = self.experience.dataset
            held = sum(loader.nbytes for _, loader in self._test_sets.values())
            if id(source) not in self._test_sets and self._preloadable(PRELOAD_LIMIT_BYTES - held):
                self._test_sets[id(source)] = source, PreloadedLoader(
                    self.adapted_dataset, self.eval_mb_size, self.adapted_dataset.collate_fn, shuffle=False)
            if id(source) in self._test_sets:
                self.dataloader = self._test_sets[id(source)][1]
                return None
        if not distributed.is_distributed():
            return super().make_eval_dataloader(num_workers, shuffle, pin_memory, persistent_workers, **kwargs)
        start, stop = distributed.shard_bounds(len(self.adapted_dataset), distributed.rank(), distributed.world_size())
        args = self._obtain_common_dataloader_parameters(
            batch_size=self.eval_mb_size, num_workers=num_workers, shuffle=False, pin_memory=pin_memory,
            persistent_workers=persistent_workers)
        args.setdefault("collate_fn", self.adapted_dataset.collate_fn)
        self.dataloader = SingleDatasetDataLoader(self.adapted_dataset.subset(range(start, stop)),
                                                  distributed_sampling=False, **args)


class _SkipBatches:
    """Iterates ``loader`` from batch ``skip`` on (loading the skipped ones), calling ``then`` after skipping."""

    def __init__(self, loader, skip: int, then: Callable[[], None]) -> None:
        self.loader, self.skip, self.then = loader, skip, then

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        for _ in range(self.skip):
            next(batches)
        self.then()
        yield from batches


class _ShardedLoader(TaskBalancedDataLoader):
    """Avalanche's task-balanced loader whose batches are split between the processes."""

    def _make_pytorch_loader(self, datasets, batch_sampler):
        shard = distributed.ShardedBatchSampler(batch_sampler, distributed.rank(), distributed.world_size())
        return super()._make_pytorch_loader(datasets, shard)
