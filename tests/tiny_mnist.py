"""A tiny MNIST in torchvision's own file format, quick to learn: class ``c`` is a bright band of rows ``7c..7c+6``
over noise (four classes), so a small MLP learns it in a few iterations."""
from pathlib import Path

import numpy as np
from test_torchvision_sets import write_mnist


def banded_digits(per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    labels = np.tile(np.arange(4), per_class)
    images = rng.integers(0, 60, (len(labels), 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
        image[7 * label:7 * label + 7] = 255
    return images, labels.tolist()


def banded_mnist(root: Path, train_per_class: int, test_per_class: int) -> Path:
    """``root/MNIST/raw`` with the four idx files of banded digits (seed 0); returns ``root``."""
    rng = np.random.default_rng(0)
    write_mnist(root, train=banded_digits(train_per_class, rng), test=banded_digits(test_per_class, rng))
    return root


def ten_digit_mnist(root: Path, per_class: int) -> Path:
    """``root/MNIST/raw`` of banded digits relabelled to cover all ten digits (for protocols that deal 0-9), the same
    images for training and test; returns ``root``."""
    images, labels = banded_digits(per_class, np.random.default_rng(0))
    every_digit = (np.concatenate([images] * 3), [*labels, *[label + 4 for label in labels],
                                                   *[(label + 6) % 10 for label in labels]])
    write_mnist(root, train=every_digit, test=every_digit)
    return root
