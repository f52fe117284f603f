"""Dark Experience Replay (Buzzega et al., NeurIPS 2020): replay the model's own logits, not only the labels.

The memory is replay's (``strategies/replay.py``: the same quotas, selection and uint8 storage), and each stored
classification sample also keeps the logits its head gave it when it was stored, as float32 (``memory_bytes`` counts
them). Each training step draws two independent sets of ``ceil(ratio * B)`` stored samples for a mini-batch of B and
adds

    alpha * mean_i mean_c (f_c(x_i) - z_ic)^2   +   beta * mean_j CE(f(x_j), y_j)

to the current task's loss: ``der`` has ``beta = 0``, ``derpp`` (DER++) both terms. ``f`` is the sample's own head,
``z`` its stored logits. In Buzzega et al.'s code the network has an output for every class of the stream from the
start, so a stored sample's logits also hold its scores for the classes still to come, which the MSE keeps low; a
clmtl head has the classes seen so far and grows (the class scenario), so each class added after a sample was stored
gets that sample's lowest stored logit as its target (``widened``): without it, nothing would stop the new classes'
logits from rising on old samples, and DER would forget like fine-tuning.

The defaults are the paper's for Seq-MNIST with a 200-sample memory (alpha 0.2; DER++ beta 1.0; as many stored
samples per term as the mini-batch has, ``ratio: 1``). One departure from the paper, said here so a table can say
it: the paper fills its memory by reservoir sampling during training and stores the logits of the step a sample was
seen; clmtl fills the memory after each experience (as ``replay`` does, so both keep the same samples) and stores the
logits the model gives at the end of that experience.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clmtl.settings import NON_NEGATIVE, POSITIVE, setting
from clmtl.strategies.replay import MemorySettings, MultiTaskReplayPlugin
from clmtl.training.plugin import to_device
from clmtl.training.registry import register


def widened(logits: torch.Tensor, classes: int) -> torch.Tensor:
    """Stored logits ``[n, k]`` for a head that now has ``classes`` outputs: each class added since is given the
    sample's lowest stored logit, the score of a class it was then least likely to be."""
    extra = classes - logits.shape[1]
    return torch.cat([logits, logits.min(1, keepdim=True).values.expand(-1, extra)], 1) if extra > 0 else logits


class DarkExperienceReplayPlugin(MultiTaskReplayPlugin):
    """DER (``beta = 0``) and DER++: logits of stored samples matched by MSE, their labels by cross-entropy."""

    state = (*MultiTaskReplayPlugin.state, "logits")
    """Replay's memory and generators, and each stored sample's logits, by experience."""

    def __init__(self, alpha: float = 0.2, beta: float = 0.0, mem_size: int = 200, ratio: float = 1.0,
                 split: str = "equal", selection: str = "reservoir", per_task_cap: int | None = None, seed: int = 0,
                 mem_per_class: int | None = None) -> None:
        super().__init__(mem_size=mem_size, ratio=ratio, split=split, selection=selection, per_task_cap=per_task_cap,
                         seed=seed, mem_per_class=mem_per_class)
        self.alpha, self.beta = alpha, beta
        self.logits: dict[int, list[torch.Tensor]] = {}
        """Per experience, the logits of each stored sample, in the memory's order (a trim keeps the prefix)."""

    @property
    def memory_bytes(self) -> int:
        return super().memory_bytes + sum(z.nbytes for stored in self.logits.values() for z in stored)

    def before_forward(self, strategy, **kwargs) -> None:
        """Nothing joins the mini-batch: both replay terms are computed apart, in ``before_backward``."""

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs) -> None:
        super().after_training_exp(strategy)
        experience = strategy.experience.current_experience
        memory = self.buffer.tasks[experience]
        model, was_training = strategy.model, strategy.model.training
        model.eval()
        images = torch.stack([memory[i][0] for i in range(len(memory))]) if len(memory) else None
        outputs = model(to_device(images, strategy.device), memory.head).float().cpu() if images is not None else []
        model.train(was_training)
        self.logits[experience] = [z.clone() for z in outputs]
        for stored, logits in self.logits.items():  # the quotas of older experiences shrank
            del logits[len(self.buffer.tasks[stored]):]

    def before_backward(self, strategy, **kwargs) -> None:
        stored = self.stored_before(strategy)
        if not stored:
            return
        sizes = self.replay_sizes(len(strategy.mb_x), stored)
        distill, labels = [], []
        for experience, size in zip(stored, sizes):
            if not size:
                continue
            memory = self.buffer.tasks[experience]
            forward = getattr(strategy, "task_output", strategy.model)  # the template's: its training precision
            for term in (distill, labels) if self.beta else (distill,):  # each term draws its own samples
                picked = self.buffer.pick(experience, size, self.generator)
                images = torch.stack([memory[i][0] for i in picked]).to(strategy.device)
                outputs = forward(images, memory.head)
                if term is distill:
                    targets = widened(torch.stack([self.logits[experience][i] for i in picked]), outputs.shape[1])
                    term.append(F.mse_loss(outputs, targets.to(outputs), reduction="none").mean(1))
                else:
                    targets = torch.tensor([memory.targets[i] for i in picked], device=outputs.device)
                    term.append(F.cross_entropy(outputs, targets, reduction="none"))
                self.replayed[experience] += len(picked)
        strategy.loss += self.alpha * torch.cat(distill).mean()
        if self.beta:
            strategy.loss += self.beta * torch.cat(labels).mean()


@dataclass(frozen=True)
class DERSettings(MemorySettings):
    """DER's hyperparameters, ``strategy.der.<key>``: replay's memory, and the weight of the logit term."""

    ratio: float = setting(1.0, POSITIVE, help="stored samples drawn per current sample, for each term")
    alpha: float = setting(0.2, NON_NEGATIVE, help="weight of the MSE on stored logits", search=(0.1, 0.2, 0.5, 1.0))


@dataclass(frozen=True)
class DERPPSettings(DERSettings):
    """DER++'s hyperparameters, ``strategy.derpp.<key>``: DER's, and the weight of the stored labels' term."""

    beta: float = setting(1.0, NON_NEGATIVE, help="weight of the cross-entropy on stored labels",
                          search=(0.5, 1.0))


@register("der", settings=DERSettings, acts_on=("loss",), kinds=("classification",))
class DERPlugin(DarkExperienceReplayPlugin):
    """DER: stored samples' logits matched by MSE (Buzzega et al. 2020)."""


@register("derpp", settings=DERPPSettings, acts_on=("loss",), kinds=("classification",))
class DERPPPlugin(DarkExperienceReplayPlugin):
    """DER++: stored samples' logits matched by MSE and their labels by cross-entropy (Buzzega et al. 2020)."""
