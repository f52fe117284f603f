"""What a strategy plugin may rely on in clmtl, beyond Avalanche's callbacks and strategy state.

A strategy plugin is an Avalanche ``SupervisedPlugin``. Subclassing ``Plugin`` declares the few things clmtl asks of
it, each with a default, so a plugin writes only what it has:

- ``state``: the names of the attributes that carry over from one experience to the next (EWC's anchors, a replay
  memory), declared once as a class attribute. Run checkpoints save them (``--resume``) and rank 0 hands them to
  every process under torchrun, through ``state_dict()`` / ``load_state_dict(state, model)``, which no plugin writes.
  ``model_copies`` names frozen copies of the model (LwF's teacher), saved as their state dict and rebuilt from the
  run's model; ``transient`` names attributes that hold tensors but are no state (caches rebuilt from it, a step's
  working values). A plugin holding tensors in an attribute it does not declare is refused at the run's first
  checkpoint (``clmtl.training.plugin_state``, which also says what a value may be);
- ``no_resume``: for a plugin whose state is no value that a checkpoint can hold, why a run with it cannot resume;
- ``batch_loss(strategy)``: the mini-batch's own loss in place of its task's criterion (a strategy that acts on the
  ``criterion``: ER-ACE, iCaRL, MiB), or None to keep it; other plugins' terms are added to it as to the criterion's;
- ``memory_bytes``: memory it holds beside the model, reported in results.json;
- ``stats()``: what results.json records of it (``strategy_stats``);
- ``bind_benchmark(benchmark)``: called with the whole benchmark before training (joint takes every task's data,
  routing refuses heads shared by several tasks);
- ``task_model_states()``: model tensors that differ per task label (per-task BatchNorm), which checkpoints keep
  beside the model so ``clmtl eval`` runs each task with its own.

A plain Avalanche plugin trains in a run too; it cannot be resumed from a checkpoint. The Avalanche plugins registered
by name (``clmtl.strategies.avalanche_stock``) are ``Plugin`` subclasses that declare their state, or say why not.

The functions below are the stable surface for plugins that add samples to a training step: each task keeps its own
output format, so samples of another head get their own forward pass (``task_batch_loss``), while samples of the
head being trained can join the mini-batch (``joined``). Plugins that run the model besides the training step
control its BatchNorm layers with ``evaluating`` (eval mode, modes put back) or ``kept_statistics`` (normalising as
they train, running statistics left as they are).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch import nn

from clmtl.training.plugin_state import StateError, frozen_copy, restore_state, saved_state

__all__ = ["Plugin", "StateError", "copy_bytes", "evaluating", "frozen_copy", "joined", "kept_statistics",
           "task_batch_loss", "tensor_bytes", "to_device"]


class Plugin(SupervisedPlugin):
    """An Avalanche plugin with clmtl's optional protocol, every part defaulting to "nothing"."""

    state: ClassVar[tuple[str, ...]] = ()
    """Attributes that carry over between experiences: saved, restored and handed over under torchrun."""
    model_copies: ClassVar[tuple[str, ...]] = ()
    """Attributes holding a ``frozen_copy`` of the run's model, or None: saved as its state dict, rebuilt from the
    model."""
    transient: ClassVar[tuple[str, ...]] = ()
    """Attributes holding tensors that are no state (caches, a step's working values): neither saved nor restored."""
    no_resume: ClassVar[str] = ""
    """Why a run with this plugin cannot be resumed (its state is no value a checkpoint holds); empty: it can."""

    def state_dict(self) -> dict | None:
        """The declared state as tensors and plain containers (checkpoints load weights only); None for a plugin that
        cannot be resumed. Raises ``StateError`` for a tensor in an undeclared attribute."""
        return None if self.no_resume else saved_state(self)

    def load_state_dict(self, state: dict, model: torch.nn.Module) -> None:
        """Take back what ``state_dict`` returned; ``model`` is the run's model, already restored."""
        restore_state(self, state, model)

    def batch_loss(self, strategy) -> torch.Tensor | None:
        """The training mini-batch's loss in place of the task criterion's (``strategy.mb_output`` against
        ``strategy.mb_y``), or None: the criterion's stands."""
        return None

    @property
    def memory_bytes(self) -> int:
        return 0

    def stats(self) -> dict:
        return {}

    def bind_benchmark(self, benchmark) -> None:
        """See the whole benchmark (``clmtl.stream.benchmark.Benchmark``) before training starts."""

    def task_model_states(self) -> dict[int, dict[str, torch.Tensor]]:
        """Model tensors by task label (head) that the shared model does not hold, e.g. per-task BatchNorm."""
        return {}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes the ``tensors`` hold (what a plugin's ``memory_bytes`` adds up)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def copy_bytes(model: nn.Module | None) -> int:
    """Bytes of a model copy's parameters and buffers (a plugin's teacher, for its ``memory_bytes``); 0 for None."""
    return 0 if model is None else tensor_bytes((*model.parameters(), *model.buffers()))


def to_device(value: Any, device: torch.device | str) -> Any:
    """Move tensors nested in lists, tuples and dicts to ``device``. A copy to the CPU is finished when this returns
    (a non-blocking one from a GPU could still be under way while a checkpoint or a broadcast reads it)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=torch.device(device).type != "cpu")
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


def task_batch_loss(strategy, batch: list, task_label: int) -> torch.Tensor:
    """Loss of a collated ``[images, targets, ...]`` batch of one head, through that head and its task's loss.

    The forward pass runs as the template's does (``task_output``: the training precision), so a plugin's extra
    passes train like the mini-batch's.
    """
    images, targets = to_device(batch[0], strategy.device), to_device(batch[1], strategy.device)
    forward = getattr(strategy, "task_output", strategy.model)
    return strategy._criterion(forward(images, task_label), targets)


def joined(batch: list, extra: list) -> list:
    """Two collated ``[images, targets, task_labels]`` batches of one head as one (detection targets are lists)."""
    targets = batch[1] + extra[1] if isinstance(batch[1], list) else torch.cat([batch[1], extra[1]])
    return [torch.cat([batch[0], extra[0]]), targets, torch.cat([batch[-1], extra[-1]])]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block, then every module's own mode back (bnfreeze keeps BN in eval while training)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def kept_statistics(model: nn.Module) -> Iterator[None]:
    """Forward passes in the block leave every BatchNorm's running statistics (and batch count) as they are, while
    layers in train mode still normalise with the batch's statistics, as in the training pass: a second pass over a
    mini-batch then neither counts it twice nor sees other features than the training pass."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)
