"""The image classifiers of the continual-learning papers, as clmtl models: a body that maps images to a feature
vector, then one linear head per output space, grown as the unified model's heads grow.

- ``mlp``: flattened pixels -> fully connected layers with ReLU (van de Ven & Tolias's 784-400-400 on MNIST);
- ``reduced_resnet18``: ResNet-18 with 20 base filters instead of 64 (the GEM, A-GEM, ER and DER papers'
  network for small images), from torchvision's ``BasicBlock``, globally average-pooled.

Both read images at the data's own size and channels (``data.image_size``, ``data.channels``) and serve
classification streams only.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from clmtl.models.heads import HeadedModel
from clmtl.models.unified_head import ClassRows
from clmtl.stream.tasks import CLASSIFICATION, OutputSpace

CLASSIFIER_BACKBONES = ("mlp", "reduced_resnet18")

RESNET_BASE_WIDTH = 20
"""Filters of the reduced ResNet-18's first stage (64 in ResNet-18): Lopez-Paz & Ranzato's GEM network."""


class ClassifierModel(HeadedModel):
    """``body`` (images -> ``[B, features]``) + one linear head per output space."""

    def __init__(self, spaces: Sequence[OutputSpace], body: nn.Module, features: int, name: str) -> None:
        super().__init__(spaces)
        other = next((space for space in self.spaces if space.kind != CLASSIFICATION), None)
        if other is not None:
            raise ValueError(f"model.backbone {name} serves classification tasks only; head {other.name!r} is "
                             f"{other.kind} (its kind needs a unified-model backbone such as yolov8n)")
        self.backbone_name = name
        self.body = body
        self.heads = nn.ModuleDict({
            str(head): ClassRows.drawn(CLASSIFICATION, space.initial, features, self.head_generator(head))
            for head, space in enumerate(self.spaces)})

    def rows(self, head: int) -> ClassRows:
        return self.heads[str(head)]

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        rows = self.rows(task_label)
        return F.linear(self.body(x), rows.weight, rows.bias)

    def embed(self, x: torch.Tensor, head: int) -> torch.Tensor:
        """The features head ``head``'s linear layer reads (the body's output; every head reads the same)."""
        return self.body(x)

    def forward_all(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Every head's logits from one pass of the body."""
        features = self.body(x)
        return {head: F.linear(features, self.rows(head).weight, self.rows(head).bias) for head in self.head_kinds}

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` after giving every head the state dict's number of classes."""
        self.resize_heads(state_dict, "heads.")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.body.parameters()), "head": list(self.heads.parameters())}


def mlp(in_features: int, hidden: Sequence[int]) -> tuple[nn.Module, int]:
    """Flatten, then ``Linear + ReLU`` per hidden size; returns the body and its output width."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers), width


def reduced_resnet18(channels: int, base_width: int = RESNET_BASE_WIDTH) -> tuple[nn.Module, int]:
    """ResNet-18's four stages of two basic blocks at widths ``w, 2w, 4w, 8w`` after a stride-1 3x3 stem (no max
    pool: the papers' images are 32 px), globally average-pooled; returns the body and its output width."""
    layers: list[nn.Module] = [nn.Conv2d(channels, base_width, 3, padding=1, bias=False),
                               nn.BatchNorm2d(base_width), nn.ReLU(inplace=True)]
    width = base_width
    for stage in range(4):
        planes, stride = base_width * 2**stage, 1 if stage == 0 else 2
        for block in range(2):
            step = stride if block == 0 else 1
            shortcut = None
            if step != 1 or width != planes:
                shortcut = nn.Sequential(nn.Conv2d(width, planes, 1, stride=step, bias=False), nn.BatchNorm2d(planes))
            layers.append(BasicBlock(width, planes, stride=step, downsample=shortcut))
            width = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), width


def build_classifier(spaces: Sequence[OutputSpace], backbone: str, channels: int, image_size: int,
                     hidden: Sequence[int]) -> ClassifierModel:
    """The ``backbone`` classifier with heads ``spaces`` for images of ``channels`` x ``image_size`` x
    ``image_size``."""
    if backbone == "mlp":
        body, features = mlp(channels * image_size * image_size, hidden)
    elif backbone == "reduced_resnet18":
        body, features = reduced_resnet18(channels)
    else:
        raise ValueError(f"unknown classifier backbone {backbone!r}; expected one of {CLASSIFIER_BACKBONES}")
    return ClassifierModel(spaces, body, features, backbone)
