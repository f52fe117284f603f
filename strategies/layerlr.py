"""Per-part learning rates: slow down the shared layers once the first task is learned.

Every task reads the backbone and the neck; only part of the head is its own. Lower learning rates on the shared
parts in later experiences trade plasticity for stability where forgetting happens, at no cost per step. The
optimizer ``clmtl run`` builds has one named parameter group per model part (``backbone``, ``neck``, ``head``);
this plugin sets each group's rate to the configured rate times the part's multiplier from experience
``from_experience`` on. Adam is invariant to gradient scale, so the rate, not the gradient, must change.
"""
from __future__ import annotations

from dataclasses import dataclass

from clmtl.settings import NON_NEGATIVE, setting
from clmtl.training.plugin import Plugin
from clmtl.training.registry import register

PARTS = ("backbone", "neck", "head")


class LayerLearningRates(Plugin, supports_distributed=True):
    """Per-part learning-rate multipliers (backbone / neck / head) from a given experience on.

    Multiplies each named parameter group's base learning rate by its part's multiplier."""

    def __init__(self, backbone: float = 0.1, neck: float = 0.3, head: float = 1.0, from_experience: int = 1) -> None:
        super().__init__()
        self.multipliers = {"backbone": backbone, "neck": neck, "head": head}
        """Each part's multiplier, by the name of its parameter group (``PARTS``)."""
        self.from_experience = from_experience

    def before_training_exp(self, strategy, **kwargs) -> None:
        active = strategy.clock.train_exp_counter >= self.from_experience
        for group in strategy.optimizer.param_groups:
            name = group.get("name")
            if name == "routes":  # the routing strategy's gate embeddings keep the rate it gave them
                continue
            if name not in self.multipliers:
                raise ValueError(
                    f"layerlr needs parameter groups named {PARTS}; found a group named {name!r} "
                    "(build the optimizer with clmtl.builders.make_optimizer)"
                )
            base = group.setdefault("base_lr", group["lr"])
            group["lr"] = base * (self.multipliers[name] if active else 1.0)


@dataclass(frozen=True)
class LayerLRSettings:
    """layerlr's hyperparameters, ``strategy.layerlr.<key>``: a learning-rate multiplier per part."""

    backbone: float = setting(0.1, NON_NEGATIVE, help="multiplier of the backbone's learning rate",
                              search=(0.03, 0.1, 0.3))
    neck: float = setting(0.3, NON_NEGATIVE, help="multiplier of the neck's learning rate")
    head: float = setting(1.0, NON_NEGATIVE, help="multiplier of the head's learning rate")
    from_experience: int = setting(1, NON_NEGATIVE, help="first experience (0-based) the multipliers apply to")


register("layerlr", settings=LayerLRSettings, acts_on=("optimizer",))(LayerLearningRates)
