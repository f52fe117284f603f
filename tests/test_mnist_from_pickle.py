"""benchmarks/mnist_from_pickle.py: the classic mnist.pkl.gz becomes torchvision's MNIST files, pixel for pixel."""
import gzip
import pickle

import numpy as np
import torchvision
from benchmark_scripts import load_benchmark


def write_pickle(path, parts):
    with gzip.open(path, "wb") as handle:
        pickle.dump(parts, handle)


def part(rng, count):
    pixels = rng.integers(0, 256, (count, 784))
    return (pixels / 256).astype(np.float32), rng.integers(0, 10, count), pixels


def test_torchvision_reads_the_original_bytes_with_train_and_validation_joined(tmp_path):
    rng = np.random.default_rng(0)
    (train, train_labels, train_bytes), (val, val_labels, val_bytes), (test, test_labels, test_bytes) = (
        part(rng, n) for n in (5, 3, 4))
    write_pickle(tmp_path / "mnist.pkl.gz", ((train, train_labels), (val, val_labels), (test, test_labels)))
    script = load_benchmark("mnist_from_pickle")
    assert script.main([str(tmp_path / "mnist.pkl.gz"), str(tmp_path / "root")]) == 0
    loaded = torchvision.datasets.MNIST(tmp_path / "root", train=True)
    assert loaded.data.numpy().reshape(-1, 784).tolist() == np.concatenate([train_bytes, val_bytes]).tolist()
    assert loaded.targets.tolist() == [*train_labels.tolist(), *val_labels.tolist()]
    held_out = torchvision.datasets.MNIST(tmp_path / "root", train=False)
    assert held_out.data.numpy().reshape(-1, 784).tolist() == test_bytes.tolist()


def test_a_file_that_is_not_the_pickle_is_one_line_naming_it(tmp_path, capsys):
    script = load_benchmark("mnist_from_pickle")
    (tmp_path / "bad.pkl.gz").write_bytes(b"not gzip")
    assert script.main([str(tmp_path / "bad.pkl.gz"), str(tmp_path / "root")]) == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"mnist_from_pickle: {tmp_path / 'bad.pkl.gz'}: not a gzipped pickle")
    assert "\n" not in message
    write_pickle(tmp_path / "scaled.pkl.gz", ((np.full((1, 784), 0.3, np.float32), np.zeros(1)),) * 3)
    assert script.main([str(tmp_path / "scaled.pkl.gz"), str(tmp_path / "root")]) == 1
    assert "multiples of 1/256" in capsys.readouterr().err
