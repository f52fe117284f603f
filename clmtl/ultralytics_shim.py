"""Everything clmtl takes from ultralytics, imported in one place that first keeps ultralytics off the network.

ultralytics checks the network on import unless ``YOLO_OFFLINE`` is set, and replaces PIL's ``Image.open`` with a
wrapper that, on a file PIL cannot identify, tries to install and import ``pi-heif`` instead of raising PIL's error.
Importing ultralytics through this module sets ``YOLO_OFFLINE`` first; ``pil_open`` is PIL's own ``Image.open``
whether or not ultralytics has patched it.
"""
from __future__ import annotations

import os

from PIL import Image

os.environ.setdefault("YOLO_OFFLINE", "1")

from ultralytics.nn.modules import Conv, Conv2  # noqa: E402
from ultralytics.nn.tasks import parse_model, yaml_model_load  # noqa: E402
from ultralytics.utils import patches  # noqa: E402
from ultralytics.utils.torch_utils import ModelEMA, fuse_conv_and_bn, initialize_weights  # noqa: E402

__all__ = ["Conv", "Conv2", "ModelEMA", "fuse_conv_and_bn", "initialize_weights", "parse_model", "pil_open",
           "yaml_model_load"]


def pil_open():
    """PIL's own ``Image.open``, not ultralytics' replacement (its original is kept in ``patches._image_open``)."""
    return patches._image_open if getattr(Image.open, "__module__", "").startswith("ultralytics") else Image.open
