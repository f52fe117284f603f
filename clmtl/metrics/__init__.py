"""Task scores (mIoU, COCO mAP, top-1) and forgetting from the accuracy matrix.

The Avalanche plugin metrics live in ``clmtl.metrics.plugin``, imported on demand because it imports Avalanche.
"""
from clmtl.metrics.forgetting import (absolute_drop, average_accuracy, bwt, drop_vs_baseline, forgetting,
                                      forgetting_max, fwt, relative_drop)
from clmtl.metrics.scores import CocoMAP, MeanIoU, Scorer, Top1, scorer_for

__all__ = [
    "CocoMAP",
    "MeanIoU",
    "Scorer",
    "Top1",
    "absolute_drop",
    "average_accuracy",
    "bwt",
    "drop_vs_baseline",
    "forgetting",
    "forgetting_max",
    "fwt",
    "relative_drop",
    "scorer_for",
]
