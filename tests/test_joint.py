"""joint: every training step adds each other task's batch through that task's own head and loss."""
from types import SimpleNamespace

import pytest
import torch

from clmtl.data.shapes import make_shapes_dataset, shapes_task
from clmtl.models.unified import UnifiedModel
from clmtl.stream.experiences import build_stream
from clmtl.stream.scenario import output_spaces
from clmtl.stream.tasks import KINDS
from clmtl.training.losses import MultiTaskLoss
from clmtl.training.registry import build_plugins, parse_strategy


class LabelRecorder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.labels = model, []

    def forward(self, x, task_label):
        self.labels.append(task_label)
        return self.model(x, task_label)


def test_each_step_adds_the_full_loss_of_every_other_task():
    tasks = [shapes_task(kind, kind[:3]) for kind in KINDS]
    sets = [make_shapes_dataset(t.kind, "train", 4, 64, seed=1) for t in tasks]
    stream = build_stream(tasks, sets, sets)
    torch.manual_seed(0)
    model = UnifiedModel(output_spaces(tasks), image_size=64).eval()  # eval: BN statistics do not move between forwards
    criterion = MultiTaskLoss(model.anchor_layout)
    (plugin,) = build_plugins("joint")
    plugin.bind_benchmark(SimpleNamespace(stream=stream, tasks=tasks, inherited=0))
    recorder = LabelRecorder(model)
    strategy = SimpleNamespace(model=recorder, _criterion=criterion, device="cpu", train_mb_size=4,
                               experience=stream.train_stream[1], loss=torch.zeros(()))

    plugin.before_training_exp(strategy)
    plugin.before_forward(strategy)
    plugin.before_backward(strategy)

    # a batch of 4 is the whole 4-sample task in some order; the losses are means, so the order does not matter
    expected = 0.0
    for label in (0, 2):
        data = stream.train_stream[label].dataset
        batch = data.collate_fn([data[i] for i in range(len(data))])
        expected += float(criterion(model(batch[0], label), batch[1]))
    assert recorder.labels == [0, 2]
    assert float(strategy.loss) == pytest.approx(expected, rel=1e-5)


def test_joint_without_the_stream_is_a_clear_error():
    (plugin,) = build_plugins("joint")
    with pytest.raises(RuntimeError, match="bind_benchmark"):
        plugin.before_training_exp(SimpleNamespace(experience=SimpleNamespace(current_experience=0), train_mb_size=2))


def test_joint_does_not_compose_with_another_data_strategy(isolated_registry):
    from clmtl.training.registry import register

    register("probe_other_data", acts_on=("data",))(lambda: None)
    with pytest.raises(ValueError, match="takes over the data"):
        parse_strategy("joint+probe_other_data")


def test_a_shared_heads_other_tasks_join_the_mini_batch():
    """Class scenario: both tasks use head 0, so the other task's batch is appended to the mini-batch (BatchNorm over
    both, as at evaluation) and nothing is added apart."""
    from clmtl.stream.benchmark import in_head_labels
    from clmtl.stream.scenario import plan_stream
    from clmtl.stream.tasks import TaskSpec

    tasks = plan_stream([TaskSpec("a", "classification", ("heart", "arrow")),
                         TaskSpec("b", "classification", ("semicircle", "frame"))], "class")
    sets = [in_head_labels(make_shapes_dataset("classification", "train", 4, 64, 1, t.classes), t) for t in tasks]
    stream = build_stream(tasks, sets, sets)
    (plugin,) = build_plugins("joint")
    plugin.bind_benchmark(SimpleNamespace(stream=stream, tasks=tasks, inherited=0))
    batch = stream.train_stream[1].dataset.collate_fn([stream.train_stream[1].dataset[i] for i in range(4)])
    strategy = SimpleNamespace(mbatch=list(batch), device="cpu", train_mb_size=4, loss=torch.zeros(()),
                               experience=stream.train_stream[1])
    plugin.before_training_exp(strategy)
    plugin.before_forward(strategy)
    images, labels, heads = strategy.mbatch
    assert len(images) == 8 and torch.equal(images[:4], batch[0])
    assert sorted(labels[4:].tolist()) == [0, 0, 1, 1] and heads.tolist() == [0] * 8  # task a, in head labels
    plugin.before_backward(strategy)
    assert float(strategy.loss) == 0.0
