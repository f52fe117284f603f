"""BatchNorm folding for inference: each Conv2d + BatchNorm2d pair becomes one conv.

In eval mode a BatchNorm is a fixed per-channel affine map, so it folds exactly into the conv before it
(``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``): one op and one pass over
the feature map instead of two, the same outputs up to float rounding. The folding itself is ultralytics'
(``fuse_conv_and_bn``, ``Conv.forward_fuse``), as its own ``model.fuse()`` does for YOLO; this module applies it
to our model, whose head also has a plain ``nn.Sequential(Conv2d, BatchNorm2d, ReLU)``.

The folded copy is for inference only: its BatchNorm statistics are baked into the weights, so training it would
neither update statistics nor normalise batches.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from clmtl.ultralytics_shim import Conv, Conv2, fuse_conv_and_bn


def fuse_batchnorm(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm2d folded into the Conv2d before it (``model`` is untouched).

    Folds ultralytics ``Conv`` blocks (conv -> bn -> act, as ultralytics' own ``fuse`` does) and ``Conv2d`` directly
    followed by ``BatchNorm2d`` in an ``nn.Sequential``. A BatchNorm in any other place cannot be folded safely, so it
    raises ``ValueError`` naming it rather than returning a half-fused model.

    ``channels_last`` stores the conv weights NHWC (as ``clmtl run`` trains them by default), so the convolutions
    run (and return) NHWC even for ordinary NCHW inputs; False stores them NCHW, whatever the model's layout. On CPU
    NHWC was 10-20 % faster at 512 px (``benchmarks/speed.py``, ``channels_last_speedup``).
    """
    fused = copy.deepcopy(model).eval()
    for module in list(fused.modules()):  # a list: the loop replaces and deletes children
        if isinstance(module, Conv) and isinstance(getattr(module, "bn", None), nn.BatchNorm2d):
            if isinstance(module, Conv2):  # RepConv-style parallel 1x1 branch: merge it into the 3x3 first
                module.fuse_convs()
            module.conv = fuse_conv_and_bn(module.conv, module.bn)
            del module.bn
            module.forward = module.forward_fuse
        elif isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d):
                    module[i] = fuse_conv_and_bn(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
    left = [name for name, m in fused.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise ValueError(
            f"fuse_batchnorm: cannot fold BatchNorm layers {left}: each must directly follow a Conv2d, inside an "
            "ultralytics Conv block or an nn.Sequential"
        )
    fused.requires_grad_(False)
    return fused.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
