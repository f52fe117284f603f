"""Wall-clock latency of callables: medians over repeats after warm-up, with their spread, cases interleaved.

CPU timings vary with the load of the machine. Calling the cases round-robin (a, b, c, a, b, c, ...) spreads a change
of load over all of them, so their ratios stay meaningful; medians and inter-quartile ranges resist the remaining
spikes. ``torch.utils.benchmark`` times one statement at a time (and pins threads unless told otherwise), so it
cannot interleave the cases of one comparison.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Latency:
    """The timed runs of one case, in milliseconds."""

    runs_ms: tuple[float, ...]

    def quartiles(self) -> tuple[float, float, float]:
        """First quartile, median and third quartile (numpy's linear interpolation)."""
        q1, median, q3 = np.percentile(self.runs_ms, [25, 50, 75])
        return float(q1), float(median), float(q3)

    @property
    def median_ms(self) -> float:
        return self.quartiles()[1]

    @property
    def iqr_ms(self) -> float:
        q1, _, q3 = self.quartiles()
        return q3 - q1

    def as_dict(self) -> dict[str, Any]:
        q1, median, q3 = self.quartiles()
        return {"median_ms": median, "iqr_ms": q3 - q1, "q25_ms": q1, "q75_ms": q3, "repeats": len(self.runs_ms),
                "runs_ms": list(self.runs_ms)}


def time_interleaved(cases: dict[str, Callable[[], Any]], repeats: int = 20, warmup: int = 3) -> dict[str, Latency]:
    """Each case's latency: ``warmup`` untimed rounds, then ``repeats`` timed ones, each round calling every case once
    in turn."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for case in cases.values():
            case()
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            runs[name].append((time.perf_counter() - start) * 1000.0)
    return {name: Latency(tuple(ms)) for name, ms in runs.items()}


def measure_latency(function: Callable[[], object], repeats: int = 20, warmup: int = 3) -> Latency:
    """Latency of one callable alone."""
    return time_interleaved({"call": function}, repeats, warmup)["call"]
