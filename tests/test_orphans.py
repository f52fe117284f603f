"""A child process that ends with its parent (``clmtl.orphans``), the kernel's signal on Linux or the watching thread
alone, however busy the child is."""
import signal
import subprocess
import sys
import time

import pytest

CHILD = """
import sys
from clmtl import orphans
if sys.argv[2] == "thread":
    orphans._kill_on_parent_death = lambda: None
orphans.exit_with_parent(int(sys.argv[1]))
print("watching", flush=True)
while True:
    sum(range(100_000))  # busy in Python: the watching thread gets the interpreter only between these
"""

PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]], stdout=subprocess.PIPE,
                         text=True)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("watch", ["kernel", "thread"])
def test_a_child_ends_within_seconds_of_its_parents_sigkill(watch):
    import psutil

    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, watch], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        killed, deadline = time.monotonic(), time.monotonic() + 5
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child), f"{watch}: the child outlived its parent by {time.monotonic() - killed:.1f} s"
    finally:
        parent.kill()
        parent.wait()
        if child is not None and _running(child):
            child.kill()


def test_a_parent_gone_before_the_watch_starts_ends_the_child_at_once():
    code = "from clmtl.orphans import exit_with_parent; exit_with_parent(-1); print('not ended')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (1, "")


def _running(process) -> bool:
    """Whether ``process`` still runs (a zombie has ended)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
