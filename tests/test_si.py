"""Synaptic Intelligence (``si``) against a hand computation of its path integral, and against Avalanche's
``SynapticIntelligencePlugin`` with the clamp of its importances lifted: the same training, weight for weight. With
Avalanche's clamp at 0.001 the trainings part, which is why the two differ on the papers' protocols."""
import math

import pytest
import torch
from avalanche.training.plugins import SynapticIntelligencePlugin
from tiny_mnist import banded_mnist
from torch import nn

import clmtl
from clmtl.builders import build_model, build_strategy, make_template
from clmtl.strategies.si import SynapticIntelligence
from clmtl.stream.benchmark import build_benchmark


class FakeStrategy:
    def __init__(self, model):
        self.model, self.device, self.loss = model, torch.device("cpu"), torch.zeros(())


def test_the_importance_is_the_path_integral_over_the_squared_move_plus_damping():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    strategy, plugin = FakeStrategy(model), SynapticIntelligence(c=2.0, damping=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    start = model.weight.detach().clone()
    path = torch.zeros_like(start)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    plugin.before_training_exp(strategy)
    for _ in range(4):
        optimizer.zero_grad()
        strategy.loss = ((model(x) - y) ** 2).mean()
        plugin.before_backward(strategy)
        strategy.loss.backward()
        grad, before = model.weight.grad.clone(), model.weight.detach().clone()
        plugin.before_update(strategy)
        optimizer.step()
        plugin.after_update(strategy)
        path -= grad * (model.weight.detach() - before)
    plugin.after_training_exp(strategy)
    moved = model.weight.detach() - start
    assert torch.allclose(plugin.importance["weight"], path / (moved ** 2 + 0.1))
    assert torch.equal(plugin.anchor["weight"], model.weight.detach())
    with torch.no_grad():
        model.weight += 0.5
    strategy.loss = torch.zeros(())
    plugin.before_backward(strategy)
    expected = 2.0 * (plugin.importance["weight"].clamp(min=0) * 0.25).sum()
    assert math.isclose(float(strategy.loss), float(expected), rel_tol=1e-6)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return banded_mnist(tmp_path_factory.mktemp("mnist"), 20, 5)


def final_weights(root, strategy, overrides) -> list[torch.Tensor]:
    """The model's weights after a two-task domain stream trained with ``strategy``."""
    config = clmtl.load_config({
        "split": {"kind": "classification", "experiences": 2,
                  "data": {"format": "torchvision", "dataset": "MNIST", "root": str(root),
                           "classes": ["0", "1", "2", "3"]}},
        "scenario": "domain", "data": {"image_size": 28, "channels": 1, "hflip": 0.0},
        "model": {"backbone": "mlp", "hidden": [16]},
        "train": {"optimizer": "sgd", "lr": 0.05, "batch_size": 16, "iterations": 12, "warmup": 0, "ema": 0,
                  "precision": "fp32", "channels_last": False}}, overrides)
    benchmark = build_benchmark(config)
    model = build_model(config, benchmark.tasks)
    template = make_template(config, model, benchmark.tasks, build_strategy(strategy, config, benchmark),
                             progress=False)
    for label, experience in enumerate(benchmark.stream.train_stream):
        template.train_for(experience, *benchmark.budget(label))
    return [p.detach().clone() for p in model.parameters()]


def avalanche_mended(monkeypatch, clamp: bool):
    """Avalanche's SI with the weights it keeps copied (on the CPU it keeps views of the parameters, which the
    optimizer step moves too, so every path integral is 0), and without the clamp of its importances at 0.001
    unless ``clamp``."""
    update = SynapticIntelligencePlugin.update_ewc_data

    def extract_weights(model, target, excluded_parameters):
        for name, param in SynapticIntelligencePlugin.allowed_parameters(model, excluded_parameters):
            target[name].data = param.detach().flatten().clone()

    def unclamped(net, ewc_data, syn_data, clip_to, excluded, c=0.0015, eps=1e-7):
        return update(net, ewc_data, syn_data, math.inf, excluded, c, eps)

    monkeypatch.setattr(SynapticIntelligencePlugin, "extract_weights", staticmethod(extract_weights))
    if not clamp:
        monkeypatch.setattr(SynapticIntelligencePlugin, "update_ewc_data", staticmethod(unclamped))


def test_si_trains_as_avalanches_plugin_does_once_mended_and_unclamped(root, monkeypatch):
    ours = final_weights(root, "si", ["strategy.si.c=50", "strategy.si.damping=0.1"])
    stock = ["strategy.avalanche.SynapticIntelligence.si_lambda=100", "strategy.avalanche.SynapticIntelligence.eps=0.1"]
    as_shipped = final_weights(root, "avalanche.SynapticIntelligence", stock)
    naive = final_weights(root, "naive", [])
    assert all(torch.equal(a, b) for a, b in zip(as_shipped, naive))  # on the CPU its importances are all 0
    avalanche_mended(monkeypatch, clamp=True)
    clamped = final_weights(root, "avalanche.SynapticIntelligence", stock)
    avalanche_mended(monkeypatch, clamp=False)
    mended = final_weights(root, "avalanche.SynapticIntelligence", stock)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, mended))
    assert max(float((a - b).abs().max()) for a, b in zip(ours, clamped)) > 1e-3
