"""bnfreeze: BatchNorm statistics and affine parameters stop changing after the first experience."""
from types import SimpleNamespace

import pytest
import torch
from clmtl.strategies.bnfreeze import BatchNormFreeze, PerTaskBatchNorm, batch_norms


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


def test_per_task_mode_gives_each_task_back_its_own_statistics_and_affine_parameters():
    from clmtl.training.registry import build_plugins

    model = net()
    model(torch.randn(2, 3, 8, 8))
    (plugin,) = build_plugins("bnfreeze", {"bnfreeze": {"mode": "per_task"}})
    bn = batch_norms(model)[0]
    strategy = SimpleNamespace(model=model, experience=SimpleNamespace(task_label=0))

    def train_on(task, shift):
        strategy.experience.task_label = task
        plugin.before_training_exp(strategy)
        model.train()
        for _ in range(5):
            model(torch.randn(8, 3, 8, 8) + shift)
        with torch.no_grad():
            bn.weight.add_(shift)  # stands in for an optimizer step on the affine parameters
        plugin.after_training_exp(strategy)
        return bn.running_mean.clone(), bn.weight.detach().clone()

    mean0, weight0 = train_on(0, 0.0)
    mean1, weight1 = train_on(1, 4.0)
    assert not torch.allclose(mean0, mean1)
    start_of_task1 = plugin.bn_states[1]
    for task, (mean, weight) in [(0, (mean0, weight0)), (1, (mean1, weight1)), (0, (mean0, weight0))]:
        strategy.experience.task_label = task
        plugin.before_eval_exp(strategy)
        torch.testing.assert_close(bn.running_mean, mean)
        torch.testing.assert_close(bn.weight.detach(), weight)
    assert start_of_task1 is plugin.bn_states[1]  # evaluating does not overwrite a task's stored state


def test_a_new_task_starts_from_the_last_trained_task():
    model = net()
    model(torch.randn(2, 3, 8, 8))
    plugin = PerTaskBatchNorm()
    strategy = SimpleNamespace(model=model, experience=SimpleNamespace(task_label=0))
    plugin.before_training_exp(strategy)
    model.train()
    model(torch.randn(8, 3, 8, 8) + 2)
    plugin.after_training_exp(strategy)
    trained = batch_norms(model)[0].running_mean.clone()
    strategy.experience.task_label = 2
    plugin.before_eval_exp(strategy)  # an untrained task: nothing to load
    with torch.no_grad():
        batch_norms(model)[0].running_mean.zero_()
    strategy.experience.task_label = 1
    plugin.before_training_exp(strategy)
    torch.testing.assert_close(batch_norms(model)[0].running_mean, trained)


@pytest.mark.slow
def test_clmtl_eval_runs_each_task_with_its_own_batchnorm(tmp_path):
    """A per_task run's checkpoint carries every task's BatchNorm: evaluating it reproduces the run's final scores,
    which the model's own (last task's) BatchNorm does not."""
    from clmtl.config import load_config
    from clmtl.deploy.evaluation import evaluate_checkpoint
    from clmtl.runner import run
    from clmtl.training.checkpoint import load_model_checkpoint
    from clmtl.training.registry import strategy_schemas

    config = load_config(None, ["data.train_size=32", "data.val_size=16", "data.image_size=64", "train.epochs=4",
                                "train.batch_size=4", "output.overlays=0", "train.threads=1",
                                "strategy.bnfreeze.mode=per_task"], strategies=strategy_schemas())
    results = run(config, "bnfreeze", tmp_path, baselines=False)
    checkpoint = tmp_path / "checkpoints" / "last.pt"
    assert sorted(load_model_checkpoint(checkpoint).task_states) == [0, 1, 2]
    scores = evaluate_checkpoint(checkpoint)
    for task in results.tasks:
        assert scores[task["name"]][task["metric"]] == pytest.approx(results.final[task["name"]], abs=1e-9)

    saved = torch.load(checkpoint, weights_only=True)
    del saved["task_states"]  # the negative control: every task with the last task's BatchNorm
    torch.save(saved, tmp_path / "without.pt")
    plain = evaluate_checkpoint(tmp_path / "without.pt")
    assert any(plain[t["name"]][t["metric"]] != pytest.approx(results.final[t["name"]], abs=1e-9)
               for t in results.tasks[:2])
