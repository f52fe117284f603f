"""The stream: one experience per task, task labels 0..2, each batch in its own kind's format."""
import pytest
import torch

from clmtl.data.shapes import make_shapes_dataset, shapes_task
from clmtl.stream.experiences import build_stream
from clmtl.stream.tasks import TASK_KINDS
from clmtl.training.plugin import to_device


def small_stream(order=("seg", "det", "cls"), size=6):
    tasks = [shapes_task(TASK_KINDS[name], name) for name in order]
    train = [make_shapes_dataset(t.kind, "train", size, 64, seed=0) for t in tasks]
    test = [make_shapes_dataset(t.kind, "val", size // 2, 64, seed=0) for t in tasks]
    return tasks, build_stream(tasks, train, test)


@pytest.mark.parametrize("order", [("seg", "det", "cls"), ("cls", "seg", "det")])
def test_three_experiences_with_task_labels_and_kind_specific_batches(order):
    tasks, stream = small_stream(order)
    for name in ("train_stream", "test_stream"):
        experiences = list(getattr(stream, name))
        assert len(experiences) == 3
        assert [e.task_label for e in experiences] == [0, 1, 2]
    for label, experience in enumerate(stream.train_stream):
        dataset = experience.dataset
        x, y, t = dataset.collate_fn([dataset[i] for i in range(4)])
        assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
        assert t.tolist() == [label] * 4
        kind = tasks[label].kind
        if kind == "segmentation":
            assert y.shape == (4, 64, 64) and y.dtype == torch.int64
        elif kind == "classification":
            assert y.shape == (4,) and y.dtype == torch.int64
        else:
            assert isinstance(y, list) and len(y) == 4
            assert all(set(target) == {"boxes", "labels"} for target in y)


def test_to_device_moves_nested_targets_and_keeps_structure():
    batch = [torch.zeros(2), [{"boxes": torch.zeros(1, 4), "labels": torch.zeros(1)}], torch.ones(2)]
    moved = to_device(batch, "meta")
    assert moved[0].device.type == "meta"
    assert moved[1][0]["boxes"].device.type == "meta" and isinstance(moved[1], list)


def test_empty_dataset_is_a_clear_error():
    task = shapes_task("classification", "cls")
    with pytest.raises(ValueError, match="'cls': the dataset is empty"):
        empty = torch.utils.data.TensorDataset(torch.zeros(0))
        build_stream([task], [empty], [empty])
