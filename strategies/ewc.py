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
- ``predicted``: as ``empirical``, with the label the model predicts (its argmax per sample or pixel) in place of the
  observed one: van de Ven & Tolias's (2019) estimator. Detection has no single predicted labeling and refuses it;
- ``exact``: the true Fisher, an expectation over the model's OWN predictive distribution p(y|x) rather than the
  observed labels: Σ_y p(y|x) (∇ log p(y|x))², averaged over samples. For classification it is computed exactly,
  summing over all C classes (one forward and C backward passes per sample; ``fisher_labels='all'`` in van de
  Ven's continual-learning code). For segmentation and detection a sum over every label map is out of reach, so
  it is estimated with ``fisher_samples`` labelings drawn from the model per sample (``fisher_samples`` backward
  passes): a class per pixel for segmentation, objectness and classes per anchor (Bernoulli) for detection. YOLO's
  box regression is not a likelihood, so boxes add nothing to this estimator. ``fisher_samples`` applies only there.

The penalty is λ Σ F (θ − θ*)², summed over the anchors (θ*, F) of every earlier experience in ``separate`` mode.
That sum is itself one quadratic, A (θ − μ)² + c (``merge_anchors``), which one multi-tensor pass computes with its
gradient (``ewc_penalty``): a training step pays for one anchor however many experiences came before.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from avalanche.models.utils import avalanche_forward
from avalanche.training.plugins import EWCPlugin
from avalanche.training.utils import ParamData
from torch.utils.data import DataLoader

from clmtl.settings import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, one_of, setting
from clmtl.training.plugin import Plugin, tensor_bytes, to_device
from clmtl.training.registry import register


class Anchor(NamedTuple):
    """Σ_e F_e (θ − θ*_e)² over experiences e, as the one quadratic A (θ − μ)² + c per parameter tensor."""

    names: list[str]
    sqrt_weight: list[torch.Tensor]
    """√A, A = Σ_e F_e."""
    center: list[torch.Tensor]
    """μ = Σ_e F_e θ*_e / A (0 where A = 0, which weighs nothing)."""
    constant: float
    """c = Σ_e F_e (θ*_e − μ)², the part that does not move with θ: kept so the penalty's value reads the same."""


def grown(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``tensor`` zero-padded at the end of each dimension to ``shape``: a parameter that grew (a head given new
    classes) keeps its old part where it was, and its new entries have no anchor (Avalanche's ``ParamData.expand``)."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    padded = tensor.new_zeros(shape)
    padded[tuple(slice(0, size) for size in tensor.shape)] = tensor
    return padded


def merge_anchors(anchors: Sequence[tuple[Mapping[str, ParamData], Mapping[str, ParamData]]]) -> Anchor:
    """The ``Anchor`` of several (θ*, F) pairs of name -> tensor (or Avalanche ``ParamData``) maps; a parameter counts
    in the pairs that saved it with a nonzero F, each padded to the largest shape the parameter had (``grown``).

    A pair whose F is zero for a parameter (a head its experience did not train) adds nothing to the penalty, so it
    is left out, and a parameter no pair weighs gets no penalty term: its gradient stays None, which an optimizer
    skips, where a zero one would still decay it. This keeps μ = θ* exact where one experience weighs a parameter
    (F θ* / F would round, and Adam turns a rounding-sized gradient into a full step) and leaves the heads of tasks
    not trained yet untouched, so a continued run, whose parent never had the new tasks' heads, trains exactly as
    one run with every task."""
    names = list(dict.fromkeys(name for saved, _ in anchors for name in saved))
    sqrt_weight, center, constant, weighed = [], [], 0.0, []
    for name in names:
        pairs = [(saved[name].data, importances[name].data) for saved, importances in anchors
                 if name in saved and importances[name].data.any()]
        if not pairs:
            continue
        weighed.append(name)
        shape = [max(sizes) for sizes in zip(*(value.shape for value, _ in pairs))]
        values = [grown(value, shape) for value, _ in pairs]
        weights = [grown(weight, shape) for _, weight in pairs]
        if len(weights) == 1:  # μ = θ* exactly (F θ* / F would round)
            total, mean = weights[0], values[0]
        else:
            total = torch.stack(weights).sum(0)
            mean = torch.where(total > 0, sum(w * v for w, v in zip(weights, values)) / total, torch.zeros_like(total))
            constant += sum(float((w * (v - mean).pow(2)).sum(dtype=torch.float64)) for w, v in zip(weights, values))
        sqrt_weight.append(total.sqrt())
        center.append(mean)
    return Anchor(weighed, sqrt_weight, center, constant)


class _QuadraticPenalty(torch.autograd.Function):
    """Σ_i ‖√A_i (θ_i − μ_i)‖² and its gradient 2 A_i (θ_i − μ_i) in a few multi-tensor (``foreach``) kernels,
    instead of the autograd graph of four small operations per parameter tensor (~400 on the unified model)."""

    @staticmethod
    def forward(ctx, sqrt_weight: list[torch.Tensor], center: list[torch.Tensor], *params: torch.Tensor):
        scaled = torch._foreach_mul(torch._foreach_sub(params, center), sqrt_weight)
        ctx.scaled, ctx.sqrt_weight = scaled, sqrt_weight
        return torch.stack(torch._foreach_norm(scaled)).square().sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads = torch._foreach_mul(torch._foreach_mul(ctx.scaled, ctx.sqrt_weight), 2.0 * float(grad_output))
        return None, None, *grads


def ewc_penalty(model: torch.nn.Module, anchor: Anchor) -> torch.Tensor:
    """Σ_e Σ F_e (θ − θ*_e)² over the parameters that have a saved value (new parameters do not count, nor do the
    rows a parameter grew since: their weight is 0)."""
    if not anchor.names:
        return torch.zeros(())
    named = dict(model.named_parameters())
    params = [named[name] for name in anchor.names]
    sqrt_weight = [grown(weight, param.shape) for weight, param in zip(anchor.sqrt_weight, params)]
    center = [grown(mean, param.shape) for mean, param in zip(anchor.center, params)]
    return _QuadraticPenalty.apply(sqrt_weight, center, *params) + anchor.constant


FISHER_ESTIMATORS = ("empirical", "batch", "predicted", "exact")


def predicted_labels(output: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The model's own most likely labels: a class per sample (classification) or per pixel (segmentation)."""
    if isinstance(output, (list, tuple)):
        raise ValueError("strategy.ewc.fisher=predicted: detection outputs have no single predicted labeling; use "
                         "empirical, batch or exact")
    return output.detach().argmax(1)


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


def fisher_terms(output: torch.Tensor | list[torch.Tensor],
                 samples: int) -> list[tuple[torch.Tensor | float, torch.Tensor]]:
    """``(weight, negative log-likelihood)`` pairs of one sample's output; the weighted sum of their squared gradients
    is the sample's true-Fisher diagonal Σ_y p(y|x) (∇ log p(y|x))². Classification: every class c with weight
    p(c|x), so the sum is exact. Segmentation and detection: ``samples`` labelings drawn from the model, each with
    weight 1 / ``samples``, an unbiased estimate of it."""
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        if output.shape[0] != 1:
            raise ValueError(f"the exact Fisher is per sample: expected one sample's logits, got {tuple(output.shape)}")
        log_probs = output[0].log_softmax(-1)
        return [(weight, -log_prob) for weight, log_prob in zip(log_probs.detach().exp(), log_probs)]
    return [(1.0 / samples, sampled_nll(output)) for _ in range(samples)]


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)``: each part of a dataset (a sorted one's every class)
    keeps its share, and no random draw moves the run's generators."""
    return [index * total // count for index in range(count)]


class MultiTaskEWCPlugin(EWCPlugin, Plugin, supports_distributed=True):
    """EWC: Fisher-weighted quadratic penalty (mode separate | online; fisher empirical | batch | predicted | exact).

    Its Fisher pass and penalty work with any target kind. The arguments are ``EWCSettings``' fields: ``lambda_`` is
    the config key ``lambda`` (stored as Avalanche's ``ewc_lambda``), ``decay`` applies in online mode only (Avalanche's
    ``decay_factor``)."""

    state = ("saved_params", "importances", "fisher_seconds", "fisher_means")
    """θ* and the Fisher diagonals of every finished experience (``ParamData`` by parameter name), and what results.json
    records of each Fisher pass."""
    transient = ("_anchor",)

    def __init__(self, lambda_: float, mode: str = "separate", decay: float = 0.9, fisher: str = "empirical",
                 fisher_samples: int = 1, fisher_max_samples: int = 0) -> None:
        super().__init__(lambda_, mode=mode, decay_factor=decay if mode == "online" else None)
        self.fisher = fisher
        self.fisher_samples = fisher_samples
        self.fisher_max_samples = fisher_max_samples
        """At most this many of the task's samples, evenly spaced, estimate its Fisher (0: all): with batch size 1
        the pass costs about a training step per sample (van de Ven's code calls it ``fisher_n``)."""
        self.fisher_seconds: list[float] = []
        """Wall-clock seconds of each experience's Fisher pass, so its cost can be reported."""
        self.fisher_means: list[float] = []
        """Each experience's Fisher diagonal, averaged over every parameter entry."""
        self._anchor: Anchor | None = None
        """The merged anchors of the experience being trained (they change only between experiences)."""

    def stats(self) -> dict[str, list[float]]:
        """What results.json records of this plugin: the seconds of each experience's Fisher pass, and the mean of its
        Fisher diagonal over every parameter (the scale λ multiplies: it shrinks as a task's loss vanishes)."""
        return {"fisher_seconds": list(self.fisher_seconds), "fisher_mean": list(self.fisher_means)}

    @property
    def memory_bytes(self) -> int:
        """Bytes of the stored anchors θ* and Fisher diagonals (one pair per experience in separate mode)."""
        stores = [*self.saved_params.values(), *self.importances.values()]
        return tensor_bytes(p.data for store in stores for p in store.values())

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._anchor = None  # the anchors changed after the last experience
        super().before_training_exp(strategy, **kwargs)

    def before_backward(self, strategy, **kwargs) -> None:
        exp_counter = strategy.clock.train_exp_counter
        if exp_counter == 0:
            return
        if self._anchor is None:
            # separate: every earlier experience's own anchor; online: one accumulated, saved after the last one
            experiences = range(exp_counter) if self.mode == "separate" else [exp_counter - 1]
            self._anchor = merge_anchors([(self.saved_params[e], self.importances[e]) for e in experiences])
        strategy.loss += self.ewc_lambda * ewc_penalty(strategy.model, self._anchor).to(strategy.device)

    def compute_importances(self, model, criterion, optimizer, dataset, device, batch_size, num_workers=0):
        start = time.perf_counter()
        model.eval()
        importances = {  # as Avalanche's zerolike_params_dict, but a float64 model gets a float64 Fisher
            name: ParamData(name, init_tensor=torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)),
                            device=p.device)
            for name, p in model.named_parameters()
        }
        if self.fisher_max_samples and len(dataset) > self.fisher_max_samples:
            dataset = dataset.subset(evenly_spaced(len(dataset), self.fisher_max_samples))
        if self.fisher != "batch":
            batch_size = 1  # BN is in eval mode, so a one-sample batch gives that sample's own gradient
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate_fn, num_workers=num_workers)
        for batch in loader:
            x, y, task_labels = to_device(batch[0], device), to_device(batch[1], device), batch[-1]
            output = avalanche_forward(model, x, task_labels)
            if self.fisher == "exact":
                terms = fisher_terms(output, self.fisher_samples)
            elif self.fisher == "predicted":
                terms = [(1.0, criterion(output, predicted_labels(output)))]
            else:
                terms = [(1.0, criterion(output, y))]
            for index, (weight, loss) in enumerate(terms):
                optimizer.zero_grad()
                loss.backward(retain_graph=index < len(terms) - 1)  # one forward serves every term
                for param, importance in zip(model.parameters(), importances.values()):
                    if param.grad is not None:
                        importance.data += weight * param.grad.detach().pow(2)
        for importance in importances.values():
            importance.data /= float(len(loader))
        optimizer.zero_grad()
        model.train()
        self.fisher_seconds.append(time.perf_counter() - start)
        total = sum(float(importance.data.sum(dtype=torch.float64)) for importance in importances.values())
        self.fisher_means.append(total / max(1, sum(importance.data.numel() for importance in importances.values())))
        return importances


@dataclass(frozen=True)
class EWCSettings:
    """EWC's hyperparameters, ``strategy.ewc.<key>``."""

    lambda_: float = setting(1000.0, NON_NEGATIVE, help="λ, the weight of the penalty",
                             search=(1e2, 1e3, 1e4, 1e5, 1e6))
    mode: str = setting("separate", one_of("separate", "online"),
                        help="separate: one anchor per experience; online: one anchor, importances accumulated")
    decay: float = setting(0.9, FRACTION, help="online mode: weight of the accumulated importances")
    fisher: str = setting("empirical", one_of(*FISHER_ESTIMATORS), help="the Fisher estimator (module docstring)")
    fisher_samples: int = setting(1, AT_LEAST_ONE, help="exact, segmentation and detection only: labelings drawn "
                                  "per sample (classification sums over all classes exactly)")
    fisher_max_samples: int = setting(0, NON_NEGATIVE, help="estimate the Fisher on at most this many of the "
                                      "task's samples, evenly spaced (0: all of them)")


register("ewc", settings=EWCSettings, acts_on=("loss",))(MultiTaskEWCPlugin)
