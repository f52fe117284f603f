"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017), as van de Ven & Tolias (2019) run it.

While a task trains, each parameter accumulates its contribution to the fall of the loss along the training path,
``ω += −g · Δθ`` per step (``g``: the gradient the step followed, of the whole training loss). When the task ends its
importance grows by ``ω / (Δ² + ξ)``, ``Δ`` the parameter's total move over the task and ``ξ`` a damping, and the
penalty of later tasks is ``c Σ Ω (θ − θ*)²`` around the weights ``θ*`` at the end of the last task. An importance
that came out negative (the parameter moved against the loss's fall overall) weighs 0 in the penalty, which stays a
sum of squares.

Avalanche's ``SynapticIntelligencePlugin`` (``avalanche.SynapticIntelligence`` here) computes the same path integral
but clamps every importance at 0.001 and halves the penalty, so its ``si_lambda`` has another scale and its penalty a
ceiling; this module follows the paper. A parameter that grows (a class-scenario head) keeps its importance on its
old part; its new rows have none, as in EWC (``clmtl.strategies.ewc.grown``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from clmtl.strategies.ewc import Anchor, ewc_penalty, grown

from clmtl.settings import NON_NEGATIVE, POSITIVE, setting
from clmtl.training.plugin import Plugin, tensor_bytes
from clmtl.training.registry import register


class SynapticIntelligence(Plugin, supports_distributed=True):
    """Synaptic Intelligence: penalty weighted by each parameter's path integral of the loss (Zenke et al. 2017).

    Path-integral importances, accumulated over tasks; a quadratic penalty around the last task's weights."""

    state = ("importance", "anchor", "_path", "_start")
    """Ω and θ* across tasks; the path integral and the starting weights of the task training (a run stopped inside
    it goes on from them)."""
    transient = ("_before_step", "_quadratic")

    def __init__(self, c: float, damping: float = 0.1) -> None:
        super().__init__()
        self.c, self.damping = c, damping
        self.importance: dict[str, torch.Tensor] = {}
        """Ω: each parameter's importance, summed over the finished tasks."""
        self.anchor: dict[str, torch.Tensor] = {}
        """θ*: the weights at the end of the last finished task."""
        self._path: dict[str, torch.Tensor] = {}
        self._start: dict[str, torch.Tensor] = {}
        self._before_step: dict[str, torch.Tensor] = {}
        self._quadratic: Anchor | None = None

    @property
    def memory_bytes(self) -> int:
        """Bytes of Ω and θ* (the per-task path integrals are as large again while a task trains)."""
        return tensor_bytes([*self.importance.values(), *self.anchor.values()])

    def before_training_exp(self, strategy, **kwargs) -> None:
        params = dict(strategy.model.named_parameters())
        self._start = {name: p.detach().clone() for name, p in params.items()}
        self._path = {name: torch.zeros_like(p) for name, p in params.items()}
        self._quadratic = None

    def before_backward(self, strategy, **kwargs) -> None:
        if not self.anchor:
            return
        if self._quadratic is None:
            names = list(self.anchor)
            self._quadratic = Anchor(names, [self.importance[n].clamp(min=0).sqrt() for n in names],
                                     [self.anchor[n] for n in names], 0.0)
        strategy.loss = strategy.loss + self.c * ewc_penalty(strategy.model, self._quadratic).to(strategy.device)

    def before_update(self, strategy, **kwargs) -> None:
        self._before_step = {name: p.detach().clone() for name, p in strategy.model.named_parameters()}

    def after_update(self, strategy, **kwargs) -> None:
        for name, p in strategy.model.named_parameters():
            if p.grad is not None and name in self._path:
                self._path[name] -= p.grad.detach() * (p.detach() - self._before_step[name])

    def after_training_exp(self, strategy, **kwargs) -> None:
        for name, p in strategy.model.named_parameters():
            if name not in self._path:
                continue
            moved = p.detach() - self._start[name]
            gained = self._path[name] / (moved.pow(2) + self.damping)
            old = self.importance.get(name)
            self.importance[name] = gained if old is None else grown(old, gained.shape) + gained
            self.anchor[name] = p.detach().clone()
        self._path, self._start, self._before_step = {}, {}, {}


@dataclass(frozen=True)
class SISettings:
    """Synaptic Intelligence's hyperparameters, ``strategy.si.<key>``."""

    c: float = setting(1.0, NON_NEGATIVE, help="weight of the penalty", search=(0.1, 1.0, 10.0, 100.0, 1000.0))
    damping: float = setting(0.1, POSITIVE, help="ξ, added to each parameter's squared move over a task")


register("si", settings=SISettings, acts_on=("loss",))(SynapticIntelligence)
