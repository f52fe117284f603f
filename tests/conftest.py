"""Test-wide settings: no network for ultralytics, its settings file in a temporary folder, 2 threads."""
import os
import tempfile

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="clmtl-yolo-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def isolated_registry(monkeypatch):
    """Strategies a test registers disappear after it."""
    import clmtl.registry as registry

    registry.available()  # discover the built-ins first, so the copy holds them
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
