"""Embedded synthetic benchmark: three shape tasks drawn from a seed, so a run needs no files and no download.

Each task has its own shapes (the class sets are disjoint) on textured backgrounds with pixel noise, random scale,
rotation and aspect, and colours whose hue follows the class only loosely, so a model must learn silhouettes:

- segmentation: 2-4 objects over background; 255 (void) on a 2-pixel band straddling every boundary between
  different classes, as VOC marks object borders.
- detection: 1-5 objects that may overlap; a box is the tight extent of the object's *visible* pixels (as COCO
  boxes are), in pixel-edge coordinates (pixel i spans [i, i+1)); objects with under 30 % of their area visible
  are left out of the targets.
- classification: one large object of the labelled class among small distractor shapes of the other tasks' kinds;
  splits cycle through the classes, so they are balanced.

Segmentation shapes take any rotation, detection shapes up to 45 degrees and classification shapes up to 15 degrees
off upright, which keeps a small model trained from scratch for a minute well above chance on every task.
Everything is numpy masks on coordinate grids: 240 + 60 images of 128 px per task, all three tasks, take ~1.3 s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from clmtl.stream.tasks import CLASSIFICATION, DETECTION, IGNORE_INDEX, KINDS, SEGMENTATION, TaskSpec

SHAPES_CLASSES: dict[str, tuple[str, ...]] = {
    SEGMENTATION: ("background", "disk", "square", "triangle", "ring"),
    DETECTION: ("cross", "star", "hexagon", "crescent"),
    CLASSIFICATION: ("heart", "arrow", "semicircle", "l_shape", "frame"),
}
SPLITS = ("train", "val")
MIN_VISIBLE_FRACTION = 0.3
"""A detection object more occluded than this is dropped from the targets."""

# Shapes live in an object frame (u, v) where the silhouette fits the unit disk; v points down as image rows do.
Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _regular(n: int, radius: float = 1.0, inner: float | None = None) -> np.ndarray:
    """Vertices of a regular polygon (or a star when ``inner`` is given), first vertex pointing up."""
    k = 2 * n if inner is not None else n
    angles = -np.pi / 2 + np.arange(k) * 2 * np.pi / k
    radii = np.full(k, radius) if inner is None else np.where(np.arange(k) % 2 == 0, radius, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _polygon(vertices: np.ndarray | list) -> Mask:
    """Even-odd point-in-polygon test, vectorised over pixels (one pass per edge)."""
    vertices = np.asarray(vertices, dtype=np.float64)
    edges = [(a, b) for a, b in zip(vertices, np.roll(vertices, -1, axis=0)) if a[1] != b[1]]

    def mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        inside = np.zeros(np.broadcast(u, v).shape, dtype=bool)
        for (x0, y0), (x1, y1) in edges:
            crosses = (y0 > v) != (y1 > v)
            inside ^= crosses & (u < x0 + (v - y0) * (x1 - x0) / (y1 - y0))
        return inside

    return mask


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = 1.15 * u, 0.15 - 1.15 * v
    return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


SHAPES: dict[str, Mask] = {
    "disk": lambda u, v: u * u + v * v <= 1,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) <= 0.72,
    "triangle": _polygon(_regular(3)),
    "ring": lambda u, v: (u * u + v * v <= 1) & (u * u + v * v >= 0.5**2),
    "cross": lambda u, v: ((abs(u) <= 0.3) & (abs(v) <= 0.95)) | ((abs(v) <= 0.3) & (abs(u) <= 0.95)),
    "star": _polygon(_regular(5, 1.0, inner=0.45)),
    "hexagon": _polygon(_regular(6)),
    "crescent": lambda u, v: (u * u + v * v <= 1) & ((u - 0.5) ** 2 + v * v > 0.85**2),
    "heart": _heart,
    "arrow": _polygon([(-0.95, -0.25), (0.1, -0.25), (0.1, -0.7), (0.95, 0), (0.1, 0.7), (0.1, 0.25), (-0.95, 0.25)]),
    "semicircle": lambda u, v: (u * u + (v - 0.4) ** 2 <= 1) & (v <= 0.4),
    "l_shape": _polygon([(-0.7, -0.9), (-0.2, -0.9), (-0.2, 0.4), (0.7, 0.4), (0.7, 0.9), (-0.7, 0.9)]),
    "frame": lambda u, v: (np.maximum(abs(u), abs(v)) <= 0.75) & (np.maximum(abs(u), abs(v)) >= 0.48),
}
DISTRACTORS = SHAPES_CLASSES[SEGMENTATION][1:] + SHAPES_CLASSES[DETECTION]
"""Clutter in classification images: shapes of the other tasks, never a classification class."""

# Per kind: number of objects (inclusive range) and object diameter as a fraction of the image side.
_COUNT = {SEGMENTATION: (2, 4), DETECTION: (1, 5), CLASSIFICATION: (1, 1)}
_DIAMETER = {SEGMENTATION: (0.14, 0.47), DETECTION: (0.16, 0.45), CLASSIFICATION: (0.3, 0.55)}
_ROTATION = {SEGMENTATION: np.pi, DETECTION: np.pi / 4, CLASSIFICATION: np.pi / 12}  # max |angle| off upright
_DISTRACTOR_COUNT, _DISTRACTOR_DIAMETER = (1, 4), (0.05, 0.1)
_MAX_BOX_IOU = 0.35  # placement retries keep boxes from piling up, yet still let them overlap
_HUE_SPREAD, _RANDOM_HUE_P = 0.6, 0.15  # hue = class hue +- spread/C, or any hue: colour is only a partial cue


@dataclass
class Scene:
    """One rendered sample plus what tests and previews need to check it against."""

    image: np.ndarray  # uint8 [S, S, 3]
    target: Any  # in the kind's format (see ShapesDataset)
    instances: np.ndarray  # int16 [S, S]: 0 = background or clutter, k = k-th labelled object (drawing order)
    instance_classes: np.ndarray  # int64 [K + 1]: class index of object k (entry 0 unused)
    areas: np.ndarray  # int64 [K + 1]: in-image area of object k before anything occluded it
    kept: np.ndarray  # int64: object id of each detection target row (visible enough); all objects for other kinds


def shapes_task(kind: str, name: str) -> TaskSpec:
    """The TaskSpec of one shapes task, so configs need not repeat its class names."""
    _check_kind(kind)
    return TaskSpec(name, kind, SHAPES_CLASSES[kind])


class ShapesDataset(torch.utils.data.Dataset):
    """Rendered shapes images held as uint8 (compact) and served as float in [0, 1].

    Targets: classification ``int``; segmentation ``LongTensor[S, S]`` with 255 = void; detection
    ``{"boxes": FloatTensor[N, 4] xyxy pixels, "labels": LongTensor[N]}``.
    """

    def __init__(self, kind: str, images: torch.Tensor, targets: list, classes: tuple[str, ...] | None = None) -> None:
        _check_kind(kind)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or len(images) != len(targets):
            raise ValueError("images must be uint8 [N, 3, S, S] with one target per image")
        self.kind = kind
        self.classes = classes or SHAPES_CLASSES[kind]
        self.image_size = images.shape[-1]
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        return self.images[i].float().div_(255), self.targets[i]


def make_shapes_dataset(kind: str, split: str, size: int, image_size: int = 128, seed: int = 0,
                        classes: tuple[str, ...] | None = None) -> ShapesDataset:
    """Render ``size`` samples of one task; the same arguments always give bit-identical data.

    ``classes`` (classification only) draws images of those classes alone, labelled in that order. Segmentation and
    detection images draw from all their kind's classes; ``clmtl.data.relabel`` picks a task's classes from them.
    """
    _check_kind(kind)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    if image_size < 64 or image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32 and at least 64, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if classes is not None and kind != CLASSIFICATION:
        raise ValueError("classes picks the classes of classification images only")
    drawn = [SHAPES_CLASSES[kind].index(name) for name in classes] if classes else range(len(SHAPES_CLASSES[kind]))
    labels = [drawn[i % len(drawn)] if kind == CLASSIFICATION else None for i in range(size)]
    scenes = [render_scene(kind, sample_rng(kind, split, seed, i), image_size, labels[i]) for i in range(size)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).contiguous()
    targets = [s.target for s in scenes]
    if classes:
        targets = [drawn.index(target) for target in targets]
    return ShapesDataset(kind, images, targets, tuple(classes) if classes else None)


def sample_rng(kind: str, split: str, seed: int, index: int) -> np.random.Generator:
    """One generator per sample, so a split is a prefix of any larger split with the same seed."""
    return np.random.default_rng([seed, KINDS.index(kind), SPLITS.index(split), index])


def render_scene(kind: str, rng: np.random.Generator, image_size: int, label: int | None = None) -> Scene:
    """Draw one sample of ``kind``: background, clutter (classification), then the labelled objects in order.

    ``label`` fixes the class of a classification image (datasets cycle through the classes so splits are balanced);
    other kinds ignore it.
    """
    s = image_size
    image = _background(rng, s)
    instances = np.zeros((s, s), dtype=np.int16)
    full_areas = [0]
    classes = [0]
    boxes: list[tuple[float, float, float, float]] = []
    if kind == CLASSIFICATION:
        for _ in range(rng.integers(_DISTRACTOR_COUNT[0], _DISTRACTOR_COUNT[1] + 1)):
            shape = DISTRACTORS[rng.integers(len(DISTRACTORS))]
            _draw(image, None, 0, shape, _place(rng, s, _DISTRACTOR_DIAMETER, np.pi, []), rng.random(), rng)
    names = SHAPES_CLASSES[kind][1:] if kind == SEGMENTATION else SHAPES_CLASSES[kind]
    for obj_id in range(1, rng.integers(_COUNT[kind][0], _COUNT[kind][1] + 1) + 1):
        obj_label = int(rng.integers(len(names))) if label is None or kind != CLASSIFICATION else label
        class_hue = (obj_label + rng.uniform(-1, 1) * _HUE_SPREAD) / len(names)
        hue = rng.random() if rng.random() < _RANDOM_HUE_P else class_hue
        placement = _place(rng, s, _DIAMETER[kind], _ROTATION[kind], boxes)
        full_areas.append(_draw(image, instances, obj_id, names[obj_label], placement, hue % 1.0, rng))
        classes.append(obj_label + 1 if kind == SEGMENTATION else obj_label)
    noise_std = np.float32(rng.uniform(0.02, 0.06) * np.sqrt(12))  # uniform noise: 4x cheaper than normal
    image += noise_std * (rng.random(image.shape, dtype=np.float32) - np.float32(0.5))
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    instance_classes = np.asarray(classes, dtype=np.int64)
    kept = np.arange(1, len(classes), dtype=np.int64)
    if kind == SEGMENTATION:
        target = torch.from_numpy(_void_borders(instance_classes[instances]))
    elif kind == CLASSIFICATION:
        target = int(instance_classes[1])
    else:
        visible = np.bincount(instances.ravel(), minlength=len(classes))
        kept = np.array([k for k in kept if visible[k] >= MIN_VISIBLE_FRACTION * full_areas[k]], dtype=np.int64)
        target_boxes = np.array([_tight_box(instances == k) for k in kept], dtype=np.float32).reshape(-1, 4)
        target = {"boxes": torch.from_numpy(target_boxes), "labels": torch.from_numpy(instance_classes[kept])}
    return Scene(image, target, instances, instance_classes, np.asarray(full_areas, dtype=np.int64), kept)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    """A dull, low-saturation texture: tinted base + low-frequency noise + gradient + optional stripes."""
    base = rng.uniform(0.3, 0.7) + rng.uniform(-0.12, 0.12, size=3)  # grey level with a faint tint
    grid = rng.integers(3, 7)
    coarse = rng.normal(0, 0.1, size=(1, grid, grid)) + rng.normal(0, 0.03, size=(3, grid, grid))
    interp = _linear_interp_matrix(grid, s)
    image = base + (interp @ coarse @ interp.T).transpose(1, 2, 0)
    coords = (np.arange(s) + 0.5) / s - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
    image += rng.uniform(0, 0.25) * ramp[..., None]
    if rng.random() < 0.5:
        angle = rng.uniform(0, np.pi)
        phase = (np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]) * s / rng.uniform(5, 24)
        image += rng.uniform(0.04, 0.12) * np.sin(2 * np.pi * phase)[..., None]
    return image.astype(np.float32)


def _linear_interp_matrix(n: int, s: int) -> np.ndarray:
    """[s, n] weights that bilinearly upsample n control points to s pixels (the texture stays smooth)."""
    pos = np.clip((np.arange(s) + 0.5) * n / s - 0.5, 0, n - 1)
    low = np.minimum(np.floor(pos).astype(int), n - 2)
    frac = pos - low
    weights = np.zeros((s, n))
    weights[np.arange(s), low] = 1 - frac
    weights[np.arange(s), low + 1] = frac
    return weights


def _place(rng: np.random.Generator, s: int, diameter: tuple[float, float], rotation: float, boxes: list) -> tuple:
    """Centre, radius, rotation and aspect of an object; retries keep its box from covering earlier ones too much."""
    radius = s * np.exp(rng.uniform(np.log(diameter[0]), np.log(diameter[1]))) / 2
    for _ in range(10):
        margin = 0.8 * radius  # the silhouette may touch or slightly cross the image border
        cx, cy = rng.uniform(margin, s - margin, size=2)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if all(_iou(box, other) <= _MAX_BOX_IOU for other in boxes):
            break
    boxes.append(box)
    return cx, cy, radius, rng.uniform(-rotation, rotation), rng.uniform(0.8, 1.0, size=2)


def _iou(a: tuple, b: tuple) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _draw(image: np.ndarray, instances: np.ndarray | None, obj_id: int, shape: str, placement: tuple, hue: float,
          rng: np.random.Generator) -> int:
    """Paint one shape in a saturated colour that contrasts with the background; return its in-image area."""
    cx, cy, radius, angle, aspect = placement
    s = image.shape[0]
    reach = 1.1 * radius + 1
    x0, x1 = max(0, int(cx - reach)), min(s, int(np.ceil(cx + reach)))
    y0, y1 = max(0, int(cy - reach)), min(s, int(np.ceil(cy + reach)))
    dx = ((np.arange(x0, x1) + 0.5 - cx) / radius)[None, :]
    dy = ((np.arange(y0, y1) + 0.5 - cy) / radius)[:, None]
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / aspect[0]
    v = (np.cos(angle) * dy - np.sin(angle) * dx) / aspect[1]
    mask = SHAPES[shape](u, v)
    crop = image[y0:y1, x0:x1]
    bright = crop.mean() < 0.5 if rng.random() < 0.85 else rng.random() < 0.5  # mostly the contrasting side
    value = rng.uniform(0.75, 1.0) if bright else rng.uniform(0.25, 0.45)
    colour = _hsv_to_rgb(hue, rng.uniform(0.55, 1.0), value)
    shading = 1 + rng.uniform(-0.15, 0.15) * u + rng.uniform(-0.15, 0.15) * v  # a gentle lighting gradient
    crop[mask] = (colour * shading[..., None])[mask]
    if instances is not None:
        instances[y0:y1, x0:x1][mask] = obj_id
    return int(mask.sum())


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def _void_borders(labels: np.ndarray) -> np.ndarray:
    """Mark 255 every pixel with a differently labelled 8-neighbour: a 2-pixel band across each class boundary."""
    s = labels.shape[0]
    padded = np.pad(labels, 1, mode="edge")
    border = np.zeros(labels.shape, dtype=bool)
    for dy in range(3):
        for dx in range(3):
            border |= padded[dy:dy + s, dx:dx + s] != labels
    return np.where(border, IGNORE_INDEX, labels).astype(np.int64)


def _tight_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Pixel-edge box of a mask: pixel (x, y) spans [x, x + 1) x [y, y + 1)."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)
