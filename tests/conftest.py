"""Test-wide settings: no network for ultralytics, its settings file in a temporary folder, 2 threads."""
import os
import tempfile

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="clmtl-yolo-"))

import torch  # noqa: E402

torch.set_num_threads(1)
