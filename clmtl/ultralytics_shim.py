"""Everything clmtl takes from ultralytics, imported in one place that first keeps ultralytics off the network.

ultralytics checks the network on import unless ``YOLO_OFFLINE`` is set; it sets ``OMP_NUM_THREADS=1`` in the
environment when it is unset (which every process started afterwards would inherit, and which would read as the
user's choice of threads, ``clmtl.training.devices.resolve_threads``); it replaces ``torch.save`` with a wrapper that
calls it again after a ``RuntimeError``, three times, sleeping 3.5 s in all (a checkpoint that cannot be pickled then
fails after 3.5 s, and a failed write is retried into the same, half-written file object); and it replaces PIL's
``Image.open`` with a wrapper that, on a file PIL cannot identify, tries to install and import ``pi-heif`` instead of
raising PIL's error. Importing ultralytics through this module sets ``YOLO_OFFLINE`` first and puts
``OMP_NUM_THREADS`` and ``torch.save`` back as they were; ``pil_open`` is PIL's own ``Image.open`` whether or not
ultralytics has patched it.
"""
from __future__ import annotations

import os

import torch
from PIL import Image

os.environ.setdefault("YOLO_OFFLINE", "1")
_THREADS = os.environ.get("OMP_NUM_THREADS")

from ultralytics.nn.modules import Conv, Conv2  # noqa: E402
from ultralytics.nn.tasks import parse_model, yaml_model_load  # noqa: E402
from ultralytics.utils import patches  # noqa: E402
from ultralytics.utils.torch_utils import ModelEMA, fuse_conv_and_bn, initialize_weights  # noqa: E402

if _THREADS is None:
    os.environ.pop("OMP_NUM_THREADS", None)
if torch.save is patches.torch_save:
    torch.save = patches._torch_save  # the function ultralytics replaced

__all__ = ["Conv", "Conv2", "ModelEMA", "fuse_conv_and_bn", "initialize_weights", "parse_model", "pil_open",
           "yaml_model_load"]


def pil_open():
    """PIL's own ``Image.open``, not ultralytics' replacement (its original is kept in ``patches._image_open``)."""
    return patches._image_open if getattr(Image.open, "__module__", "").startswith("ultralytics") else Image.open
