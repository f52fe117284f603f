"""Elastic Weight Consolidation (Kirkpatrick et al. 2017) on a stream of heterogeneous tasks.

Avalanche's ``EWCPlugin`` keeps the bookkeeping (separate / online modes, decay, saved θ*). Its Fisher
pass moves targets with ``y.to(device)``, which fails on detection's list of box dictionaries; this
subclass moves nested targets and offers two estimators of the diagonal Fisher, both from the task's own
loss (``strategy._criterion``) with the model in eval mode:

- ``empirical`` (default): the mean over samples of each sample's squared loss gradient, the estimator of
  Kirkpatrick et al.;
- ``batch``: the squared gradient of each mini-batch's mean loss, averaged over batches — Avalanche's
  estimator (tested equal to it). Averaging gradients before squaring cancels their noise, so it is
  smaller than ``empirical`` by up to the batch size, and a λ tuned for one does not fit the other;
- ``exact``: the true Fisher, an expectation over the model's OWN predictive distribution rather than the
  observed labels, estimated per sample with ``fisher_samples`` labels drawn from it: a class for
  classification, a class per pixel for segmentation, objectness and classes per anchor (Bernoulli) for
  detection. YOLO's box regression is not a likelihood, so boxes add nothing to this estimator. It costs
  ``fisher_samples`` backward passes per sample.

The penalty is λ Σ F (θ − θ*)².
"""
from __future__ import annotations

import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
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


FISHER_ESTIMATORS = ("empirical", "batch", "exact")


def sampled_nll(output: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Negative log-likelihood of labels drawn from the model's own predictive distribution (one draw).

    Classification ``[B, C]`` and segmentation ``[B, C, H, W]`` logits are categorical per sample / pixel
    (mean over pixels, as the training loss); detection's raw levels ``[B, A, H, W, 5 + C]`` are Bernoulli in
    objectness per anchor and in each class on the anchors whose drawn objectness is 1.
    """
    if isinstance(output, (list, tuple)):
        terms = []
        for raw in output:
            objectness, classes = raw[..., 4], raw[..., 5:]
            drawn = torch.bernoulli(objectness.detach().sigmoid())
            terms.append(F.binary_cross_entropy_with_logits(objectness, drawn))
            positive = drawn.bool()
            if positive.any():
                logits = classes[positive]
                terms.append(F.binary_cross_entropy_with_logits(logits, torch.bernoulli(logits.detach().sigmoid())))
        return torch.stack(terms).sum()
    logits = output if output.dim() == 2 else output.movedim(1, -1).reshape(-1, output.shape[1])
    drawn = torch.multinomial(logits.detach().softmax(-1), 1).squeeze(1)
    return F.cross_entropy(logits, drawn)


class MultiTaskEWCPlugin(EWCPlugin, supports_distributed=True):
    """EWC whose Fisher pass and penalty work with any target kind."""

    def __init__(self, ewc_lambda: float, mode: str = "separate", decay_factor: float | None = None,
                 fisher: str = "empirical", fisher_samples: int = 1) -> None:
        if fisher not in FISHER_ESTIMATORS:
            raise ValueError(f"strategy.ewc.fisher must be one of {FISHER_ESTIMATORS}, got {fisher!r}")
        if fisher_samples < 1:
            raise ValueError(f"strategy.ewc.fisher_samples must be >= 1, got {fisher_samples}")
        super().__init__(ewc_lambda, mode=mode, decay_factor=decay_factor)
        self.fisher = fisher
        self.fisher_samples = fisher_samples
        self.fisher_seconds: list[float] = []
        """Wall-clock seconds of each experience's Fisher pass, so its cost can be reported."""

    def state_dict(self) -> dict:
        """θ* and Fisher diagonals of every finished experience, as tensors (for run checkpoints)."""
        def tensors(store: dict) -> dict:
            return {exp: {name: p.data.clone() for name, p in params.items()} for exp, params in store.items()}

        return {"saved_params": tensors(self.saved_params), "importances": tensors(self.importances),
                "fisher_seconds": list(self.fisher_seconds)}

    def load_state_dict(self, state: dict, model: torch.nn.Module) -> None:
        def params(store: dict) -> dict:
            return {exp: {name: ParamData(name, init_tensor=t.clone()) for name, t in values.items()}
                    for exp, values in store.items()}

        self.saved_params = params(state["saved_params"])
        self.importances = params(state["importances"])
        self.fisher_seconds = list(state["fisher_seconds"])

    def stats(self) -> dict[str, list[float]]:
        """What results.json records of this plugin: the seconds of each experience's Fisher pass."""
        return {"fisher_seconds": list(self.fisher_seconds)}

    @property
    def memory_bytes(self) -> int:
        """Bytes of the stored anchors θ* and Fisher diagonals (one pair per experience in separate mode)."""
        stores = [*self.saved_params.values(), *self.importances.values()]
        return sum(p.data.numel() * p.data.element_size() for store in stores for p in store.values())

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
        start = time.perf_counter()
        model.eval()
        importances = zerolike_params_dict(model)
        if self.fisher != "batch":
            batch_size = 1  # BN is in eval mode, so a one-sample batch gives that sample's own gradient
        draws = self.fisher_samples if self.fisher == "exact" else 1
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate_fn, num_workers=num_workers)
        for batch in loader:
            x, y, task_labels = to_device(batch[0], device), to_device(batch[1], device), batch[-1]
            for _ in range(draws):
                optimizer.zero_grad()
                output = avalanche_forward(model, x, task_labels)
                loss = sampled_nll(output) if self.fisher == "exact" else criterion(output, y)
                loss.backward()
                for param, importance in zip(model.parameters(), importances.values()):
                    if param.grad is not None:
                        importance.data += param.grad.detach().pow(2)
        for importance in importances.values():
            importance.data /= float(len(loader) * draws)
        optimizer.zero_grad()
        model.train()
        self.fisher_seconds.append(time.perf_counter() - start)
        return importances


@register("ewc", defaults={"lambda": 1000.0, "mode": "separate", "decay": 0.9, "fisher": "empirical",
                           "fisher_samples": 1}, acts_on=("loss",))
def ewc(params: dict) -> MultiTaskEWCPlugin:
    """EWC: Fisher-weighted quadratic penalty (mode separate | online; fisher empirical | batch | exact)."""
    if params["mode"] not in ("separate", "online"):
        raise ValueError(f"strategy.ewc.mode must be 'separate' or 'online', got {params['mode']!r}")
    if not 0.0 <= params["decay"] <= 1.0:
        raise ValueError(f"strategy.ewc.decay must be in [0, 1], got {params['decay']}")
    decay = params["decay"] if params["mode"] == "online" else None
    return MultiTaskEWCPlugin(params["lambda"], mode=params["mode"], decay_factor=decay, fisher=params["fisher"],
                              fisher_samples=params["fisher_samples"])
