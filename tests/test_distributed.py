"""Multi-process training with torchrun: shards, merged metrics, averaged gradients, one set of outputs."""
import csv
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import main as run_worker
from inprocess import clmtl_here

from clmtl.metrics.scores import CocoMAP, MeanIoU, Top1
from clmtl.training.distributed import shard_bounds

WORKER = Path(__file__).with_name("distributed_worker.py")
RUN = ["data.train_size=32", "data.val_size=15", "data.image_size=64", "train.epochs=4", "train.batch_size=8",
       "output.overlays=0", "train.threads=1", "data.hflip=0", "train.ema=0"]
# No augmentation draws random numbers (hflip 0, hue 0 by default) and weight averaging is off (its own multi-process
# step is checked below). Two whole runs do not train the same weights: each process normalises BatchNorm over its
# own half of the batch (CPU has no SyncBatchNorm), and Adam makes visibly different weights of that within a few
# steps. So instead of comparing their scores (near chance, within a loose tolerance), the worker trains from one
# checkpoint with BatchNorm frozen, where one and two processes must end with the same weights.
FLOAT_NOISE = 2e-5
"""Largest weight difference allowed between one and two processes after two epochs of Adam with frozen BatchNorm:
sums of the same gradients in another order differ by ~1e-7, which the steps carry (measured: 5e-7). Training moves
the weights by more than 1e-3, and splitting a batch wrongly by as much (not averaging gradients: ~1e-2)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            *args]


def run_ok(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("length,shards", [(15, 2), (16, 2), (7, 3), (1, 2), (0, 2)])
def test_shards_are_contiguous_cover_the_set_once_and_differ_by_at_most_one(length, shards):
    bounds = [shard_bounds(length, shard, shards) for shard in range(shards)]
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(shards - 1))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_merged_scores_of_two_halves_equal_the_scores_of_the_whole_set():
    torch.manual_seed(0)
    seg_out, seg_target = torch.randn(6, 4, 8, 8), torch.randint(0, 4, (6, 8, 8))
    cls_out, cls_target = torch.randn(9, 5), torch.randint(0, 5, (9,))
    boxes = torch.tensor([[2.0, 2, 20, 20], [30, 30, 60, 50]])
    targets = [{"boxes": boxes + i, "labels": torch.tensor([i % 3, 1])} for i in range(5)]
    predictions = [{"boxes": boxes + i + torch.tensor([1.0, 0, 3, 2]) * (i % 2), "scores": torch.tensor([0.9, 0.4]),
                    "labels": torch.tensor([i % 3, (i + 1) % 3])} for i in range(5)]

    for whole, halves, feed in [
        (MeanIoU(4), (MeanIoU(4), MeanIoU(4)), lambda s, sl: s.update(seg_out[sl], seg_target[sl])),
        (Top1(), (Top1(), Top1()), lambda s, sl: s.update(cls_out[sl], cls_target[sl])),
        (CocoMAP(), (CocoMAP(), CocoMAP()), lambda s, sl: s.update(predictions[sl], targets[sl])),
    ]:
        feed(whole, slice(None))
        first, second = halves
        second.first_image_id = 4  # the second process's slice starts at sample 3
        second.reset()
        feed(first, slice(0, 3))
        feed(second, slice(3, None))
        first.merge(second)
        assert first.result() == whole.result()
        assert 0 < next(iter(whole.result().values())) < 1  # a case where getting the merge wrong shows


def test_merging_detection_scores_of_the_same_images_is_refused():
    a, b = CocoMAP(), CocoMAP()  # both number their images from 1: shard offsets were not set
    for scorer in (a, b):
        scorer.update([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}],
                      [{"boxes": torch.tensor([[0.0, 0, 4, 4]]), "labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="both hold images"):
        a.merge(b)


CLASS_STREAM = ["scenario=class", "tasks=[{name: a, kind: cls, data: {classes: [heart, arrow]}}, "
                "{name: b, kind: cls, data: {classes: [semicircle, frame]}}]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """What the module's tests compare, with one torchrun start (tests/distributed_worker.py): ``clmtl run`` as one
    process (``one``) and as two (``two``); the worker from the one-process run's last checkpoint as one process
    (``worker_one.pt``) and as two (``worker_two.pt``); and as two from a class-scenario run's first checkpoint,
    training the experience whose head grows (``grown_two.pt``)."""
    root = tmp_path_factory.mktemp("distributed")
    first_task_only = ["train.epochs=1", *CLASS_STREAM]  # exp0.pt only gives the worker a model to grow
    for out, overrides in ((root / "one", RUN), (root / "grown", [*RUN, *first_task_only])):
        done = clmtl_here("run", "--no-baselines", "--out", out, *overrides)
        assert done.returncode == 0, done.stderr[-3000:]
    last = str(root / "one" / "checkpoints" / "last.pt")
    run_worker(last, str(root / "worker_one.pt"))
    plan = {"runs": [["--no-baselines", "--out", str(root / "two"), *RUN]],
            "workers": [[last, str(root / "worker_two.pt"), None],
                        [str(root / "grown" / "checkpoints" / "exp0.pt"), str(root / "grown_two.pt"), 1]]}
    (root / "plan.json").write_text(json.dumps(plan))
    run_ok(torchrun(str(WORKER), str(root / "plan.json")))
    return root


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # one worker trains the module's runs once
def test_two_processes_write_one_set_of_outputs(runs):
    one, two = runs / "one", runs / "two"
    results = json.loads((two / "results.json").read_text())
    assert results["processes"] == 2
    assert (two / "log.txt").read_text().count("== sequential training") == 1
    with open(one / "metrics.csv") as a, open(two / "metrics.csv") as b:
        assert len(list(csv.reader(b))) == len(list(csv.reader(a)))  # one logger, not one per process
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["exp0.pt", "exp1.pt", "exp2.pt", "last.pt"]


@pytest.fixture(scope="module")
def worker(runs):
    """The one-process run's last checkpoint, and what tests/distributed_worker.py wrote from it as one process and
    as two."""
    checkpoint = runs / "one" / "checkpoints" / "last.pt"
    return checkpoint, *(torch.load(runs / name, weights_only=True) for name in ("worker_one.pt", "worker_two.pt"))


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # one worker trains the module's runs once
def test_two_processes_train_the_weights_of_one_process_when_batchnorm_is_frozen(worker):
    """Two epochs of the classification experience through the whole training loop (sharded global batches,
    averaged gradients, Adam, the warmup schedule): with BatchNorm on its running statistics, nothing depends on
    how a batch is split, so the two processes end as one model, with one process's weights."""
    checkpoint, one, two = worker
    start = torch.load(checkpoint, weights_only=True)["model"]
    (single,), (first, second) = one["frozen"], two["frozen"]
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name  # the same averaged gradients on both: one model
    for name, expected in single.items():
        torch.testing.assert_close(first[name], expected, rtol=0, atol=FLOAT_NOISE, msg=name)
        if "running_" in name:
            assert torch.equal(expected, start[name]), name  # frozen indeed
    moved = max(float((single[name] - start[name]).abs().max()) for name in single if "running_" not in name)
    assert moved > 50 * FLOAT_NOISE


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # one worker trains the module's runs once
def test_sharded_evaluation_and_averaged_gradients_equal_one_process(worker):
    _, one, two = worker
    assert one["processes"] == 1 and two["processes"] == 2
    assert two["scores"] == one["scores"]  # 15 images: shards of 8 and 7, merged into exactly one process's scores
    assert one["scores"][1]["mAP50"] > 0  # detection is really scored (image ids survive the merge)
    scale = max(g.abs().max() for g in one["gradients"].values())
    for name, gradient in two["gradients"].items():
        expected = one["gradients"].get(name, torch.zeros_like(gradient))  # unused parameters: zero gradient
        # float sums in another order: differences of ~1e-7 on gradients of ~1e-1
        torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=float(scale) * 1e-5)
    first, second = two["averaged"]  # each process averaged its own BatchNorm statistics; the end makes them one
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # one worker trains the module's runs once
def test_a_head_grown_under_torchrun_is_the_same_on_every_process(runs):
    """Class scenario: the classification head grows from 2 to 4 classes when the second task starts. Its new rows
    come from the model's own seeded generator, not from the global one (which each process's share of the
    augmentation moves differently; the worker sets it differently on each), so both processes grow the same rows
    and stay one model."""
    first, second = torch.load(runs / "grown_two.pt", weights_only=True)["averaged"]
    assert first["head.outputs.0.weight"].shape == (4, 64)
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
