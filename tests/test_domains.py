"""Domain-shift streams (``domains:`` and a task's ``transform:``): Permuted MNIST's pixel permutations and Rotated
MNIST's angles, checked against the raw pixels they come from."""
import numpy as np
import pytest
import torch
from test_torchvision_sets import write_mnist

import clmtl
from clmtl.data.domains import DomainShifted, pixel_permutation


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), [i % 10 for i in range(20)]
    write_mnist(root, train=train, test=(train[0][:10], train[1][:10]))
    return root


def domains_config(root, seed=0, **domains) -> dict:
    return {"domains": {"kind": "classification", **domains,
                        "data": {"format": "torchvision", "dataset": "MNIST", "root": str(root)}},
            "scenario": "domain", "seed": seed, "data": {"image_size": 28, "channels": 1, "hflip": 0.0},
            "model": {"backbone": "mlp", "hidden": [16]}}


def test_a_permutation_depends_on_the_seed_and_its_index_alone_and_the_first_is_the_identity():
    assert torch.equal(pixel_permutation(784, 3, 0), torch.arange(784))
    assert torch.equal(pixel_permutation(784, 3, 2), pixel_permutation(784, 3, 2))
    assert sorted(pixel_permutation(784, 3, 2).tolist()) == list(range(784))
    assert not torch.equal(pixel_permutation(784, 3, 1), pixel_permutation(784, 3, 2))
    assert not torch.equal(pixel_permutation(784, 3, 1), pixel_permutation(784, 4, 1))


def test_permuted_mnist_tasks_hold_the_raw_pixels_at_the_permuted_positions(mnist_root):
    benchmark = clmtl.build_benchmark(clmtl.load_config(domains_config(mnist_root, seed=5, permute=3)))
    assert [task.name for task in benchmark.tasks] == ["perm1", "perm2", "perm3"]
    assert [task.transform for task in benchmark.tasks] == [{"permute": i, "seed": 5} for i in range(3)]
    raw = [benchmark.stream.train_stream[0].dataset[i][0] for i in range(4)]  # task 1: the identity
    original = torch.from_numpy(np.frombuffer((mnist_root / "MNIST/raw/train-images-idx3-ubyte").read_bytes()[16:],
                                              np.uint8).reshape(-1, 28, 28)[:4].copy()).float() / 255
    assert torch.equal(torch.stack(raw)[:, 0], original)
    permutation = pixel_permutation(784, 5, 2)
    for i in range(4):
        shifted = benchmark.stream.train_stream[2].dataset[i][0]
        assert torch.equal(shifted.flatten(), raw[i].flatten()[permutation])
    val = benchmark.val_sets[2][0][0]  # validation images are shifted the same way
    assert torch.equal(val.flatten(), benchmark.val_sets[0][0][0].flatten()[permutation])
    again = clmtl.build_benchmark(clmtl.load_config(domains_config(mnist_root, seed=5, permute=3)))
    assert torch.equal(again.stream.train_stream[2].dataset[1][0], benchmark.stream.train_stream[2].dataset[1][0])


def test_rotated_tasks_turn_the_images_counter_clockwise(mnist_root):
    benchmark = clmtl.build_benchmark(clmtl.load_config(domains_config(mnist_root, rotate=[0, 90])))
    assert [task.name for task in benchmark.tasks] == ["rot0", "rot90"]
    assert benchmark.tasks[1].transform == {"rotate": 90.0}
    image = benchmark.stream.train_stream[0].dataset[3][0]
    turned = benchmark.stream.train_stream[1].dataset[3][0]
    assert torch.allclose(turned, torch.rot90(image, 1, dims=(1, 2)), atol=1e-6)


def test_a_task_entry_may_carry_its_own_transform_and_results_record_it(mnist_root, tmp_path):
    data = {"format": "torchvision", "dataset": "MNIST", "root": str(mnist_root), "classes": ["0", "1"]}
    config = {**domains_config(mnist_root), "domains": None, "scenario": "task",
              "tasks": [{"name": "plain", "kind": "classification", "data": data},
                        {"name": "shuffled", "kind": "classification", "data": data, "transform": {"permute": 7}}],
              "train": {"iterations": 2, "batch_size": 4, "warmup": 0, "ema": 0},
              "output": {"overlays": 0, "checkpoints": False}}
    results = clmtl.run(config, "naive", out=tmp_path)
    assert [task.get("transform") for task in results.tasks] == [None, {"permute": 7, "seed": 0}]


def test_a_domain_shift_wraps_any_image_dataset():
    images = [(torch.arange(12.0).view(1, 3, 4), 1)]
    shifted = DomainShifted(images, seed=0, permute=1)
    permutation = pixel_permutation(12, 0, 1)
    assert torch.equal(shifted[0][0].flatten(), torch.arange(12.0)[permutation]) and shifted.target(0) == 1
    with pytest.raises(ValueError, match="a permutation or a rotation"):
        DomainShifted(images, seed=0)


def test_the_mnist_example_streams_are_valid_configs():
    from pathlib import Path

    examples = Path(__file__).parents[1] / "examples" / "streams"
    permuted = clmtl.load_config(examples / "permuted_mnist.yaml")
    assert (permuted.domains.permute, permuted.scenario, permuted.model.hidden) == (10, "domain", [1000, 1000])
    split = clmtl.load_config(examples / "split_mnist_mlp.yaml")
    assert (split.split.experiences, split.model.backbone, split.train.iterations) == (5, "mlp", 2000)


def test_a_transform_of_a_segmentation_task_is_refused():
    config = clmtl.load_config({"tasks": [{"name": "s", "kind": "seg", "transform": {"rotate": 90}}],
                                "data": {"image_size": 64, "train_size": 4, "val_size": 2}})
    with pytest.raises(clmtl.config.ConfigError, match="transform applies to classification tasks"):
        clmtl.build_benchmark(config)
