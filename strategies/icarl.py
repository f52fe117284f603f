"""iCaRL (Rebuffi et al., CVPR 2017, "iCaRL: Incremental Classifier and Representation Learning").

Three parts, each as the paper has it:

- **Exemplars by herding.** After each experience the memory keeps, per class, the samples chosen greedily so that
  the mean of the chosen ones' L2-normalised features stays closest to the class mean (the paper's Algorithm 4);
  the classes' herding orders are interleaved, so the memory's prefix rule (``strategies/replay.py``) trims every
  class to a herding prefix of itself when later classes take memory, as the paper's "reduce exemplar set" does.
  The features are what the classification head reads (``embed``; the unified model: the pooled shared features).
- **Distillation in the loss.** The mini-batch, stored samples joined, is scored with a binary cross-entropy over
  every class of its head: one-hot targets for its labels, and on the classes the previous model knew, that model's
  sigmoid outputs instead (Avalanche's ``ICaRLLossPlugin``, tested equal). It replaces the mini-batch's own
  cross-entropy (the ``criterion`` action).
- **Nearest mean of exemplars.** At test time a sample gets the class whose exemplars' mean normalised feature is
  nearest to its own (``classifier: nme``; the class means are computed with the model after each experience).
  ``classifier: softmax`` scores the trained head's own outputs instead: training is the same run draw for draw, so
  the two are compared on one training.

The memory's budget is replay's (``mem_size`` split equally over experiences, or ``mem_per_class``). In the task
scenario every task has its own head: a head's first experience has no old classes to distil, and the stored samples
of other heads are replayed with their own cross-entropy, as ``replay`` does. The paper also averages each feature
with its horizontally flipped image's; that is a data augmentation of its image sets, left out here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from clmtl.settings import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, one_of, setting
from clmtl.strategies.replay import SPLITS, MultiTaskReplayPlugin
from clmtl.training.plugin import copy_bytes, evaluating, frozen_copy
from clmtl.training.registry import register

CLASSIFIERS = ("nme", "softmax")
FEATURE_BATCH = 256
"""Images embedded at once when the exemplars and class means are computed."""


def herding_order(features: torch.Tensor, count: int) -> list[int]:
    """The first ``count`` samples iCaRL's herding picks from ``features [n, d]`` (normalised here): each time the one
    that brings the mean of those picked closest to the mean of all."""
    features = F.normalize(features.float(), dim=1)
    target = features.mean(0)
    picked: list[int] = []
    total = torch.zeros_like(target)
    for k in range(1, min(count, len(features)) + 1):
        distances = ((total + features) / k - target).norm(dim=1)
        distances[picked] = math.inf
        picked.append(int(distances.argmin()))
        total += features[picked[-1]]
    return picked


def interleaved(orders: list[list[int]]) -> list[int]:
    """The orders' first elements, then their second ones..., so every prefix is as balanced as they allow."""
    return [order[rank] for rank in range(max(map(len, orders), default=0)) for order in orders if rank < len(order)]


def icarl_loss(logits: torch.Tensor, labels: torch.Tensor, old_logits: torch.Tensor | None) -> torch.Tensor:
    """Mean binary cross-entropy of ``logits [B, C]``: one-hot ``labels``, the first ``old_logits.shape[1]`` classes'
    targets replaced by ``sigmoid(old_logits)``."""
    targets = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    if old_logits is not None:
        targets[:, : old_logits.shape[1]] = old_logits.sigmoid()
    return F.binary_cross_entropy_with_logits(logits, targets)


def nearest_mean_scores(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Minus the squared distance of each normalised feature to each class mean ``[C, d]``: the nearest class scores
    highest; a class without exemplars (a row of NaN) scores lowest."""
    distances = torch.cdist(F.normalize(features.float(), dim=1), means.to(features.device)).pow(2)
    return (-distances).nan_to_num(nan=torch.finfo(distances.dtype).min)


@torch.no_grad()
def embeddings(model: nn.Module, images: torch.Tensor, head: int, device) -> torch.Tensor:
    """``model.embed`` of ``images`` in eval mode, ``FEATURE_BATCH`` at a time, on the CPU."""
    with evaluating(model):
        return torch.cat([model.embed(chunk.to(device), head).float().cpu() for chunk in images.split(FEATURE_BATCH)])


class ICaRLPlugin(MultiTaskReplayPlugin):
    """iCaRL: herding exemplars, distillation in a binary cross-entropy, nearest mean of exemplars at test time."""

    state = ("means",)
    """Replay's memory and generators, and each head's class means."""
    model_copies = ("teacher",)
    """The previous experience's model, whose outputs are the old classes' targets."""

    def __init__(self, mem_size: int = 200, ratio: float = 1.0, split: str = "equal", seed: int = 0,
                 mem_per_class: int | None = None, classifier: str = "nme") -> None:
        super().__init__(mem_size=mem_size, ratio=ratio, split=split, seed=seed, mem_per_class=mem_per_class)
        self.classifier = classifier
        self.teacher: nn.Module | None = None
        self.means: dict[int, torch.Tensor] = {}
        """Per head, the mean normalised feature of each class's exemplars ``[C, d]`` (NaN: no exemplar)."""

    @property
    def memory_bytes(self) -> int:
        """The stored samples, the class means and the previous model."""
        return (super().memory_bytes + sum(mean.nbytes for mean in self.means.values())
                + copy_bytes(self.teacher))

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs) -> None:
        experience, model = strategy.experience, strategy.model
        head = experience.task_label

        def herding(dataset: Dataset, targets: list, quota: int) -> list[int]:
            features = embeddings(model, torch.stack([dataset[i][0] for i in range(len(dataset))]), head,
                                  strategy.device)
            classes = sorted(set(targets))
            per_class = math.ceil(quota / max(1, len(classes)))
            members = [[i for i, target in enumerate(targets) if target == c] for c in classes]
            return interleaved([[group[i] for i in herding_order(features[group], per_class)] for group in members])

        self.buffer.add(experience.dataset, experience.current_experience, head, rank=herding)
        self.means = {head: self.class_means(model, head, model.num_classes(head), strategy.device)
                      for head in {memory.head for memory in self.buffer.tasks.values()}}
        self.teacher = frozen_copy(model)

    def class_means(self, model: nn.Module, head: int, classes: int, device) -> torch.Tensor:
        """Each class's mean normalised exemplar feature, normalised (NaN for a class without exemplars)."""
        memories = [memory for memory in self.buffer.tasks.values() if memory.head == head and len(memory)]
        images = torch.stack([memory[i][0] for memory in memories for i in range(len(memory))])
        labels = torch.tensor([target for memory in memories for target in memory.targets])
        features = F.normalize(embeddings(model, images, head, device), dim=1)
        means = torch.full((classes, features.shape[1]), math.nan)
        for c in labels.unique().tolist():
            means[c] = F.normalize(features[labels == c].mean(0), dim=0)
        return means

    def batch_loss(self, strategy) -> torch.Tensor:
        head = strategy.experience.task_label
        old_logits = None
        if self.teacher is not None and head in self.means:
            with torch.no_grad():
                old_logits = self.teacher(strategy.mb_x, head).float()
        return icarl_loss(strategy.mb_output, strategy.mb_y, old_logits)

    def after_eval_forward(self, strategy, **kwargs) -> None:
        head = strategy.experience.task_label
        if self.classifier == "nme" and head in self.means:
            with torch.no_grad():
                features = strategy.model.embed(strategy.mb_x, head)
            strategy.mb_output = nearest_mean_scores(features, self.means[head])[:, : strategy.mb_output.shape[1]]


@dataclass(frozen=True)
class ICaRLSettings:
    """iCaRL's hyperparameters, ``strategy.icarl.<key>``: replay's memory (herding chooses its samples)."""

    mem_size: int = setting(200, AT_LEAST_ONE, help="exemplars stored over all classes", search=(100, 200, 400))
    ratio: float = setting(1.0, POSITIVE, help="stored samples joined to the mini-batch per current sample")
    split: str = setting("equal", one_of(*SPLITS), help="how the memory is shared between experiences")
    seed: int = setting(0, NON_NEGATIVE, help="seed of the draws")
    mem_per_class: int | None = setting(None, AT_LEAST_ONE, help="instead of mem_size: this many exemplars per class")
    classifier: str = setting("nme", one_of(*CLASSIFIERS), help="nme: nearest mean of exemplars at test time; "
                                                                 "softmax: the head's own outputs")


register("icarl", settings=ICaRLSettings, acts_on=("data", "criterion", "loss"), kinds=("classification",),
         needs=("embeddings",))(ICaRLPlugin)
