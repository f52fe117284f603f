"""Heads that grow with the stream (class scenario): old rows kept bit for bit, new rows seeded, the optimizer and
per-parameter plugin state (EWC) following the grown parameters, predictions over every class seen so far."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch

from clmtl.models.unified import UnifiedModel
from clmtl.stream.scenario import output_spaces, plan_stream
from clmtl.stream.tasks import TaskSpec

SIZE = 64
SEG_A = TaskSpec("seg_a", "segmentation", ("background", "disk", "square"))
SEG_B = TaskSpec("seg_b", "segmentation", ("background", "triangle"))
DET_A = TaskSpec("det_a", "detection", ("cross", "star"))
DET_B = TaskSpec("det_b", "detection", ("hexagon", "crescent"))
CLS_A = TaskSpec("cls_a", "classification", ("0", "1"))
CLS_B = TaskSpec("cls_b", "classification", ("2", "3", "4"))
STREAM = plan_stream([SEG_A, DET_A, CLS_A, SEG_B, DET_B, CLS_B], "class")


def experience(task: TaskSpec):
    """What ``clmtl.stream.experiences`` gives an experience: its task label (head) and classes in head labels."""
    return SimpleNamespace(task_labels=[task.head], classes_in_this_experience=sorted(task.labels))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return UnifiedModel(output_spaces(STREAM), image_size=SIZE)


def test_heads_start_with_their_first_tasks_classes_and_grow_in_training_only(model):
    assert [model.num_classes(head) for head in range(3)] == [3, 2, 2]
    model.eval()
    model.adaptation(experience(STREAM[3]))  # evaluation never grows a head
    assert model.num_classes(0) == 3
    model.train()
    for task in STREAM[3:]:
        model.adaptation(experience(task))
    assert [model.num_classes(head) for head in range(3)] == [4, 4, 5]
    assert [tuple(model.head.rows(h).weight.shape) for h in range(3)] == [(4, 64), (3, 9, 64), (5, 64)]


def test_growing_keeps_every_trained_row_bit_for_bit(model):
    before = {name: value.clone() for name, value in model.state_dict().items()}
    model.train()
    for task in STREAM[3:]:
        model.adaptation(experience(task))
    after = model.state_dict()
    for name, old in before.items():
        index = tuple(slice(0, size) for size in old.shape)  # the old part sits first along every dimension
        assert torch.equal(after[name][index], old), name
    det_bias = after["head.outputs.1.bias"]
    assert torch.equal(det_bias[:, :5], before["head.outputs.1.bias"][:, :5])  # boxes and objectness untouched


def test_new_rows_are_seeded_by_the_model_not_by_when_they_grow():
    grown = []
    for draws_before in (0, 5):
        torch.manual_seed(0)
        model = UnifiedModel(output_spaces(STREAM), image_size=SIZE).train()
        torch.rand(draws_before)  # the global generator is elsewhere: the new rows must not depend on it
        state = torch.get_rng_state()
        model.adaptation(experience(STREAM[5]))
        assert torch.equal(torch.get_rng_state(), state)  # growing drew nothing from the global generator
        grown.append(model.head.rows(2).weight[2:].clone())
    assert torch.equal(grown[0], grown[1])
    bound = 1 / 64 ** 0.5  # a fresh linear layer's init range
    assert grown[0].abs().max() <= bound and grown[0].std() > bound / 4


def test_a_head_starts_the_same_whatever_other_heads_the_model_has():
    """Each head's initial rows come from its own generator: the first two tasks' model is the four-task model's
    start, shared layers and heads alike, and the global generator ends where it would without the extra heads."""
    tasks = plan_stream([SEG_A, DET_A, CLS_A, TaskSpec("seg_c", "segmentation", ("background", "disk"))], "task")
    models, states = [], []
    for count in (2, 4):
        torch.manual_seed(0)
        models.append(UnifiedModel(output_spaces(tasks[:count]), image_size=SIZE).state_dict())
        states.append(torch.get_rng_state())
    short, long = models
    assert set(short) < set(long) and all(torch.equal(short[name], long[name]) for name in short)
    assert torch.equal(states[0], states[1])
    assert not torch.equal(long["head.outputs.0.weight"], long["head.outputs.3.weight"])  # two heads, two draws
    detection = long["head.outputs.1.bias"]  # [anchors, 5 + classes]: objectness and classes at their priors
    assert torch.allclose(detection[:, 4], torch.full((3,), -4.59512), atol=1e-5)
    assert torch.allclose(detection[:, 5:], torch.full((3, 2), math.log(0.6 / (2 - 0.99))))


def test_a_grown_model_loads_into_a_fresh_one_and_an_old_state_into_a_grown_one(model):
    model.train()
    old_state = copy.deepcopy(model.state_dict())
    for task in STREAM[3:]:
        model.adaptation(experience(task))
    fresh = UnifiedModel(output_spaces(STREAM), image_size=SIZE)
    fresh.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    model.load_state_dict(old_state)  # what LwF's teacher does with a state saved before the head grew
    assert [model.num_classes(head) for head in range(3)] == [3, 2, 2]


def test_the_template_optimizes_the_grown_parameters():
    """Avalanche's optimizer update maps a grown parameter by name: the new tensor is optimized, not the old one."""
    from avalanche.training.templates import SupervisedTemplate  # noqa: F401  (imports Avalanche's template stack)

    from clmtl.builders import make_optimizer
    from clmtl.config import load_config
    from clmtl.data.shapes import make_shapes_dataset
    from clmtl.stream.experiences import build_stream
    from clmtl.training.losses import MultiTaskLoss
    from clmtl.training.template import MultiTaskTemplate

    tasks = plan_stream([TaskSpec("a", "classification", ("heart", "arrow")),
                         TaskSpec("b", "classification", ("semicircle", "frame"))], "class")
    sets = [make_shapes_dataset("classification", "train", 8, SIZE, 0, task.classes) for task in tasks]
    from clmtl.stream.benchmark import in_head_labels

    stream = build_stream(tasks, [in_head_labels(ds, t) for ds, t in zip(sets, tasks)],
                          [in_head_labels(ds, t) for ds, t in zip(sets, tasks)])
    torch.manual_seed(0)
    model = UnifiedModel(output_spaces(tasks), image_size=SIZE)
    config = load_config(None, [])
    template = MultiTaskTemplate(model=model, optimizer=make_optimizer(config, model),
                                 criterion=MultiTaskLoss(model.anchor_layout), train_mb_size=4, train_epochs=1,
                                 device="cpu", evaluator=None)
    template.train(stream.train_stream[0])
    template.train(stream.train_stream[1])
    weight = model.head.rows(0).weight
    assert weight.shape == (4, 64)
    optimized = [p for group in template.optimizer.param_groups for p in group["params"]]
    assert any(p is weight for p in optimized) and [g["name"] for g in template.optimizer.param_groups if any(
        p is weight for p in g["params"])] == ["head"]
    assert template.optimizer.state[weight]["step"] > 0  # Adam stepped the grown tensor
    assert len(optimized) == len(list(model.parameters()))  # the tensor it replaced is gone from the optimizer


def test_ewc_penalty_on_grown_parameters_equals_avalanches(model):
    """Old rows keep their anchor, new rows have none: Avalanche's EWCPlugin pads θ* and F with zeros
    (``ParamData.expand``); ours must compute the same penalty and gradient."""
    from avalanche.training.plugins import EWCPlugin
    from avalanche.training.utils import copy_params_dict
    from clmtl.strategies.ewc import MultiTaskEWCPlugin

    theirs, ours = EWCPlugin(100.0), MultiTaskEWCPlugin(100.0)
    generator = torch.Generator().manual_seed(1)
    saved = copy_params_dict(model)
    importances = copy_params_dict(model)
    for param in importances.values():
        param.data = torch.rand(param.shape, generator=generator)
    for plugin in (theirs, ours):
        plugin.saved_params[0], plugin.importances[0] = saved, importances
    model.train()
    for task in STREAM[3:]:
        model.adaptation(experience(task))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01)

    penalties, grads = [], []
    for plugin in (theirs, ours):
        model.zero_grad()
        strategy = SimpleNamespace(clock=SimpleNamespace(train_exp_counter=1), model=model, device="cpu",
                                   loss=torch.zeros(()))
        plugin.before_backward(strategy)
        strategy.loss.backward()
        penalties.append(float(strategy.loss))
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert penalties[1] == pytest.approx(penalties[0], rel=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-9)
    new_rows = grads[1]["head.outputs.2.weight"][2:]
    assert torch.count_nonzero(new_rows) == 0  # the classes added after the anchor have none


def test_class_scenario_predicts_over_every_class_seen_so_far(model):
    """An image of an old task is classified over old and new classes; with the old rows removed its accuracy falls
    to what argmax over the new rows alone gives: none of its labels can be predicted any more."""
    model.train()
    model.adaptation(experience(STREAM[5]))  # classification head: classes 0-1 (cls_a) + 2-4 (cls_b)
    model.eval()
    x = torch.rand(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(x, 2)
    assert logits.shape == (16, 5)
    old_labels = torch.tensor([0, 1] * 8)
    with torch.no_grad():
        rows = model.head.rows(2)
        rows.weight[:2] = 0
        rows.bias[:2] = -1e4  # the old classes can never win
        removed = model(x, 2)
    assert removed.argmax(1).ge(2).all()
    expected = (logits[:, 2:].argmax(1) + 2 == old_labels).float().mean()  # argmax over the new rows alone
    assert (removed.argmax(1) == old_labels).float().mean() == expected == 0
