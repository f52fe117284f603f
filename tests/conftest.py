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


@pytest.fixture
def clmtl_cli(capsys):
    """``clmtl ARGS`` run in this process, returning what ``subprocess.run`` would (the command line's entry point,
    ``python -m clmtl``, is tested in a subprocess once: tests/test_run.py)."""
    import subprocess

    from clmtl.cli import main

    def command(*args):
        capsys.readouterr()
        returncode = main([str(arg) for arg in args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, returncode, captured.out, captured.err)

    return command


class ProcessTree:
    """A command started in a subprocess and the multiprocessing workers it spawns; ``kill`` ends every one seen."""

    def __init__(self) -> None:
        self.parent = None
        self.seen: list = []

    def start(self, command: list[str]):
        import subprocess

        self.parent = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        return self.parent

    def workers(self) -> list:
        """The spawned (``spawn_main``) processes under the command now."""
        import psutil

        found = [p for p in psutil.Process(self.parent.pid).children(recursive=True)
                 if "spawn_main" in " ".join(p.cmdline())]
        self.seen.extend(p for p in found if p not in self.seen)
        return found

    def kill(self) -> None:
        import contextlib

        import psutil

        if self.parent is not None and self.parent.poll() is None:
            self.parent.kill()
        for worker in self.seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()


@pytest.fixture
def process_tree():
    """A ``ProcessTree`` whose processes are killed after the test, whatever its outcome."""
    tree = ProcessTree()
    yield tree
    tree.kill()
