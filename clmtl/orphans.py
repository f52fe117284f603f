"""A child process that ends as soon as its parent is gone.

A parent killed outright (SIGKILL, out of memory) runs no cleanup that would stop its children, and an orphaned
training would only waste the cores. This module imports nothing heavy, so a spawned process can run it first, before
the seconds of imports (torch, Avalanche) in which it could not yet notice anything.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import wait

PR_SET_PDEATHSIG = 1
"""``prctl`` option (linux/prctl.h): the signal this process gets when its parent dies."""


def exit_with_parent(parent: int, interval: float = 0.2) -> None:
    """End this process once process ``parent`` (its parent's pid, as the parent saw it) is gone.

    On Linux the kernel kills it at once (``PR_SET_PDEATHSIG``), whatever it is doing; everywhere a daemon thread also
    looks every ``interval`` seconds, and on the parent's sentinel where multiprocessing started this process. A
    parent that died before this call is noticed too: this process then belongs to another one. The kernel's parent
    is the thread that started this process: start it from one that outlives it.
    """
    _kill_on_parent_death()
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch, args=(parent, interval), name="exit-with-parent", daemon=True).start()


def _kill_on_parent_death() -> None:
    """SIGKILL from the kernel when the parent dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl in this C library: the thread alone watches
        pass


def _watch(parent: int, interval: float) -> None:
    """``os._exit`` once the parent is gone: no cleanup that could wait on anything the parent held."""
    started_by = multiprocessing.parent_process()
    sentinels = [started_by.sentinel] if started_by is not None and started_by.pid == parent else []
    while os.getppid() == parent:
        if sentinels:
            if wait(sentinels, timeout=interval):  # readable (POSIX) or signalled (Windows) once the parent ended
                break
        else:
            time.sleep(interval)
    os._exit(1)
