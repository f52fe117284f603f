"""A run's random streams: one per purpose, each drawn from the run's seed alone.

A run draws random numbers for several purposes: the model's initial weights, each head's initial rows, each
experience's training (data order, augmentation, the optimizer's noise), the rows a head grows. If they all came
from one generator, every draw would depend on every draw before it, so the first task would be trained differently
in a two-task and in a four-task stream (a four-task model draws more head weights before training starts, and
each evaluation of a task draws one number: PyTorch's ``DataLoader`` seeds its iterator from torch's generator).

So each purpose gets its own stream, seeded from ``(run seed, purpose, index)``: a head's initial rows depend on the
seed and the head's index only, and each experience starts its training with Python, NumPy and torch seeded from
the seed and the experience's index. A task is then trained the same whatever follows it, and a run that continues
another (``clmtl continue``) trains its new tasks exactly as one run that had all the tasks from the start.
"""
from __future__ import annotations

import random
import zlib

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a run is repeatable on CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's global generator takes 32-bit seeds
    torch.manual_seed(seed)


def derived_seed(seed: int, purpose: str, *index: int) -> int:
    """A 63-bit seed for one purpose of a run (``"head"`` and its index, ``"experience"`` and its index...), drawn by
    NumPy's ``SeedSequence`` from the run's seed: nearby seeds and indices give unrelated streams."""
    words = [seed, zlib.crc32(purpose.encode()), *index]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) & (2**63 - 1)


def generator_for(seed: int, purpose: str, *index: int) -> torch.Generator:
    """A CPU generator on ``derived_seed(seed, purpose, *index)``."""
    return torch.Generator().manual_seed(derived_seed(seed, purpose, *index))


def start_experience(seed: int, label: int) -> None:
    """Seed the global generators for training experience ``label`` (a single-task baseline of task ``label`` draws
    the same numbers as the stream's experience ``label``)."""
    seed_everything(derived_seed(seed, "experience", label))
