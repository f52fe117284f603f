"""ER-ACE (Caccia et al., ICLR 2022, "New insights on reducing abrupt representation change in online continual
learning"): experience replay with an asymmetric cross-entropy.

The current mini-batch's cross-entropy is taken over the classes present in it only (the other logits masked to
the lowest value), so learning new classes does not push down the old classes' logits, the main source of the
abrupt representation change the paper measures; stored samples are replayed with the full cross-entropy:

    loss = CE(f(x)[present classes], y)  +  mean_j CE(f(x_j), y_j)

Before the first stored sample exists the loss is the plain cross-entropy, as in the authors' code. The memory is
replay's (``strategies/replay.py``); ``ratio`` stored samples are drawn per current sample. The asymmetric term
replaces the mini-batch's own loss (``batch_loss``: the same criterion on the masked logits), so terms other
plugins add (``er_ace+ewc``) stay as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clmtl.settings import POSITIVE, setting
from clmtl.strategies.replay import MemorySettings, MultiTaskReplayPlugin
from clmtl.training.plugin import task_batch_loss
from clmtl.training.registry import register


def present_class_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logits`` with every class absent from ``labels`` set to the dtype's lowest value (no gradient, no mass)."""
    present = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    present[labels.unique()] = True
    return logits.masked_fill(~present, torch.finfo(logits.dtype).min)


@dataclass(frozen=True)
class ERACESettings(MemorySettings):
    """ER-ACE's hyperparameters, ``strategy.er_ace.<key>``: replay's memory."""

    ratio: float = setting(1.0, POSITIVE, help="stored samples replayed per current sample")


@register("er_ace", settings=ERACESettings, acts_on=("criterion", "loss"), kinds=("classification",))
class ERACEPlugin(MultiTaskReplayPlugin):
    """ER-ACE: the current batch's cross-entropy over its own classes, stored samples' over all (Caccia et al.)."""

    def __init__(self, mem_size: int = 200, ratio: float = 1.0, split: str = "equal", selection: str = "reservoir",
                 per_task_cap: int | None = None, seed: int = 0, mem_per_class: int | None = None) -> None:
        super().__init__(mem_size=mem_size, ratio=ratio, split=split, selection=selection, per_task_cap=per_task_cap,
                         seed=seed, mem_per_class=mem_per_class)

    def before_forward(self, strategy, **kwargs) -> None:
        """Nothing joins the mini-batch: the stored samples are replayed apart, in ``before_backward``."""

    def batch_loss(self, strategy) -> torch.Tensor | None:
        """The cross-entropy over the mini-batch's own classes, once samples are stored."""
        if not self.stored_before(strategy):
            return None
        return strategy._criterion(present_class_logits(strategy.mb_output, strategy.mb_y), strategy.mb_y)

    def before_backward(self, strategy, **kwargs) -> None:
        stored = self.stored_before(strategy)
        if not stored:
            return
        losses, counts = [], []
        for experience, size in zip(stored, self.replay_sizes(len(strategy.mb_x), stored)):
            if size:
                memory = self.buffer.tasks[experience]
                picked = self.buffer.pick(experience, size, self.generator)
                batch = [torch.stack([memory[i][0] for i in picked]), torch.tensor([memory.targets[i] for i in picked])]
                losses.append(task_batch_loss(strategy, batch, memory.head) * len(picked))
                counts.append(len(picked))
                self.replayed[experience] += len(picked)
        strategy.loss += torch.stack(losses).sum() / sum(counts)  # the mean over every replayed sample
