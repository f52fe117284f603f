"""Weight averaging: an exponential moving average (EMA) of the weights over each experience, used in its place.

Short trainings from scratch end wherever the last minibatches left the weights: on shapes, classification's
validation top-1 swings widely from one epoch to the next. ultralytics trains every YOLO with an EMA of the
weights for this reason, and this plugin reuses its ``ModelEMA`` (parameters and BatchNorm statistics, decay ramped
up as ``decay * (1 - exp(-updates / tau))`` so the random start is soon forgotten). Each experience starts a fresh
average from the weights it begins with, and its end loads the average into the model, so evaluation, checkpoints
and every later plugin (EWC's anchor and Fisher, LwF's teacher, BatchNorm freezing) see the averaged weights: the
plugin must therefore come before them in the template's list.
"""
from __future__ import annotations

import torch

from clmtl import distributed
from clmtl.plugin import Plugin


class WeightAveraging(Plugin, supports_distributed=True):
    """ultralytics' ``ModelEMA`` over each experience's training iterations, swapped into the model at its end."""

    def __init__(self, decay: float, tau: float) -> None:
        super().__init__()
        if not 0 < decay < 1 or tau <= 0:
            raise ValueError(f"weight averaging needs 0 < decay < 1 and tau > 0, got decay={decay}, tau={tau}")
        self.decay = decay
        self.tau = tau
        self._average = None  # a ModelEMA while an experience trains

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._start(strategy.model)

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self._average.update(strategy.model)  # after every plugin's after_update (routing restores frozen entries)

    def after_training_exp(self, strategy, **kwargs) -> None:
        averaged = {k: v for k, v in self._average.ema.state_dict().items() if v.is_floating_point()}
        strategy.model.load_state_dict(averaged, strict=False)  # counters (BatchNorm's batches seen) stay the model's
        if distributed.is_distributed():  # each process averaged its own BatchNorm statistics
            distributed.average_buffers(strategy.model)
        self._average = None

    def state_dict(self) -> dict:
        """The running average inside an experience (run checkpoints taken mid-experience); empty between them."""
        if self._average is None:
            return {}
        return {"updates": self._average.updates, "weights": self._average.ema.state_dict()}

    def load_state_dict(self, state: dict, model: torch.nn.Module) -> None:
        if not state:
            self._average = None
            return
        self._start(model, state["updates"])
        self._average.ema.load_state_dict(state["weights"])

    def _start(self, model: torch.nn.Module, updates: int = 0) -> None:
        from clmtl.ultralytics_shim import ModelEMA

        self._average = ModelEMA(model, decay=self.decay, tau=self.tau, updates=updates)
