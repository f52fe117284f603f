"""Cosine decay: the lr follows the cosine over the experience's iterations and is restored afterwards."""
import math
from types import SimpleNamespace

import pytest
import torch

from clmtl.schedule import CosineDecay


def test_lr_follows_the_cosine_and_is_restored():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    strategy = SimpleNamespace(optimizer=optimizer, train_epochs=2, dataloader=[None] * 5,
                               clock=SimpleNamespace(train_exp_iterations=0))
    plugin = CosineDecay()
    plugin.before_training_exp(strategy)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    seen = []
    for iteration in range(1, 11):
        strategy.clock.train_exp_iterations = iteration
        plugin.after_training_iteration(strategy)
        seen.append(optimizer.param_groups[0]["lr"])
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(1, 11)]
    assert seen == pytest.approx(expected)
    assert seen[-1] == pytest.approx(0.0, abs=1e-12)
    plugin.after_training_exp(strategy)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
