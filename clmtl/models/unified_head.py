"""One head shared by every task and pyramid level: a 3x3 conv + BN + ReLU, then a single 1x1 prediction conv.

The 1x1 conv's output rows are held per output space (a head of ``clmtl.stream.scenario``): a detection head owns
``A * (5 + C)`` rows (per anchor: box, objectness, classes), a segmentation head ``C`` rows; a task that needs one
head convolves with that head's rows only, and ``conv_outputs`` runs several heads as one conv over their rows
concatenated. A classification head is a linear layer on the globally pooled shared features of the coarsest level.

Heads grow: ``grow`` appends classes to a head (the class scenario's shared heads), keeping every trained row as it
is, bit for bit. Each head's weight has the class dimension where Avalanche's ``ParamData.expand`` pads (the last
rows of a segmentation or classification head, the last entries of each anchor of a detection head), so plugins that
keep per-parameter state (EWC's anchors, SI's importances) see the old part in place and zeros for the new rows.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clmtl.stream.tasks import DETECTION, SEGMENTATION

OBJECTNESS_PRIOR = 0.01
"""Initial objectness probability: most anchors are background, so start there (as RetinaNet/YOLOv5 do)."""

BOX_OUTPUTS = 5
"""Per anchor: 4 box values and objectness, before the class scores."""


def class_prior_bias(num_classes: int) -> float:
    """Initial class logit of a detection head: classes near uniform (YOLOv5's bias init)."""
    return math.log(0.6 / (num_classes - 0.99))


def _uniform_rows(shape: Sequence[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``shape`` and its bias (``shape`` without the input dimension), uniform in ±1/sqrt(fan_in) as PyTorch
    initialises a fresh ``Linear`` or 1x1 ``Conv2d``."""
    bound = 1 / math.sqrt(shape[-1])
    weight = torch.empty(shape).uniform_(-bound, bound, generator=generator)
    return weight, torch.empty(shape[:-1]).uniform_(-bound, bound, generator=generator)


class ClassRows(nn.Module):
    """One head's output rows: ``weight [A, 5 + C, in]`` (detection) or ``[C, in]``, ``bias`` without ``in``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    @classmethod
    def drawn(cls, kind: str, num_classes: int, in_features: int, generator: torch.Generator,
              num_anchors: int = 1) -> ClassRows:
        """A fresh head's rows from ``generator``: as a fresh layer's, a detection head's objectness and class biases
        at their priors."""
        if kind != DETECTION:
            return cls(*_uniform_rows((num_classes, in_features), generator), kind)
        weight, bias = _uniform_rows((num_anchors, BOX_OUTPUTS + num_classes, in_features), generator)
        bias[:, 4] = math.log(OBJECTNESS_PRIOR / (1 - OBJECTNESS_PRIOR))  # start near the prior
        bias[:, BOX_OUTPUTS:] = class_prior_bias(num_classes)
        return cls(weight, bias, kind)

    @property
    def class_dim(self) -> int:
        return 1 if self.kind == DETECTION else 0

    @property
    def num_classes(self) -> int:
        return self.weight.shape[self.class_dim] - (BOX_OUTPUTS if self.kind == DETECTION else 0)

    @property
    def num_rows(self) -> int:
        """Output channels of the 1x1 conv (detection, segmentation) or of the linear layer (classification)."""
        return self.weight[..., 0].numel()

    @torch.no_grad()
    def grow(self, num_classes: int, generator: torch.Generator) -> None:
        """Append rows up to ``num_classes`` classes, old rows untouched; new rows drawn as a fresh layer's are
        (uniform in ±1/sqrt(fan_in), detection class biases at their prior) from ``generator``."""
        extra = num_classes - self.num_classes
        if extra <= 0:
            return
        shape = list(self.weight.shape)
        shape[self.class_dim] = extra
        weight, bias = _uniform_rows(shape, generator)
        if self.kind == DETECTION:
            bias[:] = class_prior_bias(num_classes)
        self.weight = nn.Parameter(torch.cat([self.weight, weight.to(self.weight)], self.class_dim))
        self.bias = nn.Parameter(torch.cat([self.bias, bias.to(self.bias)], self.class_dim))

    def resize_like(self, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        """Take the shapes of a state dict's ``weight`` and ``bias`` (values unset: loading fills them)."""
        if weight is not None and weight.shape != self.weight.shape:
            self.weight = nn.Parameter(self.weight.new_empty(weight.shape))
        if bias is not None and bias.shape != self.bias.shape:
            self.bias = nn.Parameter(self.bias.new_empty(bias.shape))


class UnifiedHead(nn.Module):
    """Shared conv stem + one 1x1 prediction conv (rows per detection / segmentation head) + linear classifiers.

    ``kinds[h]`` and ``classes[h]`` describe head ``h``; its initial rows are drawn from ``heads[h]``, a generator of
    its own (``clmtl.training.seeding``), so a head starts the same whatever other heads the model has.
    """

    def __init__(self, channels: int, num_anchors: int, kinds: Sequence[str], classes: Sequence[int],
                 heads: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.shared = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        )
        self.num_anchors = num_anchors
        self.kinds = tuple(kinds)
        self.outputs = nn.ModuleDict({
            str(head): ClassRows.drawn(kind, count, channels, generator, num_anchors)
            for head, (kind, count, generator) in enumerate(zip(kinds, classes, heads, strict=True))})

    def conv_order(self, heads) -> list[int]:
        """The detection and segmentation heads among ``heads``, in the order their rows are concatenated."""
        return [h for kind in (DETECTION, SEGMENTATION) for h in heads if self.kinds[h] == kind]

    def rows(self, head: int) -> ClassRows:
        return self.outputs[str(head)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The shared 3x3 conv + BN + ReLU, applied to one pyramid level."""
        return self.shared(x)

    def detection(self, h: torch.Tensor, head: int) -> torch.Tensor:
        """Raw detection output ``[B, A, H, W, 5 + C]`` of one level from its shared features."""
        return self.conv_outputs(h, [head])[head]

    def segmentation(self, h: torch.Tensor, head: int) -> torch.Tensor:
        """Segmentation logits ``[B, C, H, W]`` at the level's resolution."""
        return self.conv_outputs(h, [head])[head]

    def conv_outputs(self, h: torch.Tensor, heads: Sequence[int]) -> dict[int, torch.Tensor]:
        """The outputs of several detection / segmentation heads from ONE 1x1 conv over their rows."""
        order = self.conv_order(heads)
        weight = torch.cat([self._conv_weight(self.rows(head).weight) for head in order])
        bias = torch.cat([self.rows(head).bias.reshape(-1) for head in order])
        out = F.conv2d(h, weight, bias)
        outputs, start = {}, 0
        for head in order:
            count = self.rows(head).num_rows
            part = out[:, start:start + count]
            outputs[head] = self._split_anchors(part) if self.kinds[head] == DETECTION else part
            start += count
        return outputs

    def classification(self, h: torch.Tensor, heads: Sequence[int]) -> dict[int, torch.Tensor]:
        """Class logits of each classification head from the globally averaged shared features."""
        pooled = h.mean(dim=(2, 3))
        return {head: F.linear(pooled, self.rows(head).weight, self.rows(head).bias) for head in heads}

    def _conv_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``[rows, in]`` as a 1x1 conv weight in the shared conv's memory format (NHWC strides for a channels-last
        model, which makes the conv return NHWC maps as the model's other convs do)."""
        flat = weight.reshape(-1, weight.shape[-1])
        if self.shared[0].weight.is_contiguous(memory_format=torch.channels_last):
            return flat[:, None, None, :].permute(0, 3, 1, 2)
        return flat[:, :, None, None]

    def _split_anchors(self, out: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = out.shape
        return out.view(b, self.num_anchors, -1, hh, ww).permute(0, 1, 3, 4, 2).contiguous()
