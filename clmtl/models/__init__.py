"""Model parts: anchors, backbone, FPN, unified head and the UnifiedModel that joins them.

``UnifiedModel`` is imported lazily: it pulls in avalanche and ultralytics, which light users
(decoding, losses) do not need.
"""
from clmtl.models.anchors import AnchorLayout

__all__ = ["AnchorLayout", "UnifiedModel"]


def __getattr__(name: str):
    if name == "UnifiedModel":
        from clmtl.models.unified import UnifiedModel

        return UnifiedModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
