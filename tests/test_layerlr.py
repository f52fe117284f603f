"""layerlr: each model part's learning rate follows its multiplier from the chosen experience on."""
from types import SimpleNamespace

import pytest
import torch

from clmtl.builders import make_optimizer
from clmtl.config import load_config
from clmtl.training.registry import build_plugins
from clmtl.training.schedule import LRSchedule


class Parts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.neck, self.head = (torch.nn.Linear(2, 2) for _ in range(3))

    def parameter_groups(self):
        return {name: list(getattr(self, name).parameters()) for name in ("backbone", "neck", "head")}


def strategy_at(experience, optimizer):
    return SimpleNamespace(optimizer=optimizer, planned_iterations=4, dataloader=[None] * 4,
                           clock=SimpleNamespace(train_exp_counter=experience, train_exp_iterations=0))


def lrs(optimizer):
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


def test_multipliers_apply_from_the_chosen_experience_and_compose_with_cosine():
    config = load_config(None, ["train.lr=0.01"])
    optimizer = make_optimizer(config, Parts())
    (plugin,) = build_plugins("layerlr", {"layerlr": {"backbone": 0.1, "neck": 0.5}})
    cosine = LRSchedule(cosine=True)

    for experience, expected in [(0, {"backbone": 0.01, "neck": 0.01, "head": 0.01}),
                                 (1, {"backbone": 0.001, "neck": 0.005, "head": 0.01}),
                                 (2, {"backbone": 0.001, "neck": 0.005, "head": 0.01})]:
        strategy = strategy_at(experience, optimizer)
        plugin.before_training_exp(strategy)
        cosine.before_training_exp(strategy)  # runs after layerlr in a composed list
        assert lrs(optimizer) == pytest.approx(expected)
        strategy.clock.train_exp_iterations = 1  # iteration 1 done (Avalanche's clock counts it last): the next, 2 of
        # the experience's 4, is half-way, at half the rate
        cosine.after_training_iteration(strategy)
        assert lrs(optimizer) == pytest.approx({k: v / 2 for k, v in expected.items()})
        cosine.after_training_exp(strategy)
        assert lrs(optimizer) == pytest.approx(expected)


def test_an_optimizer_without_named_parts_is_a_clear_error():
    optimizer = torch.optim.Adam(Parts().parameters(), lr=0.01)
    (plugin,) = build_plugins("layerlr")
    with pytest.raises(ValueError, match="parameter groups named"):
        plugin.before_training_exp(strategy_at(1, optimizer))


def test_negative_multiplier_is_refused():
    with pytest.raises(ValueError, match="strategy.layerlr.neck"):
        build_plugins("layerlr", {"layerlr": {"neck": -1.0}})
