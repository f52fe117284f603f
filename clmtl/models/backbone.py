"""YOLOv8 backbone (layers 0-9 of the ultralytics yaml), returning the stride 8/16/32 feature maps."""
from __future__ import annotations

import os

import torch
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics is imported: no network checks

from ultralytics.nn.tasks import parse_model, yaml_model_load  # noqa: E402
from ultralytics.utils.torch_utils import initialize_weights  # noqa: E402

BN_MOMENTUM = 0.1
"""PyTorch's default. ultralytics uses 0.03 for runs of thousands of steps; in our runs of a few hundred steps
from random init, 0.03 left the running statistics far behind the weights (eval top-1 0.58 vs 0.95 in train mode)."""

TAPS = (4, 6, 9)
"""Layers whose outputs feed the neck: P3/8, P4/16 and the SPPF output at P5/32."""


class YoloBackbone(nn.Module):
    """Layers 0-9 of an ultralytics YOLOv8 yaml, built locally (no download).

    ``layers`` is the ultralytics ``nn.Sequential``, so its state-dict keys are those of a
    ``DetectionModel`` with ``model.`` replaced by ``layers.``.
    """

    def __init__(self, cfg: str = "yolov8n.yaml", taps: tuple[int, ...] = TAPS) -> None:
        super().__init__()
        spec = dict(yaml_model_load(cfg), head=[])  # backbone only: layers 0..9
        self.layers, _ = parse_model(spec, ch=3, verbose=False)
        initialize_weights(self.layers)  # BN eps as ultralytics trains (and as its weights expect)
        for module in self.layers.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = BN_MOMENTUM
        self.taps = taps
        self.out_channels, self.strides = self._probe()

    @torch.no_grad()
    def _probe(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Channels and strides of the tapped layers, read from one small forward pass."""
        was_training = self.training
        self.eval()
        size = 64
        feats = self(torch.zeros(1, 3, size, size))
        self.train(was_training)
        return tuple(f.shape[1] for f in feats), tuple(size // f.shape[-1] for f in feats)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, layer in enumerate(self.layers):
            x = layer(x)  # layers 0-9 form a plain chain (every 'from' is -1)
            if i in self.taps:
                feats.append(x)
        return feats
