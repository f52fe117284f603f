"""Weight averaging: an experience ends with the moving average of its weights, which later plugins then see."""
import math

import pytest
import torch
from avalanche.benchmarks import benchmark_from_datasets
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import EWCPlugin
from test_ewc import classification_data

from clmtl.builders import recipe_plugins
from clmtl.config import load_config
from clmtl.errors import ConfigError
from clmtl.training.averaging import WeightAveraging

DECAY, TAU = 0.9, 3.0


class RecordWeights(SupervisedPlugin):
    """The model's floating-point state before training and after every iteration."""

    def __init__(self):
        super().__init__()
        self.states = []

    def before_training_exp(self, strategy, **kwargs):
        self.states.append(_floats(strategy.model))

    def after_training_iteration(self, strategy, **kwargs):
        self.states.append(_floats(strategy.model))


def _floats(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def model_with_batchnorm():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))


def train(plugins, model):
    stream = benchmark_from_datasets(train=[classification_data(n=40)], test=[classification_data(n=8, seed=1)])
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), train_mb_size=8,
                     train_epochs=2, plugins=plugins, evaluator=None)
    strategy.train(stream.train_stream[0])
    return model


def test_the_experience_ends_with_the_exponential_moving_average_of_its_weights():
    recorder = RecordWeights()
    model = train([WeightAveraging(DECAY, TAU), recorder], model_with_batchnorm())
    first, *steps = recorder.states
    assert len(steps) == 10  # 2 epochs of 5 batches
    expected = dict(first)
    for t, weights in enumerate(steps, start=1):  # ultralytics' ramped decay, by hand
        d = DECAY * (1 - math.exp(-t / TAU))
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}
    got = _floats(model)
    assert set(got) == set(expected) and any("running_mean" in k for k in got)  # BatchNorm statistics too
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    for name in ("0.weight", "1.running_mean", "3.weight"):  # not the last weights (0.bias, before BatchNorm, stays)
        assert not torch.allclose(got[name], steps[-1][name]), name
    assert model[1].num_batches_tracked.item() == 10  # counters stay the model's


def test_later_plugins_see_the_averaged_weights():
    """EWC's anchor θ* is taken in after_training_exp: after the average is loaded, since it comes first."""
    ewc = EWCPlugin(1.0)
    model = train([WeightAveraging(DECAY, TAU), ewc], model_with_batchnorm())
    for name, param in model.named_parameters():
        assert torch.equal(ewc.saved_params[0][name].data, param.data), name


def test_state_is_kept_only_inside_an_experience():
    averaging = WeightAveraging(DECAY, TAU)
    train([averaging], model_with_batchnorm())
    assert averaging.state_dict() == {"updates": 0, "average": None}  # nothing to carry between experiences


def test_config_turns_it_on_and_checks_the_decay():
    assert recipe_plugins(load_config(None, ["train.ema=0"])) == []
    (averaging,) = recipe_plugins(load_config(None, ["train.ema=0.99", "train.ema_tau=50"]))
    assert (averaging.decay, averaging.tau) == (0.99, 50)
    with pytest.raises(ConfigError, match="train.ema"):
        load_config(None, ["train.ema=1"])
    with pytest.raises(ConfigError, match="train.ema_tau"):
        load_config(None, ["train.ema_tau=0"])
