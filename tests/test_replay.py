"""Replay: quotas and trimming, stored samples against the datasets, per-task routing of the replay loss,
class balance, determinism, byte count, a tiny run, and agreement with Avalanche's buffers and ReplayPlugin."""
import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from avalanche.benchmarks.scenarios import benchmark_from_datasets, with_task_labels
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.benchmarks.utils.data_attribute import TaskLabels
from avalanche.benchmarks.utils.flat_data import ConstantSequence
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from avalanche.training.storage_policy import ExperienceBalancedBuffer
from torch.utils.data import TensorDataset

from clmtl.data.shapes import make_shapes_dataset, shapes_task
from clmtl.data.transforms import train_augmentation
from clmtl.models.unified import UnifiedModel
from clmtl.strategies.replay import MultiTaskReplayPlugin, TaskBuffer, class_balanced_order
from clmtl.stream.experiences import build_stream, collate_for
from clmtl.stream.scenario import output_spaces
from clmtl.stream.tasks import CLASSIFICATION, DETECTION, KINDS, SEGMENTATION
from clmtl.training.losses import MultiTaskLoss
from clmtl.training.registry import available, build_plugins

SIZE = 64  # make_shapes_dataset's smallest image size
TASKS = [shapes_task(kind, name) for kind, name in zip(KINDS, ("seg", "det", "cls"))]


def shapes_stream(sizes=(12, 12, 12), hflip=0.0):
    sets = [make_shapes_dataset(t.kind, "train", n, SIZE, seed=0) for t, n in zip(TASKS, sizes)]
    train = [train_augmentation(ds, t.kind, hflip) for ds, t in zip(sets, TASKS)]
    return sets, build_stream(TASKS, train, sets)


def filled(buffer, stream, upto=3):
    for label in range(upto):
        buffer.add(stream.train_stream[label].dataset, label, label)
    return buffer


def stored_sizes(buffer):
    return {label: len(memory) for label, memory in buffer.tasks.items()}


@pytest.mark.parametrize("split, expected", [
    ("equal", [{0: 10}, {0: 5, 1: 5}, {0: 4, 1: 3, 2: 3}]),
    # sizes 12, 6, 9: 10*12/18 = 6.67 | 3.33 -> 7 | 3; then 4.44 | 2.22 | 3.33 -> 5 | 2 | 3
    ("proportional", [{0: 10}, {0: 7, 1: 3}, {0: 5, 1: 2, 2: 3}]),
])
def test_quotas_and_deterministic_trim_over_three_tasks(split, expected):
    _, stream = shapes_stream(sizes=(12, 6, 9))
    buffer = TaskBuffer(10, split=split)
    history = []
    for label, quotas in enumerate(expected):
        buffer.add(stream.train_stream[label].dataset, label, label)
        assert buffer.quotas() == quotas and stored_sizes(buffer) == quotas
        assert len(buffer) == sum(quotas.values()) <= 10
        history.append({t: list(m.indices) for t, m in buffer.tasks.items()})
    for before, after in zip(history, history[1:]):  # a trim keeps a prefix of what was stored
        for label, kept in after.items():
            if label in before:
                assert before[label][: len(kept)] == kept


def test_a_per_class_budget_grows_with_the_classes_seen_and_trims_no_task():
    image = torch.zeros(3, 4, 4)
    first = [(image, label) for label in (0, 0, 1, 1, 2, 2, 2)]  # 3 classes, 7 samples
    second = [(image, label) for label in (3, 3, 4)]  # 2 classes, 3 samples
    buffer = TaskBuffer(mem_size=1, selection="class_balanced", mem_per_class=2)
    buffer.add(first, 0, 0)
    assert buffer.quotas() == {0: 6} and stored_sizes(buffer) == {0: 6}
    assert Counter(buffer.tasks[0].targets) == {0: 2, 1: 2, 2: 2}
    buffer.add(second, 1, 0)
    assert buffer.quotas() == {0: 6, 1: 4} and stored_sizes(buffer) == {0: 6, 1: 3}  # at most its training set


def test_a_task_stores_at_most_its_training_set():
    _, stream = shapes_stream(sizes=(12, 6, 9))
    buffer = filled(TaskBuffer(40), stream, upto=2)
    assert buffer.quotas() == {0: 20, 1: 20} and stored_sizes(buffer) == {0: 12, 1: 6}


def test_stored_samples_are_the_datasets_own_for_every_kind():
    sets, stream = shapes_stream()
    buffer = filled(TaskBuffer(15), stream)
    for label, dataset in enumerate(sets):
        memory = buffer.tasks[label]
        assert memory.kind == TASKS[label].kind and len(memory) == 5
        for i, index in enumerate(memory.indices):
            image, target = memory[i]
            want_image, want_target = dataset[index]
            assert memory.images[i].dtype == torch.uint8
            assert (image - want_image).abs().max() <= 0.5 / 255 + 1e-6
            if memory.kind == CLASSIFICATION:
                assert type(target) is int and target == want_target
            elif memory.kind == SEGMENTATION:
                assert target.dtype == torch.long and torch.equal(target, want_target)
            else:
                assert torch.equal(target["boxes"], want_target["boxes"])
                assert torch.equal(target["labels"], want_target["labels"])


def test_images_are_rounded_to_the_nearest_uint8_level():
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    data = AvalancheDataset([TensorDataset(x, torch.zeros(6, dtype=torch.long))],
                            data_attributes=[TaskLabels(ConstantSequence(0, 6))])
    buffer = TaskBuffer(6)
    buffer.add(data, 0, 0)
    memory = buffer.tasks[0]
    for i, index in enumerate(memory.indices):
        assert torch.equal(memory.images[i], (x[index] * 255).round().to(torch.uint8))
        assert (memory[i][0] - x[index]).abs().max() <= 0.5 / 255 + 1e-6


def fake_strategy(model, images, label, criterion):
    return SimpleNamespace(model=model, _criterion=criterion, mb_x=images, device="cpu",
                           mb_task_id=torch.full((len(images),), label), loss=torch.tensor(1.0),
                           experience=SimpleNamespace(current_experience=label, task_label=label))


def test_the_replay_loss_is_each_old_task_through_its_own_head_and_loss():
    sets, stream = shapes_stream()
    torch.manual_seed(0)
    model = UnifiedModel(output_spaces(TASKS), image_size=SIZE).eval()  # eval: BN statistics fixed, outputs comparable
    criterion = MultiTaskLoss(model.anchor_layout)
    plugin = MultiTaskReplayPlugin(mem_size=6, ratio=2.0, weight=0.7)  # 2 x 4 = 8 -> 4 per task >= 3 stored
    for label in (0, 1):
        plugin.buffer.add(stream.train_stream[label].dataset, label, label)
    strategy = fake_strategy(model, torch.stack([sets[2][i][0] for i in range(4)]), 2, criterion)
    plugin.before_forward(strategy)
    plugin.before_backward(strategy)

    expected = []
    for label in (0, 1):  # every stored sample, through the head of the task it came from
        memory = plugin.buffer.tasks[label]
        x, y, _ = collate_for(memory.kind)([[*memory[i], label] for i in range(len(memory))])
        with torch.no_grad():
            expected.append(float(criterion(model(x, label), y)))
    assert strategy.loss.item() - 1.0 == pytest.approx(0.7 * sum(expected) / 2, rel=1e-5)
    assert plugin.replayed == {0: 3, 1: 3}
    strategy.loss.backward()  # the replay term is part of the graph
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


class RecordingModel(torch.nn.Module):
    """Records the task label and batch size of each call; its output is what the criterion gets."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x, task_label):
        self.calls.append((task_label, len(x)))
        return self.weight * x.mean()


def recorded_replay(plugin, batch_size, current=2):
    model = RecordingModel()
    kinds = []

    def criterion(output, target):
        kinds.append(DETECTION if isinstance(target, list) else
                     SEGMENTATION if target.ndim == 3 else CLASSIFICATION)
        return output

    images = torch.zeros(batch_size, 3, SIZE, SIZE)
    strategy = fake_strategy(model, images, current, criterion)
    plugin.before_forward(strategy)
    plugin.before_backward(strategy)
    return model.calls, kinds


@pytest.mark.parametrize("batch_size, ratio, cap, expected", [
    (16, 0.5, None, [(0, 4), (1, 4)]),  # ceil(0.5 * 16) = 8, 4 per old task
    (16, 0.5, 3, [(0, 3), (1, 3)]),  # capped
    (5, 0.5, None, [(0, 2), (1, 1)]),  # ceil(2.5) = 3: the remainder to the oldest task
    (1, 0.5, None, [(0, 1)]),  # one sample: task 1 gets none this step
])
def test_replay_batches_follow_ratio_split_and_cap_and_keep_their_task(batch_size, ratio, cap, expected):
    _, stream = shapes_stream()
    plugin = MultiTaskReplayPlugin(mem_size=24, ratio=ratio, per_task_cap=cap)
    filled(plugin.buffer, stream, upto=2)
    calls, kinds = recorded_replay(plugin, batch_size)
    assert calls == expected
    assert kinds == [TASKS[label].kind for label, _ in expected]


def test_the_task_being_trained_is_not_replayed():
    _, stream = shapes_stream()
    plugin = MultiTaskReplayPlugin(mem_size=24, ratio=1.0)
    filled(plugin.buffer, stream)
    calls, _ = recorded_replay(plugin, 8, current=1)
    assert [label for label, _ in calls] == [0, 2]


def test_class_balanced_keeps_classification_classes_balanced():
    sets, stream = shapes_stream(sizes=(12, 12, 20))  # 20 images cycle through 5 classes: 4 each
    dataset = stream.train_stream[2].dataset
    for quota in range(1, 21):
        buffer = TaskBuffer(quota, selection="class_balanced")
        buffer.add(dataset, 2, 2)
        counts = Counter(sets[2][i][1] for i in buffer.tasks[2].indices)
        per_class = [counts[c] for c in range(5)]
        assert sum(per_class) == quota and max(per_class) - min(per_class) <= 1, (quota, per_class)


def test_class_balanced_groups_detection_and_segmentation_by_the_rarest_class_present():
    boxes = [{"labels": torch.tensor(labels)} for labels in ([0, 1], [0], [0], [0, 2], [0], [])]
    # images with class 0: 5, class 1: 1, class 2: 1 -> groups {1: [0]}, {2: [3]}, {no class: [5]}, {0: [1, 2, 4]}
    for seed in range(5):
        order = class_balanced_order(boxes, DETECTION, torch.Generator().manual_seed(seed))
        assert sorted(order) == list(range(6))
        assert set(order[:3]) == {0, 3, 5} and order[3] in (1, 2, 4)
    maps = [torch.tensor([[0, 1], [255, 1]]), torch.tensor([[0, 1], [2, 2]]), torch.tensor([[1, 0], [0, 0]])]
    # class 1 is in 3 maps, class 2 in 1: map 1 belongs to group 2, the other two to group 1
    for seed in range(5):
        assert class_balanced_order(maps, SEGMENTATION, torch.Generator().manual_seed(seed))[0] == 1


def test_same_seed_same_memory_and_the_training_rng_is_untouched():
    _, stream = shapes_stream(hflip=0.5)  # augmentation inside the dataset draws from the global RNG

    def memory(seed, global_seed):
        torch.manual_seed(global_seed)
        buffer = filled(TaskBuffer(9, selection="class_balanced", seed=seed), stream)
        state = torch.get_rng_state()
        torch.manual_seed(global_seed)
        assert torch.equal(state, torch.get_rng_state())
        return buffer

    first, second, other = memory(0, 1), memory(0, 2), memory(1, 1)
    for label in range(3):
        a, b = first.tasks[label], second.tasks[label]
        assert a.indices == b.indices
        assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))
    assert any(first.tasks[t].indices != other.tasks[t].indices for t in range(3))


def test_replay_draws_are_seeded():
    _, stream = shapes_stream()
    batches = []
    for _ in range(2):
        plugin = MultiTaskReplayPlugin(mem_size=12, seed=3)
        filled(plugin.buffer, stream, upto=1)
        batches.append(torch.stack([sample[0] for sample in plugin.buffer.draw(0, 3, plugin.generator)]))
    assert torch.equal(batches[0], batches[1])


def test_memory_bytes_count_uint8_images_and_targets():
    sets, stream = shapes_stream()
    plugin = MultiTaskReplayPlugin(mem_size=15)
    filled(plugin.buffer, stream)
    expected = 0
    for label, dataset in enumerate(sets):
        for index in plugin.buffer.tasks[label].indices:
            expected += 3 * SIZE * SIZE  # uint8 image
            target = dataset[index][1]
            if TASKS[label].kind == SEGMENTATION:
                expected += SIZE * SIZE  # uint8 label map
            elif TASKS[label].kind == DETECTION:
                expected += len(target["labels"]) * (4 * 4 + 8)  # float32 box + int64 label
            else:
                expected += 8
    assert plugin.memory_bytes == plugin.buffer.nbytes == expected


@pytest.mark.parametrize("key, value, message", [
    ("mem_size", 0, "strategy.replay.mem_size: must be >= 1"),
    ("ratio", 0.0, "strategy.replay.ratio: must be > 0"),
    ("split", "balanced", "strategy.replay.split: must be one of equal, proportional"),
    ("selection", "herding", "strategy.replay.selection: must be one of reservoir, class_balanced"),
    ("weight", -1.0, "strategy.replay.weight: must be >= 0"),
    ("per_task_cap", 0, "strategy.replay.per_task_cap: must be >= 1"),
    ("per_task_cap", 1.5, "strategy.replay.per_task_cap: expected an integer, got number 1.5"),
    ("seed", -1, "strategy.replay.seed: must be >= 0"),
])
def test_bad_parameters_are_clear_errors(key, value, message):
    with pytest.raises(ValueError, match=message):
        build_plugins("replay", {"replay": {key: value}})


def test_defaults_and_registration():
    (plugin,) = build_plugins("replay")
    assert isinstance(plugin, MultiTaskReplayPlugin)
    assert (plugin.buffer.mem_size, plugin.ratio, plugin.buffer.split, plugin.buffer.selection, plugin.weight,
            plugin.per_task_cap) == (200, 0.5, "equal", "reservoir", 1.0, None)
    assert available()["replay"].acts_on == ("data", "loss")


def test_a_tiny_run_replays_the_old_tasks(tmp_path, monkeypatch):
    import clmtl.builders
    import clmtl.runner
    from clmtl.config import load_config
    from clmtl.training.registry import strategy_schemas

    built = []

    def capture(spec, params):
        built.extend(build_plugins(spec, params))
        return built

    monkeypatch.setattr(clmtl.builders, "build_plugins", capture)
    overrides = ["data.train_size=8", "data.val_size=4", "data.image_size=64", "train.epochs=1",
                 "train.batch_size=4", "output.overlays=0", "output.checkpoints=false", "train.threads=1",
                 "strategy.replay.mem_size=12"]
    config = load_config(None, overrides, strategies=strategy_schemas())
    clmtl.runner.run(config, "replay", tmp_path, baselines=False)
    (plugin,) = built
    assert stored_sizes(plugin.buffer) == {0: 4, 1: 4, 2: 4}
    # seg replayed while learning det (2 steps x 2) and cls (2 steps x 1); det while learning cls
    assert plugin.replayed == {0: 6, 1: 2}
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["strategy"] == "replay" and written["memory_bytes"] == plugin.memory_bytes
    assert written["strategy_stats"]["MultiTaskReplayPlugin"] == {"stored": {"0": 4, "1": 4, "2": 4},
                                                                  "replayed": {"0": 6, "1": 2}}


# --- against Avalanche, on a plain two-experience classification stream -------------------------------------

def tensor_experiences(count=2, n=12, seed=0):
    """Images whose values are multiples of 1/255, so uint8 storage is exact."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for label in range(count):
        x = torch.randint(0, 256, (n, 3, 4, 4), generator=g).float() / 255
        y = torch.randint(0, 3, (n,), generator=g)
        data.append(AvalancheDataset([TensorDataset(x, y)], data_attributes=[TaskLabels(ConstantSequence(label, n))]))
    return data


@pytest.mark.parametrize("mem_size", [5, 7, 13, 40])
def test_equal_quotas_match_avalanche_experience_balanced_buffer(mem_size):
    data = tensor_experiences(count=3)
    theirs = ExperienceBalancedBuffer(max_size=mem_size, adaptive_size=True)
    ours = TaskBuffer(mem_size)
    for label, dataset in enumerate(data):
        theirs.post_adapt(None, SimpleNamespace(dataset=dataset))
        ours.add(dataset, label, label)
        assert [len(g.buffer) for g in theirs.buffer_groups.values()] == list(stored_sizes(ours).values())


class SharedMLP(torch.nn.Module):
    """A plain classifier that accepts (and ignores) a task label, so both plugins can call it."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 3))

    def forward(self, x, task_label=None):
        return self.net(x)


def train_two_experiences(plugin, lr_second):
    data = tensor_experiences()
    stream = with_task_labels(benchmark_from_datasets(train=data, test=data)).train_stream
    torch.manual_seed(0)
    model = SharedMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    template = Naive(model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(), train_mb_size=4,
                     train_epochs=2, plugins=[plugin] if plugin else [], evaluator=EvaluationPlugin())
    template.train(stream[0], shuffle=False)
    optimizer.param_groups[0]["lr"] = lr_second
    template.train(stream[1], shuffle=False)
    return model


def test_replay_follows_avalanche_replay_plugin_trajectory():
    # Avalanche: mini-batches of b = 4 current + m = 12 memory samples (the whole memory), loss (b Lk + m Lt)/(b+m).
    # Ours: Lk + (m / b) Lt = (b + m)/b times that, so lr * b / (b + m) gives the same SGD steps.
    theirs = train_two_experiences(ReplayPlugin(mem_size=12, batch_size_mem=12), lr_second=0.1)
    ours = train_two_experiences(MultiTaskReplayPlugin(mem_size=12, ratio=3.0, weight=3.0), lr_second=0.1 * 4 / 16)
    naive = train_two_experiences(None, lr_second=0.1)
    for mine, reference in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(ours.parameters(), naive.parameters())) > 1e-3


def test_a_shared_heads_stored_samples_join_the_mini_batch_as_avalanche_concatenates_them():
    """Class scenario: both tasks use head 0, so the replayed samples are appended to the current batch (one forward
    pass, BatchNorm over old and new samples together) and nothing is replayed apart."""
    from clmtl.stream.benchmark import in_head_labels
    from clmtl.stream.scenario import plan_stream
    from clmtl.stream.tasks import TaskSpec

    tasks = plan_stream([TaskSpec("a", CLASSIFICATION, ("heart", "arrow")),
                         TaskSpec("b", CLASSIFICATION, ("semicircle", "frame"))], "class")
    sets = [in_head_labels(make_shapes_dataset(CLASSIFICATION, "train", 6, SIZE, 0, t.classes), t) for t in tasks]
    stream = build_stream(tasks, sets, sets)
    plugin = MultiTaskReplayPlugin(mem_size=4, ratio=1.0)
    plugin.buffer.add(stream.train_stream[0].dataset, 0, 0)
    current = [stream.train_stream[1].dataset[i] for i in range(3)]
    batch = stream.train_stream[1].dataset.collate_fn(current)
    strategy = SimpleNamespace(mbatch=list(batch), mb_x=batch[0], device="cpu", loss=torch.tensor(1.0),
                               experience=stream.train_stream[1])
    plugin.before_forward(strategy)
    images, labels, heads = strategy.mbatch
    assert len(images) == 3 + 3 and torch.equal(images[:3], batch[0]) and labels[:3].tolist() == [2, 3, 2]
    memory = plugin.buffer.tasks[0]
    stored = {(memory.images[i].float().div(255) * 255).round().sum().item(): memory.targets[i]
              for i in range(len(memory))}
    for image, label in zip(images[3:], labels[3:].tolist()):  # every replayed sample is a stored one, labels 0/1
        assert label in (0, 1) and stored[(image * 255).round().sum().item()] == label
    assert heads.tolist() == [0] * 6 and plugin.replayed == {0: 3}
    plugin.before_backward(strategy)
    assert float(strategy.loss) == 1.0  # nothing replayed apart
