"""Classification datasets torchvision knows (MNIST, FashionMNIST, CIFAR10, CIFAR100, SVHN), read from a local folder.

Files are read by torchvision's own dataset classes, so their formats and checks (CIFAR's and SVHN's md5 sums) are
torchvision's; this module only turns what they hold into clmtl's real-format classification samples: uint8
``[N, C, S, S]`` decoded once (``C`` = 3: grey made 3 identical channels; ``C`` = 1: colour made grey; resized
bilinear with antialias and rounded unless already ``S`` px), served as float in [0, 1], with labels in the task's own
order. Resizing works in batches on the raw arrays the torchvision dataset holds, not through its per-sample PIL
conversion, so 60,000 MNIST images load in seconds.

``root`` is what torchvision calls root, and each dataset keeps its own layout under it: ``MNIST/raw/`` and
``FashionMNIST/raw/`` (the four uncompressed idx files), ``cifar-10-batches-py/``, ``cifar-100-python/``, and SVHN's
``train_32x32.mat`` / ``test_32x32.mat`` directly in ``root``. Nothing is downloaded unless ``download=True``.
Whatever goes wrong while torchvision opens the files becomes one ``DataError`` line naming the folder it looked in.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchvision.datasets as tvd
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from clmtl.errors import DataError
from clmtl.stream.tasks import CLASSIFICATION

TORCHVISION_DATASETS: tuple[str, ...] = ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100", "SVHN")
SPLITS = ("train", "val")
DIGITS = tuple(str(digit) for digit in range(10))
"""Class names of MNIST and SVHN (torchvision's SVHN already labels digit 0 as 0, not 10)."""

_BATCH = 1024  # images resized at a time: bounds the float copy to a few tens of MB at any image_size


def _dataset_class(name: str, root: Path) -> type:
    if name not in TORCHVISION_DATASETS:
        raise DataError(f"{root}: unknown torchvision dataset {name!r} (supported: {', '.join(TORCHVISION_DATASETS)})")
    return getattr(tvd, name)


def torchvision_classes(name: str, root: str | Path, download: bool = False) -> tuple[str, ...]:
    """Every class name of the dataset, in its label order (cheap enough to call for a split's class list).

    Only CIFAR's names live in a file (its meta file, read and md5-checked by torchvision, without the image
    batches); the others' are fixed, so no file is read for them unless ``download`` asks to fetch the dataset.
    """
    root = Path(root).expanduser()
    cls = _dataset_class(name, root)
    if download:
        return _class_names(name, _open(name, root, "val", download=True))
    if name in ("CIFAR10", "CIFAR100"):
        meta = cls.__new__(cls)  # torchvision's own meta reader, without loading every image batch
        tvd.VisionDataset.__init__(meta, str(root))
        try:
            meta._load_meta()
        except Exception as error:  # whatever torchvision raises is a missing or damaged file
            folder = root / cls.base_folder
            raise DataError(_open_failure(name, folder, [cls.meta["filename"]], False, error)) from error
        return _class_names(name, meta)
    return _class_names(name, cls)


class TorchvisionClassification(Dataset):
    """Classification samples of one split of a torchvision dataset; ``targets[i]`` indexes ``classes``.

    ``split`` "val" is the dataset's test split. ``classes`` keeps only those classes, relabelled 0.. in the order
    given; ``subset`` then keeps that many samples, drawn with a permutation seeded by ``seed`` and kept in dataset
    order (the rule of ``CachedImageDataset``, so a subset depends on the seed only).
    """

    kind = CLASSIFICATION

    def __init__(self, name: str, root: str | Path, split: str, image_size: int,
                 classes: Sequence[str] | None = None, subset: int | None = None, seed: int = 0,
                 download: bool = False, channels: int = 3) -> None:
        self.root = Path(root).expanduser()
        self.name = name
        _dataset_class(name, self.root)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if image_size < 1 or channels not in (1, 3):
            raise ValueError(f"image_size must be >= 1 and channels 1 or 3, got {image_size} and {channels}")
        self.image_size = image_size
        source = f"{self.root} ({name} {split})"
        dataset = _open(name, self.root, split, download)
        everything = _class_names(name, dataset)
        pixels, labels = _raw_arrays(name, dataset, source)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(everything)):
            raise DataError(f"{source}: labels outside 0..{len(everything) - 1} "
                            f"(found {int(labels.min())}..{int(labels.max())})")
        self.classes, remap = _select_classes(name, everything, classes, self.root)
        new_labels = remap[labels]
        indices = torch.nonzero(new_labels >= 0).flatten()
        if len(indices) == 0:
            raise DataError(f"{source}: no sample of classes {list(self.classes)}")
        if subset is not None:
            if not 1 <= subset <= len(indices):
                raise DataError(f"{source}: subset of {subset} requested, but the split has {len(indices)} samples"
                                + ("" if classes is None else f" of classes {list(self.classes)}"))
            drawn = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:subset]
            indices = indices[drawn.sort().values]
        self.images = _resized(pixels, indices, image_size, channels)
        self.targets: list[int] = new_labels[indices].tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i].float().div_(255), self.targets[i]


def _open(name: str, root: Path, split: str, download: bool) -> Any:
    """torchvision's dataset object for the split; anything it raises becomes one ``DataError`` line."""
    cls = _dataset_class(name, root)
    try:
        if name == "SVHN":
            return cls(str(root), split="train" if split == "train" else "test", download=download)
        return cls(str(root), train=split == "train", download=download)
    except Exception as error:  # its parsers raise AssertionError, RuntimeError, pickle/scipy errors...
        raise DataError(_open_failure(name, *_expected_files(name, root, split), download, error)) from error


def _expected_files(name: str, root: Path, split: str) -> tuple[Path, list[str]]:
    """The folder torchvision looks in and the files it needs there for ``split``, from its class attributes."""
    cls = getattr(tvd, name)
    if name in ("MNIST", "FashionMNIST"):  # all four files, whichever the split
        return root / name / "raw", [os.path.splitext(file)[0] for file, _ in cls.resources]
    if name in ("CIFAR10", "CIFAR100"):  # every batch, whichever the split, and the meta file
        return root / cls.base_folder, [file for file, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return root, [cls.split_list["train" if split == "train" else "test"][1]]


def _open_failure(name: str, folder: Path, files: list[str], download: bool, error: Exception) -> str:
    """One line: the folder torchvision looked in, then the files missing there, else what torchvision said."""
    missing = [file for file in files if not (folder / file).is_file()]
    reason = " ".join(f"{type(error).__name__}: {error}".split())  # one line, whatever torchvision wrote
    if download:
        return f"{folder.absolute()}: cannot download or read {name} ({reason})"
    fetch = "downloading is off (download: true fetches them)"
    if missing:
        return f"{folder.absolute()}: {name} files missing: {', '.join(missing)}; {fetch}"
    return f"{folder.absolute()}: {name} files corrupt or unreadable ({reason}); {fetch}"


def _class_names(name: str, dataset: Any) -> tuple[str, ...]:
    """MNIST's torchvision names read "0 - zero" and SVHN has none, so both get the digit strings."""
    if name in ("MNIST", "SVHN"):
        return DIGITS
    return tuple(str(c) for c in dataset.classes)


def _select_classes(name: str, everything: tuple[str, ...], classes: Sequence[str] | None,
                    root: Path) -> tuple[tuple[str, ...], Tensor]:
    """(task classes, old label -> new label or -1) for the named classes in the given order, else all."""
    if classes is None:
        return everything, torch.arange(len(everything))
    if isinstance(classes, str):
        raise DataError(f"{root}: {name} classes must be a list of names, got the string {classes!r}")
    classes = tuple(classes)
    if not classes or len(set(classes)) != len(classes):
        raise DataError(f"{root}: {name} classes must be distinct names, got {list(classes)}")
    unknown = [c for c in classes if c not in everything]
    if unknown:
        raise DataError(f"{root}: {name} has no class named {unknown}; its classes are {list(everything)}")
    remap = torch.full((len(everything),), -1, dtype=torch.long)
    for new, c in enumerate(classes):
        remap[everything.index(c)] = new
    return classes, remap


def _raw_arrays(name: str, dataset: Any, source: str) -> tuple[Tensor, Tensor]:
    """(uint8 ``[N, C, H, W]`` view of the dataset's pixels, int64 labels ``[N]``), layouts checked."""
    if name in ("MNIST", "FashionMNIST"):  # torch uint8 [N, 28, 28]
        pixels, labels, layout = torch.as_tensor(dataset.data), torch.as_tensor(dataset.targets), "N, H, W"
        pixels = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels
    elif name in ("CIFAR10", "CIFAR100"):  # numpy uint8 [N, 32, 32, 3]
        pixels, labels, layout = torch.from_numpy(np.asarray(dataset.data)), torch.tensor(dataset.targets), "N, H, W, 3"
        pixels = pixels.permute(0, 3, 1, 2) if pixels.ndim == 4 and pixels.shape[-1] == 3 else pixels
    else:  # SVHN: numpy uint8 [N, 3, 32, 32]
        pixels, labels = torch.from_numpy(np.asarray(dataset.data)), torch.as_tensor(dataset.labels)
        layout = "N, 3, H, W"
    labels = labels.long().flatten()
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] not in (1, 3):
        raise DataError(f"{source}: torchvision gave pixels of {pixels.dtype} {tuple(pixels.shape)}, "
                        f"expected uint8 [{layout}]")
    if len(pixels) != len(labels):
        raise DataError(f"{source}: {len(pixels)} images but {len(labels)} labels")
    return pixels, labels


def _resized(pixels: Tensor, indices: Tensor, size: int, channels: int = 3) -> Tensor:
    """uint8 ``[len(indices), channels, size, size]``: the chosen images resized in batches (kept as they are at their
    own size), grey repeated to 3 channels or colour made grey."""
    out = torch.empty((len(indices), channels, size, size), dtype=torch.uint8)
    for start in range(0, len(indices), _BATCH):
        batch = pixels[indices[start:start + _BATCH]]
        if channels == 1 and batch.shape[1] == 3:
            batch = F.rgb_to_grayscale(batch)
        if tuple(batch.shape[-2:]) != (size, size):  # grey is resized once, then repeated
            batch = F.resize(batch.float(), [size, size], antialias=True).round_().clamp_(0, 255).to(torch.uint8)
        out[start:start + len(batch)] = batch.expand(-1, channels, -1, -1)
    return out
