"""Elastic Weight Consolidation (Kirkpatrick et al. 2017) on a stream of heterogeneous tasks.

Avalanche's ``EWCPlugin`` keeps the bookkeeping (separate / online modes, decay, saved θ*). Its Fisher
pass moves targets with ``y.to(device)``, which fails on detection's list of box dictionaries; this
subclass moves nested targets and offers two estimators of the diagonal Fisher, both from the task's own
loss (``strategy._criterion``) with the model in eval mode:

- ``empirical`` (default): the mean over samples of each sample's squared loss gradient, the estimator of
  Kirkpatrick et al.;
- ``batch``: the squared gradient of each mini-batch's mean loss, averaged over batches — Avalanche's
  estimator (tested equal to it). Averaging gradients before squaring cancels their noise, so it is
  smaller than ``empirical`` by up to the batch size, and a λ tuned for one does not fit the other.

The penalty is λ Σ F (θ − θ*)².
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from avalanche.models.utils import avalanche_forward
from avalanche.training.plugins import EWCPlugin
from avalanche.training.utils import ParamData, zerolike_params_dict
from torch.utils.data import DataLoader

from clmtl.registry import register
from clmtl.template import to_device


def ewc_penalty(
    model: torch.nn.Module, saved: Mapping[str, ParamData], importances: Mapping[str, ParamData]
) -> torch.Tensor:
    """Σ F (θ − θ*)² over the parameters that have a saved value (new parameters do not count)."""
    terms = [
        (importances[name].data * (param - saved[name].data).pow(2)).sum()
        for name, param in model.named_parameters()
        if name in saved
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


FISHER_ESTIMATORS = ("empirical", "batch")


class MultiTaskEWCPlugin(EWCPlugin):
    """EWC whose Fisher pass and penalty work with any target kind."""

    def __init__(self, ewc_lambda: float, mode: str = "separate", decay_factor: float | None = None,
                 fisher: str = "empirical") -> None:
        if fisher not in FISHER_ESTIMATORS:
            raise ValueError(f"strategy.ewc.fisher must be one of {FISHER_ESTIMATORS}, got {fisher!r}")
        super().__init__(ewc_lambda, mode=mode, decay_factor=decay_factor)
        self.fisher = fisher

    def before_backward(self, strategy, **kwargs) -> None:
        exp_counter = strategy.clock.train_exp_counter
        if exp_counter == 0:
            return
        if self.mode == "separate":
            anchors = range(exp_counter)
        else:  # online: one accumulated importance, saved after the last experience
            anchors = [exp_counter - 1]
        penalty = sum(ewc_penalty(strategy.model, self.saved_params[e], self.importances[e]) for e in anchors)
        strategy.loss += self.ewc_lambda * penalty.to(strategy.device)

    def compute_importances(self, model, criterion, optimizer, dataset, device, batch_size, num_workers=0):
        model.eval()
        importances = zerolike_params_dict(model)
        if self.fisher == "empirical":
            batch_size = 1  # BN is in eval mode, so a one-sample batch gives that sample's own gradient
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate_fn, num_workers=num_workers)
        for batch in loader:
            x, y, task_labels = to_device(batch[0], device), to_device(batch[1], device), batch[-1]
            optimizer.zero_grad()
            criterion(avalanche_forward(model, x, task_labels), y).backward()
            for (name, param), (_, importance) in zip(model.named_parameters(), importances.items()):
                if param.grad is not None:
                    importance.data += param.grad.detach().pow(2)
        for importance in importances.values():
            importance.data /= float(len(loader))
        optimizer.zero_grad()
        model.train()
        return importances


@register("ewc", defaults={"lambda": 1000.0, "mode": "separate", "decay": 0.9, "fisher": "empirical"},
          acts_on=("loss",))
def ewc(params: dict) -> MultiTaskEWCPlugin:
    """EWC: quadratic penalty weighted by the Fisher information (modes separate | online; fisher empirical | batch)."""
    if params["mode"] not in ("separate", "online"):
        raise ValueError(f"strategy.ewc.mode must be 'separate' or 'online', got {params['mode']!r}")
    if not 0.0 <= params["decay"] <= 1.0:
        raise ValueError(f"strategy.ewc.decay must be in [0, 1], got {params['decay']}")
    decay = params["decay"] if params["mode"] == "online" else None
    return MultiTaskEWCPlugin(params["lambda"], mode=params["mode"], decay_factor=decay, fisher=params["fisher"])
