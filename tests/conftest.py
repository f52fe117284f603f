"""Test-wide settings: no network for ultralytics, its settings file in a temporary folder, 1 thread; the order and
grouping of tests on pytest-xdist's workers."""
import atexit
import collections
import os
import shutil
import tempfile

os.environ.setdefault("YOLO_OFFLINE", "1")
if "YOLO_CONFIG_DIR" not in os.environ:  # made once by the main process; the workers and subprocesses inherit it
    os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="clmtl-yolo-")
    atexit.register(shutil.rmtree, os.environ["YOLO_CONFIG_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    _end_to_end_modules_first(items)
    _fail_ignored_groups(config, items)


def _end_to_end_modules_first(items) -> None:
    """Modules with more ``slow`` tests first, each module's tests together and in order: the two workers start on
    the long end-to-end runs and finish on short unit tests, instead of one worker finishing a long run alone."""
    slow = collections.Counter(item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.nodeid.split("::")[0]])


def _fail_ignored_groups(config, items) -> None:
    """Fail the tests of an ``xdist_group``, rather than run them slower, when pytest-xdist's loadgroup no longer keeps
    the group on one worker: it tags the group onto each node id, which pytest 9.2 stopped taking
    (pytest-dev/pytest-xdist#1386), and the fixtures a group shares would then be set up once per worker."""
    if getattr(config.option, "loadgroup", False):  # set in xdist's workers under --dist loadgroup
        for item in items:
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
                item.fixturenames.insert(0, "xdist_group_ignored")


@pytest.fixture
def xdist_group_ignored():
    pytest.fail(f"this test's xdist_group is ignored: pytest-xdist's loadgroup does not work with pytest "
                f"{pytest.__version__} (setup.cfg pins a pytest it works with)", pytrace=False)


@pytest.fixture
def isolated_registry(monkeypatch):
    """Strategies a test registers, and the strategy files it loads (each is loaded once per process), disappear
    after it."""
    import sys

    import clmtl.training.registry as registry

    registry.available()  # discover the built-ins first, so the copy holds them
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    modules = set(sys.modules)
    yield
    for name in set(sys.modules) - modules:
        if name.startswith("clmtl_strategy_file_"):
            del sys.modules[name]


@pytest.fixture
def clmtl_cli():
    """``clmtl ARGS`` run in this process (tests/inprocess.py)."""
    from inprocess import clmtl_here

    return clmtl_here


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
