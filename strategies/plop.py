"""PLOP (Douillard et al., CVPR 2021, "PLOP: Learning without Forgetting for Continual Semantic Segmentation").

On the segmentation head the class scenario shares, with ``old`` the classes it had before the experience:

- **Local POD distillation.** Each feature map, squared, is cut into s×s regions for s in 1, 2, 4; each region is
  averaged over its width (a value per channel and row) and over its height (per channel and column), and the
  concatenation is the map's embedding. The loss is the L2 distance between the new and the previous model's
  embeddings, a mean over images, for the backbone's three tapped maps and the FPN level the segmentation head reads
  (weight ``pod``, the paper's 0.01) and for the logits (weight ``pod_logits``, 0.0005), the new model's new classes
  summed into its background first (what the previous model called background). Each weight is multiplied by
  sqrt(classes / new classes), and the sum divided by the number of maps, as the authors' code does.
- **Pseudo-labels.** A pixel labelled background takes the previous model's class where that model is confident: its
  normalised entropy H(p) / log(old) below the class's threshold, the median over the experience's training pixels
  labelled background that the previous model gives that class (at least ``min_threshold``, 0.001), computed once
  when the experience starts. Unconfident background pixels are ignored. Each image's cross-entropy (a mean over all
  its pixels, ignored ones counting 0, as in the authors' code) is weighted by the fraction of its background pixels
  that got a confident label; an image without background pixels keeps weight 1 (the authors' code gives it 0).
  This replaces the mini-batch's cross-entropy (the criterion action). The threshold is the paper's median; the
  authors' released code sums each histogram bin's index where it means the bin's count, which keeps every pixel of a
  class that no single bin holds half of (``min_threshold: 1`` keeps every pixel; docs/benchmarks.md measures both).
- **Initialisation.** New classes' rows start from the background row, as MiB's (``strategies/mib.py``; also
  ``init_from_background``).

Local POD is tested against the formula on a hand-made map (``tests/test_plop.py``). The features are read from the
model's ``backbone`` and ``neck`` (declared: ``needs=("pyramid",)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clmtl.settings import FRACTION, NON_NEGATIVE, setting
from clmtl.strategies.mib import BackgroundShiftPlugin, BackgroundShiftSettings
from clmtl.stream.tasks import IGNORE_INDEX
from clmtl.training.plugin import evaluating, to_device
from clmtl.training.registry import register

POD_SCALES = (1, 2, 4)
THRESHOLD_BATCH = 32
"""Images the previous model reads at once when the entropy thresholds are computed."""


def local_pod(maps: torch.Tensor, scales: tuple[int, ...] = POD_SCALES) -> torch.Tensor:
    """PLOP's Local POD embedding ``[B, D]`` of ``maps [B, C, H, W]``: for each scale s, the s×s regions' means over
    their width and over their height, concatenated."""
    height, width = maps.shape[-2:]
    parts = []
    for scale in scales:
        rows, columns = height // scale, width // scale
        for i in range(scale):
            for j in range(scale):
                region = maps[..., i * rows:(i + 1) * rows, j * columns:(j + 1) * columns]
                parts += [region.mean(3).flatten(1), region.mean(2).flatten(1)]
    return torch.cat(parts, 1)


def pod_distance(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Mean over images of the L2 distance between the Local POD embeddings of the squared maps."""
    return (local_pod(new.pow(2)) - local_pod(old.pow(2))).norm(dim=1).mean()


def background_summed(logits: torch.Tensor, old: int) -> torch.Tensor:
    """``logits [B, C, ...]`` over the ``old`` classes, the new classes' logits added to the background's."""
    return torch.cat([logits[:, :1] + logits[:, old:].sum(1, keepdim=True), logits[:, 1:old]], 1)


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over dim 1, divided by its largest value, log(classes)."""
    log_probs = logits.float().log_softmax(1)
    return -(log_probs.exp() * log_probs).sum(1) / math.log(logits.shape[1])


def entropy_thresholds(old_logits: torch.Tensor, labels: torch.Tensor, minimum: float) -> torch.Tensor:
    """Per old class, the median normalised entropy of the background pixels the previous model gives it (at least
    ``minimum``; ``minimum`` for a class it gives none)."""
    background = labels == 0
    predicted, entropy = old_logits.argmax(1)[background], normalised_entropy(old_logits)[background]
    thresholds = torch.full((old_logits.shape[1],), minimum)
    for c in predicted.unique().tolist():
        thresholds[c] = max(minimum, float(entropy[predicted == c].median()))
    return thresholds


def pseudo_labelled(labels: torch.Tensor, old_logits: torch.Tensor,
                    thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels with each background pixel given the previous model's class where it is confident and ignored
    elsewhere, and each image's weight: the fraction of its background pixels that were confident (1 without any)."""
    predicted = old_logits.argmax(1)
    confident = normalised_entropy(old_logits) < thresholds.to(labels.device)[predicted]
    background = labels == 0
    pseudo = torch.where(background, torch.where(confident, predicted, IGNORE_INDEX), labels)
    kept, total = (background & confident).flatten(1).sum(1), background.flatten(1).sum(1)
    weight = torch.where(total > 0, kept / total.clamp(min=1), torch.ones_like(kept, dtype=torch.float))
    return pseudo, weight.float()


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy (ignored pixels 0), each image's weighted, a mean over every pixel."""
    per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (per_pixel * weight[:, None, None]).mean()


class FeatureTap:
    """The backbone's tapped maps and the FPN levels of a model's forward passes while the tap is on."""

    def __init__(self, model: nn.Module) -> None:
        self.maps: list[torch.Tensor] = []
        keep = self.maps.extend
        self.handles = [model.backbone.register_forward_hook(lambda module, args, out: keep(out)),
                        model.neck.register_forward_hook(lambda module, args, out: keep(out.values()))]

    def remove(self) -> list[torch.Tensor]:
        for handle in self.handles:
            handle.remove()
        return self.maps


class PLOPPlugin(BackgroundShiftPlugin):
    """PLOP: Local POD of the features and logits, pseudo-labels of old classes on confident background pixels."""

    method = "plop"
    state = ("thresholds", "thresholds_for")
    transient = ("_tap", "_old")

    def __init__(self, pod: float = 0.01, pod_logits: float = 0.0005, min_threshold: float = 0.001,
                 init_from_background: bool = True) -> None:
        super().__init__(init_from_background)
        self.pod, self.pod_logits, self.min_threshold = pod, pod_logits, min_threshold
        self.thresholds: torch.Tensor | None = None
        """Per old class, the normalised entropy below which the previous model's label is taken."""
        self.thresholds_for = -1
        """The experience the thresholds were computed for."""
        self._tap: FeatureTap | None = None
        self._old: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        """This step's previous-model logits and maps."""

    @torch.no_grad()
    def before_training_exp(self, strategy, **kwargs) -> None:
        super().before_training_exp(strategy)
        experience = strategy.experience.current_experience
        if not self.old_classes(strategy) or self.thresholds_for == experience:
            return
        dataset = strategy.experience.dataset
        dataset = dataset.eval() if hasattr(dataset, "eval") else dataset
        logits, labels = [], []
        with torch.random.fork_rng(devices=[]), evaluating(self.teacher):
            for start in range(0, len(dataset), THRESHOLD_BATCH):
                samples = [dataset[i] for i in range(start, min(start + THRESHOLD_BATCH, len(dataset)))]
                images = to_device(torch.stack([s[0] for s in samples]), strategy.device)
                logits.append(self.teacher(images, strategy.experience.task_label).float().cpu())
                labels.append(torch.stack([s[1] for s in samples]))
        self.thresholds = entropy_thresholds(torch.cat(logits), torch.cat(labels), self.min_threshold)
        self.thresholds_for = experience

    def before_forward(self, strategy, **kwargs) -> None:
        if self.old_classes(strategy):
            self._tap = FeatureTap(strategy.model)

    def after_forward(self, strategy, **kwargs) -> None:
        if self._tap is not None:
            self._tap.remove()

    def batch_loss(self, strategy) -> torch.Tensor | None:
        if not self.old_classes(strategy):
            return None
        tap = FeatureTap(self.teacher)
        old_logits = self.previous_output(strategy).float()
        self._old = old_logits, tap.remove()
        labels, weight = pseudo_labelled(strategy.mb_y, old_logits, self.thresholds)
        return weighted_cross_entropy(strategy.mb_output, labels, weight)

    def before_backward(self, strategy, **kwargs) -> None:
        if self._old is None or self._tap is None:
            return
        (old_logits, old_maps), new_maps = self._old, self._tap.maps
        self._old = self._tap = None
        old = old_logits.shape[1]
        schedule = math.sqrt(strategy.mb_output.shape[1] / (strategy.mb_output.shape[1] - old))
        terms = [self.pod * pod_distance(new, previous) for new, previous in zip(new_maps, old_maps)]
        terms.append(self.pod_logits * pod_distance(background_summed(strategy.mb_output, old), old_logits))
        strategy.loss += schedule * torch.stack(terms).sum() / len(terms)


@dataclass(frozen=True)
class PLOPSettings(BackgroundShiftSettings):
    """PLOP's hyperparameters, ``strategy.plop.<key>`` (the paper's defaults)."""

    pod: float = setting(0.01, NON_NEGATIVE, help="weight of Local POD on the backbone and FPN maps",
                         search=(0.001, 0.01, 0.1))
    pod_logits: float = setting(0.0005, NON_NEGATIVE, help="weight of Local POD on the logits")
    min_threshold: float = setting(0.001, FRACTION, help="lowest entropy threshold of a pseudo-label")


register("plop", settings=PLOPSettings, acts_on=("model", "criterion", "loss"), kinds=("segmentation",),
         needs=("pyramid",))(PLOPPlugin)
