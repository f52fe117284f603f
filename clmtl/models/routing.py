"""Task routes: per-task channel gates on the shared layers (HAT, Serra et al. 2018; PackNet's per-task masks).

A gate point is the output of a conv block — ``Conv2d -> BatchNorm2d -> activation`` (ultralytics ``Conv``,
torchvision ``Conv2dNormActivation``, the head's shared stem) — or of a ``Conv2d`` no BatchNorm follows (the FPN's
lateral and smoothing convs, squeeze-excitation ``fc1`` / ``fc2``). Task ``t`` has an embedding vector ``e[t]`` per
point, one value per output channel; its gate multiplies the point's output channel-wise:

- ``sigmoid(scale * e[t])`` while ``t`` is the task being trained (the ``routing`` strategy anneals ``scale``), 0 in
  the forward pass below ``GATE_FLOOR``;
- ``e[t] > 0`` (0 or 1) otherwise: in eval mode, and for every other task, so a finished task's route is fixed.

The gate sits after the block's activation (where HAT gates), not between BatchNorm and activation: BatchNorm folding
for export replaces a block's conv and BatchNorm but keeps the block, so its hook survives, and every activation is
checked to map 0 to 0, so a 0/1 gate after it equals one before it. Gating the conv's output instead would not zero
a channel: BatchNorm maps 0 to its bias.

The hooks read the task from ``TaskRoutes.active``, which ``UnifiedModel`` sets on every forward. They are objects
holding their ``TaskRoutes``, so a deep copy of the model (LwF's teacher, BatchNorm folding) gates with its own copy.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

INITIAL_EMBEDDING = 0.1
"""Every gate starts open (``e > 0``), as in the plain network, and the sparsity penalty closes what the task does not
need; at the routing strategy's default rate (0.01 per Adam step) closing takes about 10 steps. Starting at 0 (gates
0.5 either way) lets the signs of the first, noisy gradients decide instead, and the tasks keep fewer channels and
learn less (docs/studies.md, Routing)."""

GATE_FLOOR = 1e-3
"""A soft gate below this is 0 in the forward pass (its gradient stays): a closed channel's ``sigmoid(s * e)`` reaches
denormal floats as ``s`` grows, and arithmetic on denormal feature maps is several times slower on some CPUs
(docs/studies.md, Routing)."""


@dataclass(frozen=True)
class GatePoint:
    """Where a gate applies (``module``'s output) and what computes its channels: ``conv``'s output rows, then
    ``bn``'s channels when the point is a conv block."""

    name: str
    module: nn.Module
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None

    @property
    def width(self) -> int:
        return self.conv.out_channels


def gate_points(parts: Mapping[str, nn.Module]) -> list[GatePoint]:
    """The gate points of the named model parts, in module order.

    A BatchNorm2d must sit in a block whose children are ``[Conv2d, BatchNorm2d]`` plus at most an activation with
    ``act(0) == 0``; any other placement raises ``ValueError`` naming it (its channels could not be gated exactly).
    """
    points, in_blocks = [], set()
    for prefix, part in parts.items():
        for name, module in part.named_modules(prefix=prefix):  # a block comes before its children
            children = list(module.children())
            if any(isinstance(child, nn.BatchNorm2d) for child in children):
                points.append(_block_point(name, module, children))
                in_blocks.update(map(id, children))
            elif isinstance(module, nn.Conv2d) and id(module) not in in_blocks:
                points.append(GatePoint(name, module, module, None))
    return points


def _block_point(name: str, block: nn.Module, children: list[nn.Module]) -> GatePoint:
    conv, bn, act = (children + [None, None])[:3] if len(children) <= 3 else (None, None, None)
    fits = isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and conv.out_channels == bn.num_features
    if fits and act is not None:  # parameter-free (what the strategy protects are convs and BatchNorms) and 0 -> 0
        with torch.no_grad():
            fits = next(act.parameters(), None) is None and bool((act(torch.zeros(1, 1, 1, 1)) == 0).all())
    if not fits:
        kinds = [type(child).__name__ for child in children]
        raise ValueError(f"routing: cannot gate {name} {kinds}: a BatchNorm2d must follow a Conv2d of its width in a "
                         "block [Conv2d, BatchNorm2d] or [Conv2d, BatchNorm2d, parameter-free activation, act(0) = 0]")
    return GatePoint(name, block, conv, bn)


class TaskRoutes(nn.Module):
    """One embedding per gate point and task, and which tasks are finished (their routes are protected)."""

    def __init__(self, num_tasks: int, points: Sequence[GatePoint]) -> None:
        super().__init__()
        self.embeddings = nn.ParameterList(nn.Parameter(torch.full((num_tasks, p.width), INITIAL_EMBEDDING))
                                           for p in points)
        self.register_buffer("finished", torch.zeros(num_tasks, dtype=torch.bool))
        self.points = list(points)
        """What each embedding gates (its module, conv and BatchNorm), for the strategy that protects them."""
        self.active: int | None = None
        """The task whose route the next forward takes (set by ``UnifiedModel``)."""
        self.training_task: int | None = None
        """The task being trained: its gates are soft while the module is in train mode."""
        self.scale = 1.0
        """Slope of the training task's soft gates."""
        for index, point in enumerate(points):
            point.module.register_forward_hook(_Gate(self, index))

    @property
    def num_tasks(self) -> int:
        return int(self.finished.numel())

    def gate(self, point: int, task: int) -> torch.Tensor:
        """Task ``task``'s gate ``[C]`` at gate point ``point``."""
        embedding = self.embeddings[point][task]
        if self.training and task == self.training_task:
            soft = torch.sigmoid(self.scale * embedding)
            return soft - (soft * (soft < GATE_FLOOR)).detach()
        return (embedding > 0).to(embedding.dtype)

    @torch.no_grad()
    def masks(self, task: int) -> list[torch.Tensor]:
        """The channels task ``task``'s route uses, per gate point (bool)."""
        return [embedding[task] > 0 for embedding in self.embeddings]

    @torch.no_grad()
    def used(self, exclude: int | None = None) -> list[torch.Tensor]:
        """The channels any finished task (other than ``exclude``) uses, per gate point (bool): the protected ones."""
        tasks = [t for t in range(self.num_tasks) if bool(self.finished[t]) and t != exclude]
        return [(embedding[tasks] > 0).any(0) for embedding in self.embeddings]


class _Gate:
    """Forward hook multiplying a gate point's output by the active task's gate."""

    def __init__(self, routes: TaskRoutes, point: int) -> None:
        self.routes, self.point = routes, point

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        task = self.routes.active
        if task is None:
            raise RuntimeError("routing: no active task; run the model as model(x, task_label) or model.forward_all(x)")
        return output * self.routes.gate(self.point, task).to(output.dtype).view(1, -1, 1, 1)
