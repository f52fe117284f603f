"""Dark Experience Replay (Buzzega et al., NeurIPS 2020): replay the model's own outputs, not only the labels.

The memory is replay's (``strategies/replay.py``: the same quotas, selection and uint8 storage), and each stored
sample also keeps the output its head gave it when it was stored, as float32 (``memory_bytes`` counts them). Each
training step draws two independent sets of ``ceil(ratio * B)`` stored samples for a mini-batch of B and adds

    alpha * mean_i mean_j (f_j(x_i) - z_ij)^2   +   beta * L(f(x'), y')

to the current task's loss: ``der`` has ``beta = 0``, ``derpp`` (DER++) both terms. ``f`` is the sample's own head,
``z`` its stored output, ``j`` runs over the output's values, and ``L`` is the sample's task loss on its stored labels
(a mean over the stored samples drawn, each experience's batch weighted by its size).

**Every kind.** The paper stores classification logits. Its idea applies to any output, and the outputs differ only
in size:

- classification: the ``k`` logits, as the paper;
- segmentation: the ``[k, H, W]`` logit map averaged over ``output_stride`` × ``output_stride`` cells (8: the
  resolution of the head, whose map the model upsamples to the image), and the new output pooled alike before the
  MSE, so a 640-pixel image keeps 80 × 80 × k floats instead of 640 × 640 × k;
- detection: the raw anchor outputs of every level, ``[A, H, W, 5 + k]`` (boxes, objectness and class logits; the
  grids are already coarse). ERD (Feng et al., CVPR 2022) distils the same outputs from a previous model instead.

**A head that grew.** In Buzzega et al.'s code the network has an output for every class of the stream from the
start, so a stored sample's logits also hold its scores for the classes still to come, which the MSE keeps low; a
clmtl head has the classes seen so far and grows (the class scenario), so each class added after a sample was stored
gets that sample's lowest stored class logit as its target (``widened``, per pixel and per anchor for dense outputs):
without it, nothing would stop the new classes' logits from rising on old samples, and DER would forget like
fine-tuning.

The defaults are the paper's for Seq-MNIST with a 200-sample memory (alpha 0.2; DER++ beta 1.0; as many stored
samples per term as the mini-batch has, ``ratio: 1``). One departure from the paper, said here so a table can say
it: the paper fills its memory by reservoir sampling during training and stores the outputs of the step a sample was
seen; clmtl fills the memory after each experience (as ``replay`` does, so both keep the same samples) and stores the
outputs the model gives at the end of that experience.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from clmtl.settings import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, setting
from clmtl.strategies.replay import MemorySettings, MultiTaskReplayPlugin
from clmtl.stream.experiences import collate_for
from clmtl.stream.tasks import DETECTION, SEGMENTATION
from clmtl.training.plugin import evaluating, to_device
from clmtl.training.registry import register

BOX_VALUES = 5
"""Values before the class logits in an anchor's detection output: the box's four and the objectness."""
STORE_BATCH = 32
"""Stored samples the model reads at once when their outputs are stored."""


def _widened_along(values: torch.Tensor, size: int, dim: int, first_class: int = 0) -> torch.Tensor:
    """``values`` grown to ``size`` along ``dim``, each new entry the lowest of the entries from ``first_class`` on."""
    extra = size - values.shape[dim]
    if extra <= 0:
        return values
    lowest = values.narrow(dim, first_class, values.shape[dim] - first_class).amin(dim, keepdim=True)
    shape = list(values.shape)
    shape[dim] = extra
    return torch.cat([values, lowest.expand(shape)], dim)


def widened(stored: Any, grown: Any, kind: str) -> Any:
    """Stored outputs for a head that has grown to ``grown``'s shape: each class added since is given the sample's
    lowest stored class logit (per pixel, per anchor), the score of a class it was then least likely to be."""
    if kind == DETECTION:
        return [_widened_along(level, now.shape[-1], -1, BOX_VALUES) for level, now in zip(stored, grown)]
    return _widened_along(stored, grown.shape[1], 1)


def reduced(output: Any, kind: str, stride: int) -> Any:
    """A batch's output as stored: a segmentation map averaged over ``stride`` × ``stride`` cells, others as is."""
    return F.avg_pool2d(output, stride, ceil_mode=True) if kind == SEGMENTATION and stride > 1 else output


def squared_error(output: Any, target: Any, kind: str) -> torch.Tensor:
    """Each sample's mean squared difference over every value of its output ``[n]``."""
    if kind == DETECTION:
        return torch.cat([(o - t).pow(2).flatten(1) for o, t in zip(output, target)], 1).mean(1)
    return (output - target).pow(2).flatten(1).mean(1)


def split_samples(output: Any, kind: str) -> list[Any]:
    """A batch's output as one entry per sample (a detection sample's: a list of its levels)."""
    if kind == DETECTION:
        return [[level[i].clone() for level in output] for i in range(len(output[0]))]
    return [row.clone() for row in output]


def stacked(samples: list[Any], kind: str) -> Any:
    """Stored per-sample outputs as one batch, the inverse of ``split_samples``."""
    if kind == DETECTION:
        return [torch.stack(levels) for levels in zip(*samples)]
    return torch.stack(samples)


def output_bytes(sample: Any) -> int:
    return sum(level.nbytes for level in sample) if isinstance(sample, list) else sample.nbytes


class DarkExperienceReplayPlugin(MultiTaskReplayPlugin):
    """DER (``beta = 0``) and DER++: stored outputs matched by MSE, stored labels by the task's loss."""

    state = (*MultiTaskReplayPlugin.state, "logits")
    """Replay's memory and generators, and each stored sample's output, by experience."""

    def __init__(self, alpha: float = 0.2, beta: float = 0.0, mem_size: int = 200, ratio: float = 1.0,
                 split: str = "equal", selection: str = "reservoir", per_task_cap: int | None = None, seed: int = 0,
                 mem_per_class: int | None = None, output_stride: int = 8) -> None:
        super().__init__(mem_size=mem_size, ratio=ratio, split=split, selection=selection, per_task_cap=per_task_cap,
                         seed=seed, mem_per_class=mem_per_class)
        self.alpha, self.beta, self.output_stride = alpha, beta, output_stride
        self.logits: dict[int, list[Any]] = {}
        """Per experience, the output of each stored sample (``reduced``), in the memory's order (a trim keeps the
        prefix)."""

    @property
    def memory_bytes(self) -> int:
        return super().memory_bytes + sum(output_bytes(z) for stored in self.logits.values() for z in stored)

    def stats(self) -> dict[str, dict[str, int]]:
        """Replay's counts, and the bytes of each experience's stored outputs (what storing outputs costs beside the
        samples)."""
        return {**super().stats(), "output_bytes": {str(experience): sum(output_bytes(z) for z in stored)
                                                    for experience, stored in self.logits.items()}}

    def before_forward(self, strategy, **kwargs) -> None:
        """Nothing joins the mini-batch: both replay terms are computed apart, in ``before_backward``."""

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs) -> None:
        super().after_training_exp(strategy)
        experience = strategy.experience.current_experience
        memory = self.buffer.tasks[experience]
        outputs = []
        with evaluating(strategy.model):
            for start in range(0, len(memory), STORE_BATCH):
                images = torch.stack([memory[i][0] for i in range(start, min(start + STORE_BATCH, len(memory)))])
                output = strategy.model(to_device(images, strategy.device), memory.head)
                output = [level.float().cpu() for level in output] if memory.kind == DETECTION else output.float().cpu()
                outputs += split_samples(reduced(output, memory.kind, self.output_stride), memory.kind)
        self.logits[experience] = outputs
        for stored, logits in self.logits.items():  # the quotas of older experiences shrank
            del logits[len(self.buffer.tasks[stored]):]

    def before_backward(self, strategy, **kwargs) -> None:
        stored = self.stored_before(strategy)
        if not stored:
            return
        sizes = self.replay_sizes(len(strategy.mb_x), stored)
        distill, labels = [], []
        forward = getattr(strategy, "task_output", strategy.model)  # the template's: its training precision
        for experience, size in zip(stored, sizes):
            if not size:
                continue
            memory = self.buffer.tasks[experience]
            for term in (distill, labels) if self.beta else (distill,):  # each term draws its own samples
                picked = self.buffer.pick(experience, size, self.generator)
                batch = to_device(collate_for(memory.kind)(memory.samples(picked)), strategy.device)
                output = forward(batch[0], memory.head)
                if term is distill:
                    output = reduced(output, memory.kind, self.output_stride)
                    target = widened(to_device(stacked([self.logits[experience][i] for i in picked], memory.kind),
                                               strategy.device), output, memory.kind)
                    term.append(squared_error(output, target, memory.kind))
                else:
                    term.append(strategy._criterion(output, batch[1]).expand(len(picked)))
                self.replayed[experience] += len(picked)
        strategy.loss += self.alpha * torch.cat(distill).mean()
        if self.beta:
            strategy.loss += self.beta * torch.cat(labels).mean()


@dataclass(frozen=True)
class DERSettings(MemorySettings):
    """DER's hyperparameters, ``strategy.der.<key>``: replay's memory, and the weight of the output term."""

    ratio: float = setting(1.0, POSITIVE, help="stored samples drawn per current sample, for each term")
    alpha: float = setting(0.2, NON_NEGATIVE, help="weight of the MSE on stored outputs", search=(0.1, 0.2, 0.5, 1.0))
    output_stride: int = setting(8, AT_LEAST_ONE, help="a segmentation output is stored averaged over cells this wide")


@dataclass(frozen=True)
class DERPPSettings(DERSettings):
    """DER++'s hyperparameters, ``strategy.derpp.<key>``: DER's, and the weight of the stored labels' term."""

    beta: float = setting(1.0, NON_NEGATIVE, help="weight of the task loss on stored labels", search=(0.5, 1.0))


@register("der", settings=DERSettings, acts_on=("loss",))
class DERPlugin(DarkExperienceReplayPlugin):
    """DER: stored samples' outputs matched by MSE (Buzzega et al. 2020), for every task kind."""


@register("derpp", settings=DERPPSettings, acts_on=("loss",))
class DERPPPlugin(DarkExperienceReplayPlugin):
    """DER++: stored samples' outputs matched by MSE and their labels by the task's loss (Buzzega et al. 2020)."""
