"""Weight averaging: an exponential moving average (EMA) of the weights over each experience, used in its place.

Short trainings from scratch end wherever the last minibatches left the weights: on shapes, classification's
validation top-1 swings widely from one epoch to the next. ultralytics trains every YOLO with an EMA of the
weights for this reason, and this plugin averages as its ``ModelEMA`` does (parameters and BatchNorm statistics, one
``lerp`` per update, decay ramped up as ``decay * (1 - exp(-updates / tau))`` so the random start is soon
forgotten), in a declared model copy that a run stopped inside an experience keeps. Each experience starts a fresh
average from the weights it begins with, and its end loads the average into the model, so evaluation, checkpoints
and every later plugin (EWC's anchor and Fisher, LwF's teacher, BatchNorm freezing) see the averaged weights: the
plugin must therefore come before them in the template's list.
"""
from __future__ import annotations

import math

import torch

from clmtl.training import distributed
from clmtl.training.plugin import Plugin, frozen_copy


class WeightAveraging(Plugin, supports_distributed=True):
    """ultralytics' moving average over each experience's training iterations, swapped into the model at its end."""

    state = ("updates",)
    model_copies = ("average",)
    """The moving average while an experience trains; None between experiences, when there is nothing to carry."""
    transient = ("_pairs",)

    def __init__(self, decay: float, tau: float) -> None:
        super().__init__()
        if not 0 < decay < 1 or tau <= 0:
            raise ValueError(f"weight averaging needs 0 < decay < 1 and tau > 0, got decay={decay}, tau={tau}")
        self.decay = decay
        self.tau = tau
        self.average: torch.nn.Module | None = None
        self.updates = 0
        """Updates of the average in this experience."""
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        """The average's floating-point tensors and the model's, paired at the first update (updated in place)."""

    def before_training_exp(self, strategy, **kwargs) -> None:
        self.average, self.updates, self._pairs = frozen_copy(strategy.model), 0, None

    @torch.no_grad()
    def after_training_iteration(self, strategy, **kwargs) -> None:
        # after every plugin's after_update (routing restores frozen entries)
        self.updates += 1
        decay = self.decay * (1 - math.exp(-self.updates / self.tau))
        if self._pairs is None:
            model = strategy.model.state_dict()
            floats = [(name, value) for name, value in self.average.state_dict().items() if value.is_floating_point()]
            self._pairs = [value for _, value in floats], [model[name] for name, _ in floats]
        torch._foreach_lerp_(*self._pairs, 1 - decay)

    def after_training_exp(self, strategy, **kwargs) -> None:
        averaged = {k: v for k, v in self.average.state_dict().items() if v.is_floating_point()}
        strategy.model.load_state_dict(averaged, strict=False)  # counters (BatchNorm's batches seen) stay the model's
        if distributed.is_distributed():  # each process averaged its own BatchNorm statistics
            distributed.average_buffers(strategy.model)
        self.average, self.updates, self._pairs = None, 0, None
