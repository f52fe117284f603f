"""EWC: penalty properties, Fisher on every target kind, and agreement with Avalanche's own EWCPlugin."""
import copy

import pytest
import torch
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.benchmarks.utils.data_attribute import TaskLabels
from avalanche.benchmarks.utils.flat_data import ConstantSequence
from avalanche.training.plugins import EWCPlugin
from avalanche.training.utils import copy_params_dict
from torch.utils.data import TensorDataset

from clmtl.strategies.ewc import MultiTaskEWCPlugin, ewc_penalty, merge_anchors


def classification_data(n=40, features=6, classes=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return AvalancheDataset([TensorDataset(x, y)], data_attributes=[TaskLabels(ConstantSequence(0, n))])


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def test_fisher_equals_avalanche_ewc_on_a_classification_stream():
    data, model = classification_data(), mlp()
    twin = copy.deepcopy(model)
    criterion = torch.nn.CrossEntropyLoss()
    ours = MultiTaskEWCPlugin(1000.0, fisher="batch").compute_importances(
        model, criterion, torch.optim.SGD(model.parameters(), lr=0.1), data, "cpu", 8
    )
    theirs = EWCPlugin(1000.0).compute_importances(
        twin, criterion, torch.optim.SGD(twin.parameters(), lr=0.1), data, "cpu", 8
    )
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name].data, theirs[name].data)
    assert any(float(imp.data.sum()) > 0 for imp in ours.values())


def classifier_with_batchnorm():
    """A float64 MLP with a BatchNorm whose running statistics are far from a batch's own: the Fisher pass must run
    it in eval mode (one sample's gradient then depends on that sample alone), or its gradients differ."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3)).double()
    model[1].running_mean.uniform_(-1.0, 1.0)
    model[1].running_var.uniform_(0.5, 2.0)
    return model


def fisher_by_torch_func(model, x, y, estimator: str, *args) -> dict[str, torch.Tensor]:
    """The diagonal Fisher written out independently of the plugin, with ``torch.func``: per-sample Jacobians J[n, c]
    of log p(c | x_n) by ``vmap(jacrev)`` on the eval-mode model (called as ``model(x_n[None], *args)``), then

    - empirical: mean_n J[n, y_n]², the squared gradient of the observed label's log-likelihood;
    - exact: mean_n Σ_c p(c | x_n) J[n, c]², the expectation over the model's own predictive distribution
      (``fisher_labels='all'`` of van de Ven's continual-learning code)."""
    model.eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def log_probs(p, xi):
        return torch.func.functional_call(model, (p, buffers), (xi[None], *args))[0].log_softmax(-1)

    jacobians = torch.func.vmap(torch.func.jacrev(log_probs), in_dims=(None, 0))(params, x)  # name -> [N, C, ...]
    probs = torch.func.vmap(log_probs, in_dims=(None, 0))(params, x).exp()  # [N, C]
    fisher = {}
    for name, jacobian in jacobians.items():
        squared = jacobian.pow(2)
        if estimator == "empirical":
            per_sample = squared[torch.arange(len(y)), y]
        else:
            per_sample = (probs.reshape(*probs.shape, *[1] * (squared.dim() - 2)) * squared).sum(1)
        fisher[name] = per_sample.mean(0)
    return fisher


def test_a_capped_fisher_is_the_fisher_of_evenly_spaced_samples():
    data, model = classification_data(n=7, dtype=torch.float64), classifier_with_batchnorm()
    ours = MultiTaskEWCPlugin(1.0, fisher_max_samples=3).compute_importances(
        model, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), data, "cpu", 4
    )
    kept = [0, 2, 4]  # 3 of 7, evenly spaced
    x = torch.stack([data[i][0] for i in kept])
    y = torch.stack([data[i][1] for i in kept])
    for name, value in fisher_by_torch_func(model, x, y, "empirical").items():
        torch.testing.assert_close(ours[name].data, value, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("estimator", ["empirical", "exact"])
def test_fisher_equals_an_independent_per_sample_computation(estimator):
    data, model = classification_data(n=7, dtype=torch.float64), classifier_with_batchnorm()
    torch.manual_seed(0)
    ours = MultiTaskEWCPlugin(1.0, fisher=estimator).compute_importances(  # fisher_samples left at 1
        model, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), data, "cpu", 4
    )
    assert model.training  # the plugin gives the model back in train mode
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.stack([data[i][1] for i in range(len(data))])
    expected = fisher_by_torch_func(model, x, y, estimator)
    assert list(ours) == list(expected)
    for name, value in expected.items():
        assert float(value.abs().max()) > 0, name
        torch.testing.assert_close(ours[name].data, value, rtol=1e-6, atol=0.0, msg=lambda m, name=name: f"{name}: {m}")
    # the two estimators differ here, so agreeing with one is not agreeing with the other
    other = fisher_by_torch_func(model, x, y, "exact" if estimator == "empirical" else "empirical")
    assert not all(torch.allclose(other[name], value, rtol=1e-2) for name, value in expected.items())


def test_predicted_fisher_is_the_empirical_one_at_the_models_own_labels():
    data, model = classification_data(n=7, dtype=torch.float64), classifier_with_batchnorm()
    plugin = MultiTaskEWCPlugin(1.0, fisher="predicted")
    ours = plugin.compute_importances(
        model, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), data, "cpu", 4
    )
    entries = torch.cat([importance.data.flatten() for importance in ours.values()])
    assert plugin.stats()["fisher_mean"] == [pytest.approx(float(entries.mean()))]
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.stack([data[i][1] for i in range(len(data))])
    model.eval()
    with torch.no_grad():
        predicted = model(x).argmax(1)
    model.train()
    assert not torch.equal(predicted, y)  # otherwise this would not tell the estimators apart
    expected = fisher_by_torch_func(model, x, predicted, "empirical")
    for name, value in expected.items():
        torch.testing.assert_close(ours[name].data, value, rtol=1e-6, atol=0.0)


def test_batch_fisher_is_smaller_than_empirical():
    """Averaging a mini-batch's gradients before squaring cancels their noise."""
    data, model = classification_data(n=12), mlp()
    criterion = torch.nn.CrossEntropyLoss()
    totals = {}
    for estimator in ("empirical", "batch"):
        importances = MultiTaskEWCPlugin(1.0, fisher=estimator).compute_importances(
            model, criterion, torch.optim.SGD(model.parameters(), lr=0.1), data, "cpu", 12
        )
        totals[estimator] = sum(float(i.data.sum()) for i in importances.values())
    assert totals["empirical"] > totals["batch"] > 0


@pytest.fixture(scope="module")
def unified():
    """The unified model at 64 px and a three-task shapes stream of three training images per task."""
    from clmtl.data.shapes import make_shapes_dataset, shapes_task
    from clmtl.models.unified import UnifiedModel
    from clmtl.stream.experiences import build_stream
    from clmtl.stream.scenario import output_spaces
    from clmtl.stream.tasks import KINDS

    tasks = [shapes_task(kind, kind[:3]) for kind in KINDS]
    sets = [make_shapes_dataset(t.kind, "train", 3, 64) for t in tasks]
    torch.manual_seed(0)
    return tasks, sets, build_stream(tasks, sets, sets), UnifiedModel(output_spaces(tasks), image_size=64)


def per_sample_fisher(model, criterion, samples, head: int) -> dict[str, torch.Tensor]:
    """The textbook empirical Fisher diagonal, written out independently of the plugin: the model in eval mode,
    one ``(image, target)`` of the raw dataset at a time through ``model(x, head)``, the gradient of its loss by
    ``torch.autograd.grad``, squared, averaged over the samples."""
    model.eval()
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for image, target in samples:
        batch_target = [target] if isinstance(target, dict) else torch.as_tensor(target)[None]  # a batch of one
        loss = criterion(model(image[None], head), batch_target)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, grad in zip(params, grads):
            if grad is not None:
                total[name] += grad.pow(2)
    return {name: value / len(samples) for name, value in total.items()}


@pytest.mark.parametrize("label", [0, 1, 2], ids=["segmentation", "detection", "classification"])
def test_empirical_fisher_equals_mean_squared_per_sample_gradients_on_every_target_kind(unified, label):
    from clmtl.training.losses import MultiTaskLoss

    tasks, sets, stream, model = unified
    model = copy.deepcopy(model)
    criterion = MultiTaskLoss(model.anchor_layout)
    ours = MultiTaskEWCPlugin(1.0).compute_importances(
        model, criterion, torch.optim.SGD(model.parameters(), lr=0.1), stream.train_stream[label].dataset, "cpu", 2
    )
    expected = per_sample_fisher(model, criterion, [sets[label][i] for i in range(len(sets[label]))], label)
    assert list(ours) == list(expected)
    scale = max(float(value.max()) for value in expected.values())
    assert scale > 0
    for name, value in expected.items():
        torch.testing.assert_close(ours[name].data, value, rtol=1e-5, atol=scale * 1e-6, msg=name)
    head = f"head.outputs.{label}."
    assert all(float(value.abs().sum()) == 0 for name, value in expected.items()
               if name.startswith("head.outputs.") and not name.startswith(head))  # other tasks' heads: no gradient
    assert float(sum(value.sum() for name, value in expected.items() if name.startswith("backbone."))) > 0


@pytest.mark.parametrize("estimator", ["empirical", "exact"])
def test_fisher_of_the_unified_models_classification_head_equals_torch_func(unified, estimator):
    from clmtl.training.losses import MultiTaskLoss

    tasks, sets, stream, model = unified
    model, label = copy.deepcopy(model), 2
    assert tasks[label].kind == "classification"
    ours = MultiTaskEWCPlugin(1.0, fisher=estimator).compute_importances(
        model, MultiTaskLoss(model.anchor_layout), torch.optim.SGD(model.parameters(), lr=0.1),
        stream.train_stream[label].dataset, "cpu", 2
    )
    x = torch.stack([sets[label][i][0] for i in range(len(sets[label]))])
    y = torch.as_tensor([int(sets[label][i][1]) for i in range(len(sets[label]))])
    expected = fisher_by_torch_func(model, x, y, estimator, label)
    assert list(ours) == list(expected)
    scale = max(float(value.max()) for value in expected.values())
    assert scale > 0
    for name, value in expected.items():  # float32: a looser tolerance than the float64 MLP's
        torch.testing.assert_close(ours[name].data, value, rtol=1e-5, atol=scale * 1e-6, msg=name)


def test_exact_fisher_is_nonnegative_and_nonzero_on_every_target_kind(unified):
    """On segmentation and detection the exact estimator draws labelings from the model (classification is summed over
    its classes and checked against ``torch.func`` above); on those only its sign and presence are checked."""
    from clmtl.training.losses import MultiTaskLoss

    tasks, _, stream, model = unified
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)
    for label, experience in enumerate(stream.train_stream):
        importances = MultiTaskEWCPlugin(1.0, fisher="exact").compute_importances(
            model, MultiTaskLoss(model.anchor_layout), optimizer, experience.dataset, "cpu", 2
        )
        values = torch.cat([imp.data.flatten() for imp in importances.values()])
        assert values.min() >= 0 and values.max() > 0, tasks[label].kind


# --- a whole training trajectory: clmtl's EWC (batch Fisher) against Avalanche's EWCPlugin -----------------------


def ewc_trajectory(plugin, experiences: int = 3) -> torch.nn.Module:
    """The MLP trained by Avalanche's ``Naive`` with ``plugin`` over ``experiences`` experiences of random labels
    (each pulls the weights its own way, so forgetting is large and the penalty has work to do), seeded alike."""
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    model = mlp(seed=0)
    data = [classification_data(n=24, seed=10 + e) for e in range(experiences)]
    stream = benchmark_from_datasets(train=data, test=data[:1])
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=8, train_epochs=2, eval_mb_size=8,
                     plugins=[plugin] if plugin is not None else [], evaluator=EvaluationPlugin(), device="cpu")
    torch.manual_seed(1)  # the loaders' shuffles
    for experience in stream.train_stream:
        strategy.train(experience)
    return model


@pytest.mark.parametrize("mode, decay", [("separate", None), ("online", 0.5)])
def test_training_with_ewc_follows_avalanche_ewc_exactly(mode, decay):
    strength = 100.0  # strong enough to move the end point far (below) from where naive training ends
    ours = MultiTaskEWCPlugin(strength, mode=mode, decay=decay, fisher="batch")
    theirs = EWCPlugin(strength, mode=mode, decay_factor=decay)
    trained, reference = ewc_trajectory(ours), ewc_trajectory(theirs)
    for (name, got), (_, expected) in zip(trained.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert sorted(ours.importances) == sorted(theirs.importances)  # online keeps only the last, separate all three
    assert sorted(ours.saved_params) == sorted(theirs.saved_params)
    for experience, importances in theirs.importances.items():
        for name, importance in importances.items():
            torch.testing.assert_close(ours.importances[experience][name].data, importance.data, rtol=1e-5, atol=1e-8)
    # the comparison is not of two trajectories the penalty barely touched: without it, or in the other mode, the
    # weights end 1e-2 or more away (agreement above: 1e-6)
    other_mode = ("online", 0.5) if mode == "separate" else ("separate", None)
    for different in (ewc_trajectory(None), ewc_trajectory(EWCPlugin(strength, *other_mode))):
        gap = max(float((a - b).abs().max()) for a, b in zip(trained.parameters(), different.parameters()))
        assert gap > 1e-2


def test_penalty_is_zero_at_the_anchor_and_quadratic_in_the_step():
    model = mlp()
    saved = copy_params_dict(model)
    importances = {name: copy.deepcopy(p) for name, p in saved.items()}
    for imp in importances.values():
        imp.data = torch.rand_like(imp.data)
    assert float(ewc_penalty(model, merge_anchors([(saved, importances)])).detach()) == 0.0
    direction = [torch.randn_like(p) for p in model.parameters()]

    def penalty_after(step):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, d in zip(moved.parameters(), direction):
                p.add_(step * d)
        return float(ewc_penalty(moved, merge_anchors([(saved, importances)])).detach())

    expected = sum(float((imp.data * d.pow(2)).sum()) for imp, d in zip(importances.values(), direction))
    assert penalty_after(0.1) == pytest.approx(0.01 * expected, rel=1e-4)
    assert penalty_after(0.2) / penalty_after(0.1) == pytest.approx(4.0, rel=1e-4)


def test_penalty_of_several_anchors_equals_the_sum_of_their_penalties_in_value_and_gradient():
    """The merged quadratic against the textbook sum Σ_e Σ F_e (θ − θ*_e)², differentiated by autograd."""
    model = mlp()
    anchors = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        saved = {n: copy.deepcopy(p) for n, p in copy_params_dict(mlp(seed)).items()}
        importances = {n: copy.deepcopy(p) for n, p in saved.items()}
        for name, imp in importances.items():
            imp.data = torch.rand_like(imp.data) * (torch.rand_like(imp.data) > 0.3)  # some weights never matter
        anchors.append((saved, importances))
    del anchors[0][0]["2.bias"]  # a parameter the first experience did not have counts from the others only
    params = dict(model.named_parameters())
    textbook = sum((importances[n].data * (params[n] - saved[n].data).pow(2)).sum()
                   for saved, importances in anchors for n in saved)
    expected = torch.autograd.grad(textbook, list(params.values()))
    merged = ewc_penalty(model, merge_anchors(anchors))
    got = torch.autograd.grad(merged, list(params.values()))
    assert float(merged) == pytest.approx(float(textbook), rel=1e-5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_online_mode_accumulates_with_decay():
    plugin = MultiTaskEWCPlugin(1.0, mode="online", decay=0.5)
    model = mlp()
    first = {n: copy.deepcopy(p) for n, p in copy_params_dict(model).items()}
    second = {n: copy.deepcopy(p) for n, p in copy_params_dict(model).items()}
    for imp in first.values():
        imp.data = torch.full_like(imp.data, 2.0)
    for imp in second.values():
        imp.data = torch.full_like(imp.data, 1.0)
    plugin.update_importances(first, 0)
    plugin.update_importances(second, 1)
    for imp in plugin.importances[1].values():
        torch.testing.assert_close(imp.data, torch.full_like(imp.data, 0.5 * 2.0 + 1.0))
