"""torchvision datasets read from tiny files written here in their real on-disk formats, through torchvision itself.

MNIST/FashionMNIST get the four big-endian idx files; CIFAR its pickles; SVHN its .mat files. CIFAR and SVHN check
md5 sums, so the tests put the sums of the files they wrote into the dataset class (torchvision's check still runs).
Expected pixels are computed here from the written arrays: a constant image stays that constant, and a gradient is
compared with ``torch.nn.functional.interpolate`` (bilinear, antialiased) rounded.
"""
import hashlib
import pickle
import struct

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as nnf
import torchvision.datasets as tvd

from clmtl.data.torchvision_sets import TORCHVISION_DATASETS, TorchvisionClassification, torchvision_classes
from clmtl.errors import DataError
from clmtl.stream.tasks import CLASSIFICATION

DIGITS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# --- writers --------------------------------------------------------------------------------------------------


def _write_idx(path, array: np.ndarray, magic: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", size) for size in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root, name="MNIST", train=None, test=None):
    """The four idx files under ``root/name/raw``; ``train``/``test`` are (uint8 [N, 28, 28], labels)."""
    raw = root / name / "raw"
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", np.asarray(images, dtype=np.uint8), 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.asarray(labels, dtype=np.uint8), 2049)
    return raw


def constant_digits(labels, values) -> tuple[np.ndarray, list[int]]:
    """One 28x28 image per label, image k filled with ``values[k]``."""
    return np.stack([np.full((28, 28), v, dtype=np.uint8) for v in values]), list(labels)


TRAIN_LABELS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
TRAIN_VALUES = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]  # identifies each sample after loading
TEST_LABELS = [7, 0, 3]
TEST_VALUES = [200, 210, 220]


@pytest.fixture
def mnist(tmp_path):
    write_mnist(tmp_path, train=constant_digits(TRAIN_LABELS, TRAIN_VALUES),
                test=constant_digits(TEST_LABELS, TEST_VALUES))
    return tmp_path


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _cifar_rows(images_chw: np.ndarray) -> np.ndarray:
    """CIFAR's row layout: 1024 red, then 1024 green, then 1024 blue bytes per image."""
    return images_chw.reshape(len(images_chw), 3 * 32 * 32)


def write_cifar10(root, monkeypatch, batches, test, names=CIFAR10_NAMES):
    """``batches``: five (uint8 [n, 3, 32, 32], labels); ``test`` one. The class's md5 list is set to these files."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    files = [(f"data_batch_{k + 1}", batch) for k, batch in enumerate(batches)] + [("test_batch", test)]
    for file, (images, labels) in files:
        with open(folder / file, "wb") as out:
            pickle.dump({"data": _cifar_rows(images), "labels": list(labels), "batch_label": file}, out)
    with open(folder / "batches.meta", "wb") as out:
        pickle.dump({"label_names": list(names), "num_cases_per_batch": 10}, out)
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f, _md5(folder / f)] for f, _ in files[:5]])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                              "md5": _md5(folder / "batches.meta")})
    return folder


def rgb_constant(n: int, first: int) -> np.ndarray:
    """n images [n, 3, 32, 32]: image k has red first+k, green first+k+100, blue first+k+150."""
    images = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for k in range(n):
        for c, offset in enumerate((0, 100, 150)):
            images[k, c] = first + k + offset
    return images


def write_svhn(root, monkeypatch, train, test):
    """``train``/``test``: (uint8 [n, 3, 32, 32], digit labels 0-9); written as SVHN does (X [32, 32, 3, n], 10 = 0)."""
    root.mkdir(parents=True, exist_ok=True)
    split_list = dict(tvd.SVHN.split_list)
    for split, (images, digits) in (("train", train), ("test", test)):
        file = root / f"{split}_32x32.mat"
        stored = np.array([10 if d == 0 else d for d in digits], dtype=np.uint8).reshape(-1, 1)
        scipy.io.savemat(file, {"X": np.transpose(images, (2, 3, 1, 0)), "y": stored})
        url, name, _ = split_list[split]
        split_list[split] = [url, name, _md5(file)]
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)


def _bilinear(image_chw: np.ndarray, size: int) -> torch.Tensor:
    """Reference resize: float bilinear with antialias, rounded, as uint8 [C, size, size]."""
    x = torch.from_numpy(image_chw.astype(np.float32))[None]
    return nnf.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                           antialias=True)[0].round().clamp(0, 255).to(torch.uint8)


# --- MNIST ----------------------------------------------------------------------------------------------------


def test_mnist_samples_keep_order_labels_and_pixels(mnist):
    data = TorchvisionClassification("MNIST", mnist, "train", 64)
    assert data.kind == CLASSIFICATION
    assert data.classes == DIGITS
    assert data.targets == TRAIN_LABELS and len(data) == 10
    assert data.images.dtype == torch.uint8 and data.images.shape == (10, 3, 64, 64)
    for k, value in enumerate(TRAIN_VALUES):
        image, label = data[k]
        assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
        assert type(label) is int and label == TRAIN_LABELS[k]
        assert torch.equal(data.images[k], torch.full((3, 64, 64), value, dtype=torch.uint8))  # grey -> 3 equal
        assert torch.allclose(image, torch.full((3, 64, 64), value / 255))


def test_mnist_val_reads_the_test_files(mnist):
    data = TorchvisionClassification("MNIST", mnist, "val", 64)
    assert data.targets == TEST_LABELS
    assert [int(data.images[k, 0, 0, 0]) for k in range(3)] == TEST_VALUES


def test_mnist_resize_is_bilinear_and_grey_becomes_three_equal_channels(tmp_path):
    gradient = np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1))  # varies along the width only
    blocks = np.kron(np.array([[0, 255], [128, 40]], dtype=np.uint8), np.ones((14, 14), dtype=np.uint8))
    write_mnist(tmp_path, train=(np.stack([gradient, blocks.T]), [0, 1]), test=(gradient[None], [0]))
    data = TorchvisionClassification("MNIST", tmp_path, "train", 96)
    for k, grey in enumerate([gradient, blocks.T]):
        expected = _bilinear(grey[None], 96)[0]
        for channel in range(3):
            assert torch.equal(data.images[k, channel], expected)
    assert not torch.equal(data.images[0, 0, :, 0], data.images[0, 0, 0, :])  # rows and columns not swapped


def test_class_subset_relabels_in_the_given_order(mnist):
    data = TorchvisionClassification("MNIST", mnist, "train", 64, classes=["3", "1"])
    assert data.classes == ("3", "1")
    kept = [k for k, digit in enumerate(TRAIN_LABELS) if digit in (3, 1)]  # dataset order: 3, 1, 1, 3
    assert [int(data.images[i, 0, 0, 0]) for i in range(len(data))] == [TRAIN_VALUES[k] for k in kept]
    assert data.targets == [{3: 0, 1: 1}[TRAIN_LABELS[k]] for k in kept] == [0, 1, 1, 0]


@pytest.mark.parametrize("seed", [0, 7])
def test_seeded_subset_keeps_the_drawn_samples_in_dataset_order(mnist, seed):
    data = TorchvisionClassification("MNIST", mnist, "train", 64, subset=4, seed=seed)
    drawn = sorted(torch.randperm(10, generator=torch.Generator().manual_seed(seed))[:4].tolist())
    assert [int(data.images[i, 0, 0, 0]) for i in range(4)] == [TRAIN_VALUES[k] for k in drawn]
    assert data.targets == [TRAIN_LABELS[k] for k in drawn]


def test_subset_is_drawn_after_class_selection(mnist):
    data = TorchvisionClassification("MNIST", mnist, "train", 64, classes=["5", "3", "1"], subset=3, seed=3)
    pool = [k for k, digit in enumerate(TRAIN_LABELS) if digit in (5, 3, 1)]
    drawn = sorted(torch.randperm(len(pool), generator=torch.Generator().manual_seed(3))[:3].tolist())
    assert [int(data.images[i, 0, 0, 0]) for i in range(3)] == [TRAIN_VALUES[pool[j]] for j in drawn]
    assert data.targets == [{5: 0, 3: 1, 1: 2}[TRAIN_LABELS[pool[j]]] for j in drawn]


def test_subset_larger_than_the_split(mnist):
    with pytest.raises(DataError, match=r"subset of 11 requested, but the split has 10 samples") as error:
        TorchvisionClassification("MNIST", mnist, "train", 64, subset=11)
    assert str(mnist) in str(error.value)
    with pytest.raises(DataError, match=r"subset of 5 requested, but the split has 4 samples of classes"):
        TorchvisionClassification("MNIST", mnist, "train", 64, classes=["3", "1"], subset=5)
    with pytest.raises(DataError, match="subset of 0"):
        TorchvisionClassification("MNIST", mnist, "train", 64, subset=0)


def test_unknown_duplicate_or_no_classes(mnist):
    with pytest.raises(DataError, match=r"MNIST has no class named \['three', 3\]; its classes are \['0', '1'") as e:
        TorchvisionClassification("MNIST", mnist, "train", 64, classes=["1", "three", 3])
    assert str(mnist) in str(e.value) and "\n" not in str(e.value)
    for bad in (["1", "1"], []):
        with pytest.raises(DataError, match="classes must be distinct names"):
            TorchvisionClassification("MNIST", mnist, "train", 64, classes=bad)
    with pytest.raises(DataError, match="list of names"):
        TorchvisionClassification("MNIST", mnist, "train", 64, classes="31")


def test_unknown_dataset_name(tmp_path):
    for call in (lambda: TorchvisionClassification("KMNIST", tmp_path, "train", 64),
                 lambda: torchvision_classes("cifar10", tmp_path)):
        with pytest.raises(DataError, match="unknown torchvision dataset .*supported: MNIST, FashionMNIST, CIFAR10, "
                                            "CIFAR100, SVHN") as error:
            call()
        assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("name, folder, first_file", [
    ("MNIST", "MNIST/raw", "train-images-idx3-ubyte"),
    ("FashionMNIST", "FashionMNIST/raw", "train-images-idx3-ubyte"),
    ("CIFAR10", "cifar-10-batches-py", "data_batch_1"),
    ("CIFAR100", "cifar-100-python", "train"),
    ("SVHN", "", "test_32x32.mat"),
])
def test_missing_files_name_the_folder_torchvision_looked_in(tmp_path, name, folder, first_file):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as error:
        TorchvisionClassification(name, root, "val", 64)
    message = str(error.value)
    assert message.startswith(f"{(root / folder) if folder else root}: {name} files missing: {first_file}")
    assert "downloading is off (download: true fetches them)" in message and "\n" not in message


def test_a_missing_file_is_named_even_when_the_split_does_not_use_it(mnist):
    (mnist / "MNIST" / "raw" / "train-labels-idx1-ubyte").unlink()  # torchvision wants all four for either split
    with pytest.raises(DataError, match=r"MNIST/raw: MNIST files missing: train-labels-idx1-ubyte;"):
        TorchvisionClassification("MNIST", mnist, "val", 64)


@pytest.mark.parametrize("damage", ["truncate", "magic", "empty"])
def test_corrupt_mnist_file_is_one_data_error_line(mnist, damage):
    file = mnist / "MNIST" / "raw" / "train-images-idx3-ubyte"
    data = file.read_bytes()
    file.write_bytes({"truncate": data[:1000], "magic": struct.pack(">I", 2052) + data[4:], "empty": b""}[damage])
    with pytest.raises(DataError) as error:
        TorchvisionClassification("MNIST", mnist, "train", 64)
    message = str(error.value)
    assert message.startswith(f"{mnist / 'MNIST' / 'raw'}: MNIST files corrupt or unreadable (")
    assert "download: true" in message and "\n" not in message


def test_labels_outside_the_classes_or_counts_that_differ(tmp_path):
    write_mnist(tmp_path, train=constant_digits([1, 12], [5, 6]), test=constant_digits([1], [5]))
    with pytest.raises(DataError, match=r"labels outside 0\.\.9 \(found 1\.\.12\)"):
        TorchvisionClassification("MNIST", tmp_path, "train", 64)
    write_mnist(tmp_path, train=(constant_digits([1, 2], [5, 6])[0], [1, 2, 3]), test=constant_digits([1], [5]))
    with pytest.raises(DataError, match="2 images but 3 labels"):
        TorchvisionClassification("MNIST", tmp_path, "train", 64)


def test_mnist_at_its_own_size_in_grey_is_the_raw_pixels(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    write_mnist(tmp_path, train=(pixels, [0, 1, 2, 3]), test=(pixels[:1], [0]))
    grey = TorchvisionClassification("MNIST", tmp_path, "train", 28, channels=1)
    assert grey.images.shape == (4, 1, 28, 28)
    assert torch.equal(grey.images[:, 0], torch.from_numpy(pixels))  # no resize, no interpolation
    assert torch.equal(grey[2][0], torch.from_numpy(pixels[2]).float().div(255)[None])
    rgb = TorchvisionClassification("MNIST", tmp_path, "train", 32, channels=3)
    assert rgb.images.shape == (4, 3, 32, 32) and torch.equal(rgb.images[:, 0], rgb.images[:, 2])


def test_colour_images_made_grey_are_their_luminance(tmp_path, monkeypatch):
    images = np.random.default_rng(1).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    write_cifar10(tmp_path, monkeypatch, [(images, [0, 1])] * 5, (images, [0, 1]))
    grey = TorchvisionClassification("CIFAR10", tmp_path, "val", 32, channels=1)
    expected = (0.2989 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])  # ITU-R 601-2, as PIL
    assert grey.images.shape == (2, 1, 32, 32)
    assert np.abs(grey.images[:, 0].numpy().astype(float) - expected).max() <= 1.0


@pytest.mark.parametrize("size, channels", [(0, 1), (28, 2)])
def test_a_size_below_1_or_channels_other_than_1_or_3_are_refused(mnist, size, channels):
    with pytest.raises(ValueError, match="channels 1 or 3"):
        TorchvisionClassification("MNIST", mnist, "train", size, channels=channels)


def test_split_must_be_train_or_val(mnist):
    with pytest.raises(ValueError, match="split must be one of"):
        TorchvisionClassification("MNIST", mnist, "test", 64)


# --- FashionMNIST ---------------------------------------------------------------------------------------------


def test_fashion_mnist_names_and_selection(tmp_path):
    write_mnist(tmp_path, "FashionMNIST", train=constant_digits([8, 1, 0, 8], [1, 2, 3, 4]),
                test=constant_digits([1], [9]))
    assert torchvision_classes("FashionMNIST", tmp_path) == FASHION
    data = TorchvisionClassification("FashionMNIST", tmp_path, "train", 64, classes=["Bag", "Trouser"])
    assert data.classes == ("Bag", "Trouser")
    assert data.targets == [0, 1, 0]
    assert [int(data.images[i, 2, 5, 5]) for i in range(3)] == [1, 2, 4]
    val = TorchvisionClassification("FashionMNIST", tmp_path, "val", 64)
    assert val.classes == FASHION and val.targets == [1] and int(val.images[0].min()) == 9


# --- CIFAR ----------------------------------------------------------------------------------------------------


def _cifar10_files(tmp_path, monkeypatch):
    batches = [(rgb_constant(2, 10 * k), [k, 9 - k]) for k in range(5)]  # batch k: labels k, 9-k
    test_images = rgb_constant(2, 90)
    test_images[1] = np.arange(32, dtype=np.uint8)[:, None] * 7  # varies along the height only
    test_images[1, 1] += 3
    return write_cifar10(tmp_path, monkeypatch, batches, (test_images, [4, 2])), batches, test_images


def test_cifar10_names_labels_channel_order_and_resize(tmp_path, monkeypatch):
    _, batches, test_images = _cifar10_files(tmp_path, monkeypatch)
    train = TorchvisionClassification("CIFAR10", tmp_path, "train", 64)
    assert train.classes == tuple(CIFAR10_NAMES)
    assert train.targets == [label for _, labels in batches for label in labels]
    first = 10 * 3 + 1  # batch 4 (data_batch_4), second image: red 31
    assert train.images[7, :, 20, 20].tolist() == [first, first + 100, first + 150]  # red, green, blue
    val = TorchvisionClassification("CIFAR10", tmp_path, "val", 64, classes=["bird", "deer"])
    assert val.classes == ("bird", "deer") and val.targets == [1, 0]  # test_batch labels 4 (deer), 2 (bird)
    assert val.images[0, :, 0, 0].tolist() == [90, 190, 240]
    assert torch.equal(val.images[1], _bilinear(test_images[1], 64))
    assert not torch.equal(val.images[1, 0, 0, :], val.images[1, 0, :, 0])  # height and width not swapped


def test_cifar_classes_read_only_the_meta_file(tmp_path, monkeypatch):
    folder, _, _ = _cifar10_files(tmp_path, monkeypatch)
    for k in range(1, 6):
        (folder / f"data_batch_{k}").unlink()
    assert torchvision_classes("CIFAR10", tmp_path) == tuple(CIFAR10_NAMES)
    (folder / "batches.meta").unlink()
    with pytest.raises(DataError, match=r"cifar-10-batches-py: CIFAR10 files missing: batches.meta; downloading"):
        torchvision_classes("CIFAR10", tmp_path)


def test_cifar_md5_mismatch_is_a_corrupt_file(tmp_path, monkeypatch):
    folder, _, _ = _cifar10_files(tmp_path, monkeypatch)
    data = bytearray((folder / "data_batch_3").read_bytes())
    data[-5] ^= 1
    (folder / "data_batch_3").write_bytes(bytes(data))
    with pytest.raises(DataError) as error:
        TorchvisionClassification("CIFAR10", tmp_path, "val", 64)  # torchvision checks every batch for either split
    message = str(error.value)
    assert message.startswith(f"{folder}: CIFAR10 files corrupt or unreadable (RuntimeError: Dataset not found or "
                              "corrupted.")
    assert "download: true" in message and "\n" not in message


def test_cifar100_fine_labels_and_names(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class{k:03d}" for k in range(100)]
    for file, images, labels in (("train", rgb_constant(3, 0), [99, 0, 42]), ("test", rgb_constant(1, 50), [7])):
        with open(folder / file, "wb") as out:
            pickle.dump({"data": _cifar_rows(images), "fine_labels": labels, "coarse_labels": [0] * len(labels)}, out)
    with open(folder / "meta", "wb") as out:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["c"] * 20}, out)
    monkeypatch.setattr(tvd.CIFAR100, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(tvd.CIFAR100, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setattr(tvd.CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names",
                                               "md5": _md5(folder / "meta")})
    assert torchvision_classes("CIFAR100", tmp_path) == tuple(names)
    data = TorchvisionClassification("CIFAR100", tmp_path, "train", 64, classes=["class042", "class099"])
    assert data.targets == [1, 0] and data.images[:, 0, 0, 0].tolist() == [0, 2]
    assert TorchvisionClassification("CIFAR100", tmp_path, "val", 64).targets == [7]


# --- SVHN -----------------------------------------------------------------------------------------------------


def test_svhn_digit_zero_layout_and_val_split(tmp_path, monkeypatch):
    train_images = rgb_constant(4, 1)
    train_images[3] = np.arange(32, dtype=np.uint8)[None, :] * 5  # varies along the width only
    write_svhn(tmp_path, monkeypatch, (train_images, [0, 7, 1, 0]), (rgb_constant(2, 60), [9, 0]))
    assert torchvision_classes("SVHN", tmp_path) == DIGITS
    train = TorchvisionClassification("SVHN", tmp_path, "train", 64)
    assert train.classes == DIGITS and train.targets == [0, 7, 1, 0]  # stored 10 reads as digit 0
    assert train.images[1, :, 30, 3].tolist() == [2, 102, 152]
    assert torch.equal(train.images[3], _bilinear(train_images[3], 64))
    assert not torch.equal(train.images[3, 0, 0, :], train.images[3, 0, :, 0])
    chosen = TorchvisionClassification("SVHN", tmp_path, "train", 64, classes=["0", "7"])
    assert chosen.targets == [0, 1, 0] and chosen.images[:, 0, 0, 0].tolist() == [1, 2, 0]
    val = TorchvisionClassification("SVHN", tmp_path, "val", 64)
    assert val.targets == [9, 0] and val.images[:, 0, 0, 0].tolist() == [60, 61]


def test_svhn_md5_mismatch(tmp_path, monkeypatch):
    write_svhn(tmp_path, monkeypatch, (rgb_constant(1, 0), [3]), (rgb_constant(1, 0), [3]))
    with open(tmp_path / "train_32x32.mat", "ab") as out:
        out.write(b"\0")
    with pytest.raises(DataError, match=rf"^{tmp_path}: SVHN files corrupt or unreadable \(RuntimeError"):
        TorchvisionClassification("SVHN", tmp_path, "train", 64)
    assert len(TorchvisionClassification("SVHN", tmp_path, "val", 64)) == 1  # the test file is still fine


# --- class lists ----------------------------------------------------------------------------------------------


def test_class_lists_without_reading_images(tmp_path):
    assert TORCHVISION_DATASETS == ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100", "SVHN")
    assert torchvision_classes("MNIST", tmp_path) == DIGITS
    assert torchvision_classes("SVHN", tmp_path) == DIGITS
    assert torchvision_classes("FashionMNIST", str(tmp_path)) == FASHION
