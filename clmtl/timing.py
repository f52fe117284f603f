"""Wall-clock latency of a callable: the median over repeats after warm-up, with its spread.

CPU timings vary run to run with the load of the machine; a median with its interquartile range, measured in the
same process as what it is compared with, is what benchmark tables report.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Latency:
    median_ms: float
    iqr_ms: float
    repeats: int

    def as_dict(self) -> dict[str, float | int]:
        return {"median_ms": self.median_ms, "iqr_ms": self.iqr_ms, "repeats": self.repeats}


def measure_latency(function: Callable[[], object], repeats: int = 20, warmup: int = 3) -> Latency:
    """Call ``function`` ``warmup`` times untimed, then ``repeats`` times timed."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1000.0)
    q1, median, q3 = np.percentile(samples, [25, 50, 75])
    return Latency(float(median), float(q3 - q1), repeats)
