"""Safe image loading and the decode-once cache every real-format loader shares.

A dataset is files written by someone else, so each file is checked before it is trusted: its path must stay
inside the dataset root (no ``../``, absolute path or symlink leading out), its declared size must stay under a
pixel limit (a decompression bomb is refused before decoding), and it is decoded in full (a truncated file fails
here, not halfway through training; PIL's ``LOAD_TRUNCATED_IMAGES`` is left False). Every such problem raises
``DataError`` naming the file.

Images are turned upright with their EXIF orientation and converted to RGB: alpha (RGBA, LA, PA, palette
transparency) is composited onto black, so transparent pixels read as black whatever colour the encoder stored
under them; 16-bit greyscale is scaled to 8 bits (PIL's own conversion would clip it).
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from clmtl.data.letterbox import Letterbox, Size, letterbox_image
from clmtl.errors import DataError
from clmtl.ultralytics_shim import pil_open

MAX_PIXELS = 40_000_000
"""Largest image (width x height) we decode; bigger is treated as a decompression bomb."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BAD_SAMPLE_POLICIES = ("error", "skip")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # "I": how older Pillow opens 16-bit PNGs


def check_class_names(wanted: Sequence[str], known: Sequence[str], source: str) -> None:
    """Refuse a class subset that is empty, repeats a name or names a class ``source`` lacks (one-line DataError)."""
    if not wanted:
        raise DataError(f"{source}: the class list is empty; name at least one class")
    repeated = sorted({name for name in wanted if list(wanted).count(name) > 1})
    if repeated:
        raise DataError(f"{source}: classes {repeated} are named twice")
    unknown = [name for name in wanted if name not in known]
    if unknown:
        shown = ", ".join(map(str, known[:30])) + (", ..." if len(known) > 30 else "")
        raise DataError(f"{source}: no class named {unknown}; its classes are {shown}")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def resolve_inside(path: str | Path, root: str | Path) -> Path:
    """``path`` (relative to ``root``, or absolute) resolved; refused unless it stays inside ``root``.

    Resolving first follows symlinks and ``..``, so a link inside the root that points outside is refused too.
    """
    root = Path(root).resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise DataError(f"{path}: path leads outside the dataset root {root}")
    return resolved


def open_image(path: str | Path, root: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image at ``path`` inside ``root``, fully decoded and turned upright (EXIF orientation), in its own mode."""
    file = resolve_inside(path, root)
    if not file.is_file():
        raise DataError(f"{file}: file not found")
    try:
        return _decode(file, max_pixels)
    except DataError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise DataError(f"{file}: exceeds PIL's pixel limit (decompression bomb?): {error}") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # what PIL raises on damaged files
        raise DataError(f"{file}: cannot decode image (corrupt or truncated?): {error}") from error


def _pil_open():
    """PIL's own ``Image.open``: importing ultralytics replaces it (``clmtl.ultralytics_shim``), and data loading
    need not import ultralytics when nothing else has."""
    if "ultralytics" in sys.modules:
        return pil_open()
    return Image.open


def _decode(file: Path, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns below 2x its own limit
        with _pil_open()(file) as image:  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise DataError(f"{file}: {width}x{height} pixels exceeds the limit of {max_pixels} "
                                "(decompression bomb?)")
            image.load()
            return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: alpha composited onto black, 16-bit grey scaled to 8 bits."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.round(np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path, root: str | Path, max_pixels: int = MAX_PIXELS) -> Tensor:
    """The image at ``path`` inside ``root`` as uint8 ``[3, H, W]`` RGB, upright."""
    array = np.asarray(to_rgb(open_image(path, root, max_pixels)))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class SampleMeta:
    """Where a sample came from and how to map model outputs back onto its file."""

    file: Path
    original_size: Size  # (h, w) after EXIF orientation
    image_id: int | None  # the annotation file's id (COCO), else None
    letterbox: Letterbox


def load_letterboxed(path: str | Path, root: str | Path, image_size: int,
                     image_id: int | None = None) -> tuple[Tensor, SampleMeta]:
    """A file decoded, letterboxed to uint8 ``[3, S, S]``, with its metadata."""
    image = load_rgb(path, root)
    canvas, box = letterbox_image(image, image_size)
    return canvas, SampleMeta(resolve_inside(path, root), tuple(image.shape[-2:]), image_id, box)


Loaded = tuple[Tensor, Any, SampleMeta]  # letterboxed uint8 image, target, metadata


def draw(available: int, wanted: int, seed: int, everything: bool = False) -> list[int]:
    """``wanted`` sample indices out of ``available``, by a permutation drawn from ``seed`` alone (the whole
    permutation with ``everything``, for callers that replace samples they cannot load by the next ones)."""
    if not 1 <= wanted <= available:
        raise DataError(f"subset of {wanted} requested, but the split has {available} samples")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed)).tolist()
    return order if everything else order[:wanted]


class CachedImageDataset(Dataset):
    """Samples decoded once at construction, letterboxed and cached as uint8 ``[N, 3, S, S]``; served as float.

    Subclasses list their samples in a fixed (sorted) order and say how to load one. ``subset`` draws that many
    samples with a seeded permutation of that order, so the draw depends on the seed only. A sample whose loading
    raises ``DataError`` stops construction (``on_bad_sample="error"``) or is dropped (``"skip"``, one warning
    for all of them); with ``subset`` a dropped sample is replaced by the next one of the permutation.
    """

    kind: str
    classes: tuple[str, ...]
    has_original_targets = False
    """Whether ``original_target(i)`` gives sample ``i``'s label map at its file's resolution (segmentation files)."""

    def __init__(self, source: str | Path, samples: Sequence[Any], load: Callable[[Any], Loaded],
                 on_bad_sample: str = "error", subset: int | None = None, seed: int = 0) -> None:
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
        if not samples:
            raise DataError(f"{source}: the split has no sample")
        order = list(range(len(samples)))
        if subset is not None:
            try:
                order = draw(len(samples), subset, seed, everything=True)
            except DataError as error:
                raise DataError(f"{source}: {error}") from None
        wanted = len(samples) if subset is None else subset
        loaded: dict[int, Loaded] = {}
        problems: list[str] = []
        for index in order:
            if len(loaded) == wanted:
                break
            try:
                loaded[index] = load(samples[index])
            except DataError as error:
                if on_bad_sample == "error":
                    raise
                problems.append(str(error))
        if problems:
            warnings.warn(f"{source}: skipped {len(problems)} bad sample(s): " + "; ".join(problems[:3])
                          + ("; ..." if len(problems) > 3 else ""), stacklevel=3)
        if not loaded:
            raise DataError(f"{source}: no usable sample in the split")
        kept = [loaded[index] for index in sorted(loaded)]
        self.sources = [samples[index] for index in sorted(loaded)]
        """What each kept sample was loaded from (an entry of ``samples``)."""
        self.images = torch.stack([image for image, _, _ in kept])
        self.targets = [target for _, target, _ in kept]
        self._metas = [meta for _, _, meta in kept]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Any]:
        return self.images[i].float().div_(255), self.target(i)

    def target(self, i: int) -> Any:
        """The target of sample ``i`` as served (subclasses may store it more compactly)."""
        return self.targets[i]

    def meta(self, i: int) -> SampleMeta:
        return self._metas[i]
