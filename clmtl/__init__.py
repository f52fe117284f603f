"""clmtl: continual multi-task learning for vision on Avalanche."""
import os

os.environ.setdefault("YOLO_OFFLINE", "1")

__version__ = "0.1.0"
