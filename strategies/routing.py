"""Dynamic routing: each task learns which channels of the shared layers it uses, and later tasks cannot change
the channels earlier tasks use (Hard Attention to the Task, Serra et al. 2018, with PackNet-style frozen filters).

The model gets task routes (``clmtl.models.routing``): per task and gate point, an embedding whose gate multiplies
the point's output channels. While task t trains:

- its gates are ``sigmoid(s * e[t])`` with ``s`` rising linearly from ``1 / s_max`` to ``s_max`` over the
  experience's iterations (HAT's annealing), so they end at 0 or 1; afterwards the route is ``e[t] > 0``;
- the loss gets ``sparsity ×`` the mean of its gates over the channels no earlier task uses (HAT's regulariser):
  a task takes fresh channels only where they pay, and reuses the protected ones for free;
- the embeddings are clamped to ``±bound`` after each step (HAT's ``thres_emb``, so the gates stay trainable);
- after every optimizer step, everything an earlier task's output depends on is copied back from a snapshot taken
  at the start of the experience: for each protected channel (used by a finished task) its conv filter (output row
  and bias) and its BatchNorm weight, bias and running statistics; each finished task's head (its rows of the 1x1
  prediction conv, or its classifier); the finished tasks' embeddings. Restoring after the step, rather than
  masking gradients, is exact whatever the optimizer's momentum or weight decay, and it also undoes BatchNorm
  statistics the forward pass moved. A finished task's outputs therefore never change (tested to 1e-5);
- a protected BatchNorm channel normalises with its frozen statistics in training too, as it will at inference,
  rather than with the batch's: otherwise the new task would learn on features scaled differently from those it is
  evaluated with.

The embeddings train in the run's optimizer, in a parameter group ``routes`` of their own (learning rate ``lr``, no
weight decay): Avalanche's optimizer update refuses parameters it cannot place in the groups ``clmtl run`` builds.
Routing costs ``num_tasks × (gated channels)`` parameters, and ``forward_all`` one pass per task (docs/strategies.md,
Routing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clmtl.models.routing import TaskRoutes
from clmtl.settings import NON_NEGATIVE, POSITIVE, rule, setting
from clmtl.stream.scenario import require_own_heads
from clmtl.training.plugin import Plugin, tensor_bytes
from clmtl.training.registry import register


@dataclass
class _Frozen:
    """Entries ``index`` (along dim 0) of ``tensor`` and the values to put back there."""

    tensor: torch.Tensor
    index: torch.Tensor
    values: torch.Tensor

    def restore(self) -> None:
        self.tensor.data.index_copy_(0, self.index, self.values)


def protected_entries(model: nn.Module, task: int) -> list[_Frozen]:
    """Everything the outputs of the finished tasks other than ``task`` depend on, with its current values."""
    routes: TaskRoutes = model.routes
    entries = []

    def freeze(tensor: torch.Tensor, index: torch.Tensor) -> None:
        if index.numel():
            index = index.to(tensor.device)
            entries.append(_Frozen(tensor, index, tensor.detach()[index].clone()))

    for point, used in zip(routes.points, routes.used(exclude=task)):
        index = used.nonzero().flatten()
        tensors = [point.conv.weight, point.conv.bias]
        if point.bn is not None:
            tensors += [point.bn.weight, point.bn.bias, point.bn.running_mean, point.bn.running_var]
        for tensor in tensors:
            if tensor is not None:
                freeze(tensor, index)
    finished = [t for t in range(routes.num_tasks) if bool(routes.finished[t]) and t != task]
    for embedding in routes.embeddings:
        freeze(embedding, torch.tensor(finished, dtype=torch.long))
    for t in finished:  # each finished task's own head
        for tensor in model.head.rows(t).parameters():
            freeze(tensor, torch.arange(tensor.shape[0]))
    return entries


class _FrozenStatistics:
    """Forward hook on a BatchNorm in train mode: its protected channels normalise with their frozen statistics."""

    def __init__(self, bn: nn.BatchNorm2d, used: torch.Tensor) -> None:
        self.mean, self.var = bn.running_mean.detach().clone(), bn.running_var.detach().clone()
        self.used = used.view(1, -1, 1, 1)

    def __call__(self, bn: nn.BatchNorm2d, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not bn.training:
            return None
        frozen = F.batch_norm(args[0], self.mean, self.var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return torch.where(self.used, frozen, output)


class RoutingPlugin(Plugin, supports_distributed=True):
    """Dynamic routing (HAT): learned per-task channel gates; channels of finished tasks frozen.

    Learns a route per task with HAT's annealed gates and sparsity penalty, and freezes finished tasks' routes."""

    state = ("usage", "free", "snapshot_bytes", "_routes_bytes")
    """What results.json reports: the routes themselves are in the model's state dict."""
    transient = ("_frozen", "_free", "_hooks")
    """The protected entries, free channels and BatchNorm hooks of the task being trained, set up as it starts."""

    def __init__(self, sparsity: float = 0.75, s_max: float = 400.0, lr: float = 0.01, bound: float = 6.0) -> None:
        super().__init__()
        self.sparsity, self.s_max, self.lr, self.bound = sparsity, s_max, lr, bound
        self._task: int | None = None
        self._iterations = 1
        self._frozen: list[_Frozen] = []
        self._free: list[torch.Tensor] = []
        self._hooks: list = []
        self.usage: dict[int, float] = {}
        """Fraction of the gated channels each finished task's route uses."""
        self.free = 1.0
        """Fraction of the gated channels no finished task uses yet."""
        self.snapshot_bytes = 0
        """Bytes of the largest snapshot of protected entries held while training."""
        self._routes_bytes = 0

    @property
    def memory_bytes(self) -> int:
        """Bytes of the route embeddings (part of the model) and of the largest snapshot of protected entries."""
        return self._routes_bytes + self.snapshot_bytes

    def stats(self) -> dict:
        return {"channels_used": {str(task): share for task, share in sorted(self.usage.items())},
                "channels_free": self.free, "snapshot_bytes": self.snapshot_bytes}

    def bind_benchmark(self, benchmark) -> None:
        require_own_heads("routing", benchmark.tasks)

    # -- training --------------------------------------------------------------------------------------------------
    def before_training(self, strategy, **kwargs) -> None:
        params = list(strategy.model.enable_routing().parameters())
        self._routes_bytes = tensor_bytes(params)
        if not any(p is params[0] for group in strategy.optimizer.param_groups for p in group["params"]):
            strategy.optimizer.add_param_group({"params": params, "name": "routes", "lr": self.lr, "weight_decay": 0.0})

    def before_training_exp(self, strategy, **kwargs) -> None:
        model = strategy.model
        routes: TaskRoutes = model.routes
        self._task = strategy.experience.task_label
        routes.training_task = self._task
        self._iterations = max(1, strategy.planned_iterations)
        self._frozen = protected_entries(model, self._task)
        self.snapshot_bytes = max(self.snapshot_bytes, tensor_bytes(e.values for e in self._frozen))
        used = routes.used(exclude=self._task)
        self._free = [~mask for mask in used]
        self._hooks = [point.bn.register_forward_hook(_FrozenStatistics(point.bn, mask))
                       for point, mask in zip(routes.points, used) if point.bn is not None and mask.any()]

    def before_training_iteration(self, strategy, **kwargs) -> None:
        progress = min(strategy.clock.train_exp_iterations / max(1, self._iterations - 1), 1.0)
        strategy.model.routes.scale = 1 / self.s_max + (self.s_max - 1 / self.s_max) * progress

    def before_backward(self, strategy, **kwargs) -> None:
        if self.sparsity:
            strategy.loss = strategy.loss + self.sparsity * self.penalty(strategy.model.routes)

    def penalty(self, routes: TaskRoutes) -> torch.Tensor:
        """Mean gate of the training task over the channels no finished task uses (0 when none is free)."""
        total = sum(int(free.sum()) for free in self._free)
        if not total:
            return routes.embeddings[0].new_zeros(())
        gates = [routes.gate(i, self._task)[free].sum() for i, free in enumerate(self._free)]
        return torch.stack(gates).sum() / total

    def after_update(self, strategy, **kwargs) -> None:
        with torch.no_grad():
            for entry in self._frozen:
                entry.restore()
            for embedding in strategy.model.routes.embeddings:
                embedding[self._task].clamp_(-self.bound, self.bound)

    def after_training_exp(self, strategy, **kwargs) -> None:
        model = strategy.model
        routes: TaskRoutes = model.routes
        for entry in self._frozen:
            entry.restore()
        for hook in self._hooks:
            hook.remove()
        routes.finished[self._task] = True
        routes.training_task = None
        widths = sum(e.shape[1] for e in routes.embeddings)
        self.usage[self._task] = sum(int(m.sum()) for m in routes.masks(self._task)) / widths
        self.free = 1 - sum(int(m.sum()) for m in routes.used()) / widths
        self._frozen, self._free, self._hooks, self._task = [], [], [], None


@dataclass(frozen=True)
class RoutingSettings:
    """Routing's hyperparameters, ``strategy.routing.<key>``."""

    sparsity: float = setting(0.75, NON_NEGATIVE, help="weight of HAT's penalty on gates of free channels")
    s_max: float = setting(400.0, rule(lambda v: v >= 1, "must be >= 1"), help="final gate scale of the annealing")
    lr: float = setting(0.01, POSITIVE, help="learning rate of the gate embeddings")
    bound: float = setting(6.0, POSITIVE, help="embeddings are clamped to ±bound")


register("routing", settings=RoutingSettings, acts_on=("model", "loss"), needs=("task_routes",))(RoutingPlugin)
