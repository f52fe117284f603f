"""Backbones by name: each is a plain chain of layers whose outputs at strides 8/16/32 feed the FPN.

``model.backbone=NAME`` picks one from ``BACKBONES``. Every backbone is built locally with random weights (nothing is
downloaded); ``UnifiedModel.load_weights`` fills one from a local ultralytics or torchvision state dict.
"""
from __future__ import annotations

import difflib
import functools
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from clmtl.ultralytics_shim import initialize_weights, parse_model, yaml_model_load

BN_MOMENTUM = 0.1
"""PyTorch's default, for every backbone. ultralytics uses 0.03 and torchvision's MobileNetV3 0.01, both for runs of
thousands of steps; in our runs of a few hundred steps from random init, 0.03 left the running statistics far behind
the weights (eval top-1 0.58 vs 0.95 in train mode). At 0.01, 150 steps (10 segmentation epochs) would still keep
0.99**150 = 22% of the initial mean 0 / variance 1. The momentum is not part of a state dict, so loaded weights do
not depend on it; each architecture keeps its own BN eps, which its weights were trained with."""

TAPS = (4, 6, 9)
"""YOLOv8 layers whose outputs feed the neck: P3/8, P4/16 and the SPPF output at P5/32."""


class TappedBackbone(nn.Module):
    """``layers`` (an ``nn.Sequential`` run as a plain chain) returning the outputs of the layers in ``taps``.

    Layers after the last tap are dropped. ``out_channels`` and ``strides`` are read from one small forward pass.
    ``checkpoint_prefix`` is how the source library names ``layers`` in its own state dicts (``model.`` for
    ultralytics, ``features.`` for torchvision), and ``checkpoint_ignored`` the key prefixes of its state dicts
    that the backbone has no use for (a classifier), so ``UnifiedModel.load_weights`` can read those files.
    """

    def __init__(self, layers: nn.Sequential, taps: tuple[int, ...], checkpoint_prefix: str,
                 checkpoint_ignored: tuple[str, ...] = ()) -> None:
        super().__init__()
        if list(taps) != sorted(set(taps)) or not 0 <= taps[0] <= taps[-1] < len(layers):
            raise ValueError(f"taps must be increasing indices of the {len(layers)} layers, got {taps}")
        self.layers = layers[: taps[-1] + 1]
        for module in self.layers.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = BN_MOMENTUM
        self.taps = taps
        self.checkpoint_prefix = checkpoint_prefix
        self.checkpoint_ignored = checkpoint_ignored
        self.out_channels, self.strides = self._probe()

    @torch.no_grad()
    def _probe(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        was_training = self.training
        self.eval()
        size = 64
        feats = self(torch.zeros(1, 3, size, size))
        self.train(was_training)
        return tuple(f.shape[1] for f in feats), tuple(size // f.shape[-1] for f in feats)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.taps:
                feats.append(x)
        return feats


class YoloBackbone(TappedBackbone):
    """Layers 0-9 of an ultralytics YOLOv8 yaml, built locally (no download).

    ``layers`` is the ultralytics ``nn.Sequential``, so its state-dict keys are those of a
    ``DetectionModel`` with ``model.`` replaced by ``layers.``.
    """

    def __init__(self, cfg: str = "yolov8n.yaml", taps: tuple[int, ...] = TAPS) -> None:
        spec = dict(yaml_model_load(cfg), head=[])  # backbone only: layers 0..9, every 'from' is -1
        layers, _ = parse_model(spec, ch=3, verbose=False)
        initialize_weights(layers)  # BN eps as ultralytics trains (and as its weights expect)
        super().__init__(layers, taps, checkpoint_prefix="model.")


class TorchvisionBackbone(TappedBackbone):
    """The ``features`` of a torchvision classification model, built with ``weights=None`` (never downloaded).

    ``layers`` is torchvision's ``features`` cut after the last tap, so its keys are a torchvision state dict's
    ``features.*`` with ``features.`` replaced by ``layers.``. Stochastic depth (EfficientNet) is off: it is
    tuned for hundreds of ImageNet epochs, and without it the network computes the same function in train
    and eval mode, like the other backbones.
    """

    def __init__(self, arch: str, taps: tuple[int, ...]) -> None:
        extra = {"stochastic_depth_prob": 0.0} if arch.startswith("efficientnet") else {}
        model = getattr(torchvision.models, arch)(weights=None, **extra)
        super().__init__(model.features, taps, checkpoint_prefix="features.", checkpoint_ignored=("classifier.",))


BACKBONES: dict[str, Callable[[], TappedBackbone]] = {
    "yolov8n": functools.partial(YoloBackbone, "yolov8n.yaml"),
    # Taps: the last block at each stride. The stride-32 tap is the last inverted-residual block, not the final
    # 1x1 conv (576 / 1280 channels), which only widens the features for the ImageNet classifier (EfficientDet
    # taps EfficientNet the same way).
    "mobilenet_v3_small": functools.partial(TorchvisionBackbone, "mobilenet_v3_small", (3, 8, 11)),
    "efficientnet_b0": functools.partial(TorchvisionBackbone, "efficientnet_b0", (3, 5, 7)),
}
"""Backbone name (``model.backbone``) -> constructor with random weights."""


def build_backbone(name: str) -> TappedBackbone:
    """The named backbone; an unknown name raises ``ValueError`` listing the choices."""
    if name not in BACKBONES:
        close = difflib.get_close_matches(name, list(BACKBONES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"unknown backbone '{name}'; {hint}choices: {', '.join(BACKBONES)}")
    return BACKBONES[name]()
