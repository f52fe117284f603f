"""MiB (Cermelli et al., CVPR 2020, "Modeling the Background for Incremental Learning in Semantic Segmentation").

In class-incremental segmentation a task labels only its own classes; every other pixel is background, including
pixels of the classes learnt before (and of those still to come). Plain fine-tuning then teaches the model that old
classes are background. MiB models that shift in three parts, on the segmentation head the class scenario shares
(``old`` = the classes the head had before this experience, background 0 among them):

- **Unbiased cross-entropy.** A pixel labelled background may be any class the labels do not name yet, so its
  probability is that of background or an old class: ``log q(bg) = logsumexp(z[:old]) - logsumexp(z)``. Other pixels
  are scored as by the cross-entropy. On the new task's labels this is MiB's loss; a stored sample joined by replay
  (``mib+replay``) keeps its own old-class labels, scored as they are. It replaces the mini-batch's cross-entropy (the
  criterion action).
- **Unbiased distillation.** The previous model's softmax over the old classes is the target; the new model's
  background is the sum of its background and its new classes (what the old model called background may be a new
  class): ``-(1/old) sum_pixels [p_old(bg) log q(bg ∪ new) + sum_{c old, c > 0} p_old(c) log q(c)]``, a mean over
  pixels, weighted by ``kd`` (the paper's lambda, 10 on VOC).
- **Initialisation.** When the head grows, each new class's classifier row starts as the background row, with the
  bias ``b_bg - log(new + 1)``, which the background row takes too: the new model's first prediction splits the old
  background's probability evenly over background and the new classes, so the first steps start from the old model.
  ``init_from_background: false`` keeps the grown rows as the head drew them (ablated in the paper): a new
  class then starts apart from background, which a short step needs to learn it (docs/benchmarks.md measures both).

Both losses are tested against a hand-computed 2×2 image with 3 classes (``tests/test_mib.py``). MiB acts in the class
scenario on segmentation tasks (a task scenario's heads never grow, so there is no old class to model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clmtl.settings import NON_NEGATIVE, setting
from clmtl.strategies.previous_model import PreviousModelPlugin
from clmtl.stream.tasks import IGNORE_INDEX
from clmtl.training.registry import register


def unbiased_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, old: int) -> torch.Tensor:
    """Mean over labelled pixels of ``-log q(label)``: a background pixel's q is background's or any of the first
    ``old`` classes' probability, another pixel's its own class's; label 255 is ignored."""
    log_probs = logits.log_softmax(1)
    merged = torch.cat([log_probs[:, :old].logsumexp(1, keepdim=True), log_probs[:, 1:]], 1)  # 0: bg or old
    valid = labels != IGNORE_INDEX
    if not valid.any():
        return logits.sum() * 0.0
    return F.nll_loss(merged, labels, ignore_index=IGNORE_INDEX)


def unbiased_distillation(logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """MiB's distillation of ``old_logits [B, old, H, W]`` into ``logits [B, C, H, W]``: the new model's background
    is its background or a new class; the sum over old classes is divided by ``old``, then a mean over pixels."""
    old = old_logits.shape[1]
    log_probs = logits.log_softmax(1)
    background = torch.cat([log_probs[:, :1], log_probs[:, old:]], 1).logsumexp(1)
    targets = old_logits.softmax(1)
    per_pixel = targets[:, 0] * background + (targets[:, 1:] * log_probs[:, 1:old]).sum(1)
    return -(per_pixel / old).mean()


@torch.no_grad()
def initialise_from_background(weight: torch.Tensor, bias: torch.Tensor, old: int) -> None:
    """Rows ``old:`` of a classifier become the background row 0, with every one of them and the background biased
    by ``-log(new + 1)`` from the background's bias."""
    new = weight.shape[0] - old
    shared = bias[0] - math.log(new + 1)
    weight[old:] = weight[0]
    bias[old:] = shared
    bias[0] = shared


class BackgroundShiftPlugin(PreviousModelPlugin):
    """What MiB and PLOP share: the previous model, the class scenario, and new classes' rows started from the
    background row (unless ``init_from_background`` is False)."""

    def __init__(self, init_from_background: bool = True) -> None:
        super().__init__()
        self.init_from_background = init_from_background

    def before_training_exp(self, strategy, **kwargs) -> None:
        """Initialise the rows the head grew (an experience resumed from inside starts before the teacher is restored,
        so its rows stay as its checkpoint has them)."""
        old = self.old_classes(strategy)
        if old and self.init_from_background:
            rows = strategy.model.rows(strategy.experience.task_label)
            if rows.num_classes > old:
                initialise_from_background(rows.weight.data, rows.bias.data, old)


class MiBPlugin(BackgroundShiftPlugin):
    """MiB: unbiased cross-entropy and distillation, new classes initialised from the background."""

    method = "mib"

    def __init__(self, kd: float = 10.0, init_from_background: bool = True) -> None:
        super().__init__(init_from_background)
        self.kd = kd

    def batch_loss(self, strategy) -> torch.Tensor | None:
        old = self.old_classes(strategy)
        return unbiased_cross_entropy(strategy.mb_output, strategy.mb_y, old) if old else None

    def before_backward(self, strategy, **kwargs) -> None:
        if self.old_classes(strategy) and self.kd:
            old_logits = self.previous_output(strategy).float()
            strategy.loss += self.kd * unbiased_distillation(strategy.mb_output, old_logits)


@dataclass(frozen=True)
class BackgroundShiftSettings:
    """The setting MiB and PLOP share."""

    init_from_background: bool = setting(True, help="new classes' rows start as the background row (the papers'); "
                                                    "false: as the grown head drew them")


@dataclass(frozen=True)
class MiBSettings(BackgroundShiftSettings):
    """MiB's hyperparameters, ``strategy.mib.<key>``."""

    kd: float = setting(10.0, NON_NEGATIVE, help="weight of the unbiased distillation (the paper's lambda)",
                        search=(1.0, 10.0, 100.0))


register("mib", settings=MiBSettings, acts_on=("model", "criterion", "loss"), kinds=("segmentation",))(MiBPlugin)
