"""Datasets that serve another dataset's samples (a subset of them, relabelled, or in another domain).

Predictions in a file's terms (``meta``) and scores at a file's resolution (``original_target``) read the real-format
dataset at the bottom of the stack; each view forwards both to the sample it serves, so that no wrapper loses them.
"""
from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset


class DatasetView(Dataset):
    """Serves samples of ``self.dataset``: view sample ``i`` is its sample ``source_index(i)``."""

    dataset: Dataset

    def source_index(self, i: int) -> int:
        """The wrapped dataset's index of sample ``i`` (the same unless the view keeps a subset)."""
        return i

    def meta(self, i: int) -> Any:
        """The served sample's file metadata (real-format datasets, else None)."""
        return self.dataset.meta(self.source_index(i)) if hasattr(self.dataset, "meta") else None

    @property
    def has_original_targets(self) -> bool:
        """Whether ``original_target`` gives label maps at the files' resolution (segmentation files)."""
        return getattr(self.dataset, "has_original_targets", False)

    def original_target(self, i: int) -> Any:
        """The served sample's target at its file's resolution."""
        return self.dataset.original_target(self.source_index(i))
