"""Naive fine-tuning: no protection against forgetting, the lower bound of every table."""
from clmtl.training.registry import register


@register("naive")
def naive() -> None:
    """Plain sequential fine-tuning (lower bound)."""
    return None
