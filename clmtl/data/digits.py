"""Real handwritten digits without a download: scikit-learn's bundled copy of the UCI optical digits (1,797 images of
8x8 pixels, 16 grey levels, about 180 per digit), written in formats clmtl reads.

- ``write_digit_folders(root)``: ``root/{train,val}/<digit>/<n>.png``, the ``folder`` format, every fourth image of
  each digit in ``val``;
- ``write_mnist_files(root, copies)``: MNIST's own idx files under ``root/MNIST/raw`` (the ``torchvision`` format,
  ``dataset: MNIST``): each digit enlarged to 20x20 in a 28x28 frame as MNIST centres its digits, written ``copies``
  times at seeded random shifts of up to 3 pixels, so a stream can be as large as Split MNIST's.

They stand in for MNIST where it cannot be downloaded; they are not MNIST (fewer writers, 8x8 originals).
``python -m clmtl.data.digits OUT`` writes both under ``OUT``.
"""
from __future__ import annotations

import argparse
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

VAL_EVERY = 4
"""Every fourth image of each digit goes to the validation split (about 45 per digit)."""

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def digit_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits as uint8 images ``[N, 8, 8]`` (0-255) and labels, split into train and val."""
    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    rank = np.zeros(len(labels), dtype=np.int64)  # position of each image among those of its digit
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        rank[members] = np.arange(len(members))
    val = rank % VAL_EVERY == VAL_EVERY - 1
    return {"train": (images[~val], labels[~val]), "val": (images[val], labels[val])}


def write_digit_folders(root: str | Path) -> Path:
    """``root/{train,val}/<digit>/<n>.png`` (8x8 greyscale PNGs)."""
    root = Path(root)
    for split, (images, labels) in digit_splits().items():
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png")
    return root


def mnist_like(images: np.ndarray, copies: int, seed: int) -> np.ndarray:
    """``copies`` 28x28 versions of each 8x8 image: enlarged to 20x20 (bilinear), placed at the centre of a 28x28
    frame shifted by up to 3 pixels each way, the shifts drawn from ``seed``."""
    large = F.interpolate(torch.from_numpy(images).float()[:, None], size=(20, 20), mode="bilinear",
                          align_corners=False)[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    rng = np.random.default_rng(seed)
    frames = np.zeros((copies, len(images), 28, 28), dtype=np.uint8)
    for copy in range(copies):
        for index, digit in enumerate(large):
            dy, dx = rng.integers(-3, 4, size=2)
            frames[copy, index, 4 + dy:24 + dy, 4 + dx:24 + dx] = digit
    return frames.reshape(-1, 28, 28)


def write_mnist_files(root: str | Path, copies: int = 4, seed: int = 0) -> Path:
    """MNIST's four idx files under ``root/MNIST/raw``, ``copies`` shifted versions of every digit in each split."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in digit_splits().items():
        frames = mnist_like(images, copies, seed + (split == "val"))
        image_file, label_file = MNIST_FILES[split]
        (raw / image_file).write_bytes(struct.pack(">IIII", 2051, len(frames), 28, 28) + frames.tobytes())
        (raw / label_file).write_bytes(struct.pack(">II", 2049, len(frames))
                                       + np.tile(labels, copies).astype(np.uint8).tobytes())
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clmtl.data.digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write folders/ (class folders) and MNIST/raw/ into")
    parser.add_argument("--copies", type=int, default=4, help="shifted copies of each digit in the MNIST files")
    args = parser.parse_args(argv)
    write_digit_folders(args.out / "folders")
    write_mnist_files(args.out, args.copies)
    print(f"wrote {args.out / 'folders'} (format folder) and {args.out / 'MNIST' / 'raw'} (format torchvision, "
          "dataset MNIST)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
