"""Where a run computes (``train.device``) and on how many CPU threads (``train.threads``).

``train.device``: ``auto`` (CUDA if present, else Apple's MPS, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
Under torchrun on CUDA each process takes the GPU of its ``LOCAL_RANK``. A device that is absent is a one-line error.

``train.threads``: ``auto`` is the cores this process may use divided by the processes torchrun starts on this
machine (``LOCAL_WORLD_SIZE``), at least 1; an ``OMP_NUM_THREADS`` set in the environment wins, as torch's own
default honours it. Two processes on two cores with two threads each oversubscribe the cores, and every all-reduce
then waits on starved peers.
"""
from __future__ import annotations

import os

import torch

from clmtl.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_device(spec: str) -> torch.device:
    """The torch device of a ``train.device`` value; refuses one this machine does not have."""
    if spec == "auto":
        if torch.cuda.is_available():
            return resolve_device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"train.device: {spec!r} is not a device; use one of {', '.join(DEVICE_CHOICES)}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {spec} asked for, but this machine has no CUDA device "
                              "(torch.cuda.is_available() is False); use train.device=cpu or auto")
        if device.index is None:  # under torchrun: this process's GPU
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device: {spec} asked for, but this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    elif device.type == "mps" and not _mps_available():
        raise ConfigError(f"train.device: {spec} asked for, but MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"train.device: {spec!r} is not supported; use one of {', '.join(DEVICE_CHOICES)}")
    return device


def device_name(device: torch.device) -> str:
    """A readable name of the device, for results.json."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def resolve_threads(setting: int | str) -> int:
    """The thread count a ``train.threads`` value stands for (``auto``: see the module docstring)."""
    if setting != "auto":
        return int(setting)
    explicit = os.environ.get("OMP_NUM_THREADS")
    if explicit and explicit.isdigit() and int(explicit) >= 1:
        return int(explicit)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, usable_cores() // max(1, local_processes))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the platform reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
