"""Learning-rate schedule: warmup and cosine follow their formulas over the experience and are restored after."""
import math
from types import SimpleNamespace

import pytest
import torch
from avalanche.training.plugins.clock import Clock

from clmtl.builders import make_schedule
from clmtl.config import load_config
from clmtl.errors import ConfigError
from clmtl.training.schedule import LRSchedule


def run_experience(plugin: LRSchedule, epochs: int = 2, batches: int = 5, lr: float = 0.01) -> tuple[list, float]:
    """The lr of every step of one experience, with the plugin called as Avalanche calls it: before Avalanche's own
    ``Clock``, which the template keeps last; and the lr after the experience."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    clock = Clock()
    strategy = SimpleNamespace(optimizer=optimizer, planned_iterations=epochs * batches, dataloader=[None] * batches,
                               clock=clock)
    plugin.before_training_exp(strategy)
    clock.before_training_exp(strategy)
    seen = []
    for _ in range(epochs * batches):
        seen.append(optimizer.param_groups[0]["lr"])  # the step of this iteration uses it
        plugin.after_training_iteration(strategy)
        clock.after_training_iteration(strategy)
    plugin.after_training_exp(strategy)
    return seen, optimizer.param_groups[0]["lr"]


def test_cosine_decays_towards_zero_and_is_restored():
    seen, after = run_experience(LRSchedule(cosine=True))
    assert seen == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(10)])
    assert seen[-1] > 0 and after == pytest.approx(0.01)


def test_warmup_rises_linearly_then_holds():
    seen, after = run_experience(LRSchedule(warmup_epochs=0.8), epochs=2, batches=5)  # 4 warmup iterations
    assert seen == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01])
    assert after == pytest.approx(0.01)


def test_warmup_and_cosine_multiply():
    seen, _ = run_experience(LRSchedule(cosine=True, warmup_epochs=1), epochs=2, batches=5)
    expected = [0.01 * min(1, (t + 1) / 5) * 0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(10)]
    assert seen == pytest.approx(expected)


def test_config_picks_the_schedule():
    assert make_schedule(load_config(None, ["train.warmup=0"])) is None  # constant, no warmup: no plugin at all
    schedule = make_schedule(load_config(None, []))
    assert (schedule.cosine, schedule.warmup_epochs) == (False, 3.0)  # the default: 3 epochs of warmup
    schedule = make_schedule(load_config(None, ["train.schedule=cosine", "train.warmup=0.5"]))
    assert (schedule.cosine, schedule.warmup_epochs) == (True, 0.5)
    with pytest.raises(ConfigError, match="train.warmup"):
        load_config(None, ["train.warmup=-1"])
