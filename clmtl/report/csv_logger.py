"""An Avalanche logger that keeps every numeric metric value in one CSV file.

Avalanche's own CSVLogger only writes its hard-coded accuracy/loss columns (our mIoU and mAP come out as 0);
this one writes whatever the EvaluationPlugin emits, one row per value, flushed at once so a killed run keeps it.
It lives apart from clmtl.report.summary so that importing the report does not import Avalanche (~4.5 s).
"""
from __future__ import annotations

import csv
import numbers
from pathlib import Path
from typing import Any

from avalanche.logging import BaseLogger

CSV_COLUMNS = ("metric", "x", "value")


class MetricsCSVLogger(BaseLogger):
    """Appends ``metric, x, value`` rows to ``path`` (header written when the file is new or empty)."""

    def __init__(self, path: str | Path):
        super().__init__()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        is_new = not path.exists() or path.stat().st_size == 0
        self.path = path
        self._file = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - open for the run; see close()
        self._writer = csv.writer(self._file)
        if is_new:
            self._write(CSV_COLUMNS)

    def log_single_metric(self, name: str, value: Any, x_plot: int) -> None:
        """Write one row if ``value`` is a single number; images, histograms and text are skipped."""
        number = _as_number(value)
        if number is not None:
            self._write((name, x_plot, number))

    def close(self) -> None:
        self._file.close()

    def _write(self, row: tuple) -> None:
        self._writer.writerow(row)
        self._file.flush()


def _as_number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Number):
        return value.item() if hasattr(value, "item") else value  # numpy scalars -> Python numbers
    if hasattr(value, "numel") and value.numel() == 1:  # one-element torch tensor
        return value.item()
    return None
