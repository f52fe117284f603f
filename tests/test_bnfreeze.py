"""bnfreeze: BatchNorm statistics and affine parameters stop changing after the first experience."""
from types import SimpleNamespace

import torch

from strategies.bnfreeze import BatchNormFreeze, batch_norms


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.LazyLinear(2))


def test_statistics_and_affine_parameters_are_frozen_after_the_first_experience():
    model = net()
    model(torch.randn(4, 3, 8, 8))
    strategy = SimpleNamespace(model=model)
    plugin = BatchNormFreeze()

    plugin.before_training_iteration(strategy)  # first experience: BN still learns
    model.train()
    model(torch.randn(4, 3, 8, 8) + 3)
    bn = batch_norms(model)[0]
    assert bn.running_mean.abs().sum() > 0 and bn.weight.requires_grad

    plugin.after_training_exp(strategy)
    frozen_mean, frozen_var = bn.running_mean.clone(), bn.running_var.clone()
    model.train()
    plugin.before_training_iteration(strategy)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    conv_before = model[0].weight.detach().clone()
    loss = model(torch.randn(4, 3, 8, 8) * 5 - 2).sum()
    loss.backward()
    optimizer.step()
    assert torch.equal(bn.running_mean, frozen_mean) and torch.equal(bn.running_var, frozen_var)
    assert not bn.weight.requires_grad and not bn.bias.requires_grad
    assert not torch.equal(model[0].weight, conv_before)  # the rest keeps learning
