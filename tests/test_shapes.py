"""The embedded shapes benchmark: reproducible, well-formed targets that agree with what is drawn."""
import random

import numpy as np
import pytest
import torch
from scipy import ndimage

from clmtl.data.shapes import (DISTRACTORS, SHAPES_CLASSES, ShapesDataset, _void_borders, make_shapes_dataset,
                                render_scene, sample_rng, shapes_task)
from clmtl.stream.tasks import CLASSIFICATION, DETECTION, IGNORE_INDEX, KINDS, SEGMENTATION

S = 128


def scenes(kind: str, n: int, split: str = "train", seed: int = 0) -> list:
    """The scenes make_shapes_dataset draws, with the instance maps it does not keep."""
    label = (lambda i: i % len(SHAPES_CLASSES[kind])) if kind == CLASSIFICATION else (lambda i: None)
    return [render_scene(kind, sample_rng(kind, split, seed, i), S, label(i)) for i in range(n)]


def same_targets(a, b) -> bool:
    if isinstance(a, dict):
        return torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("kind", KINDS)
def test_same_arguments_give_identical_data_and_others_differ(kind):
    first = make_shapes_dataset(kind, "train", 6, seed=3)
    again = make_shapes_dataset(kind, "train", 6, seed=3)
    assert torch.equal(first.images, again.images)
    assert all(same_targets(a, b) for a, b in zip(first.targets, again.targets))
    other_seed = make_shapes_dataset(kind, "train", 6, seed=4)
    val = make_shapes_dataset(kind, "val", 6, seed=3)
    for other in (other_seed, val):
        assert all(not torch.equal(a, b) for a, b in zip(first.images, other.images))
    longer = make_shapes_dataset(kind, "train", 9, seed=3)
    assert torch.equal(longer.images[:6], first.images)


def test_tasks_are_different_images_for_the_same_seed():
    images = [make_shapes_dataset(kind, "train", 2).images for kind in KINDS]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "depth"},
        {"split": "test"},
        {"size": 0},
        {"image_size": 100},
        {"image_size": 32},
        {"seed": -1},
    ],
)
def test_bad_arguments_raise_value_error(kwargs):
    args = {"kind": SEGMENTATION, "split": "train", "size": 2, "image_size": S, "seed": 0} | kwargs
    with pytest.raises(ValueError):
        make_shapes_dataset(**args)


def test_class_sets_are_disjoint_and_tasks_match_them():
    seg, det, cls = (set(SHAPES_CLASSES[k]) for k in (SEGMENTATION, DETECTION, CLASSIFICATION))
    assert SHAPES_CLASSES[SEGMENTATION][0] == "background"
    assert not (seg & det) and not (det & cls) and not (seg & cls)
    assert not set(DISTRACTORS) & cls
    assert (len(seg), len(det), len(cls)) == (5, 4, 5)
    task = shapes_task(DETECTION, "det")
    assert (task.name, task.kind, task.classes) == ("det", DETECTION, SHAPES_CLASSES[DETECTION])
    with pytest.raises(ValueError):
        shapes_task("depth", "x")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [64, 160])
def test_samples_have_the_shared_formats(kind, size):
    ds = make_shapes_dataset(kind, "val", 5, image_size=size)
    assert isinstance(ds, ShapesDataset) and len(ds) == 5
    assert (ds.kind, ds.classes, ds.image_size) == (kind, SHAPES_CLASSES[kind], size)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (5, 3, size, size)
    n_classes = len(SHAPES_CLASSES[kind])
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, size, size)
        assert torch.allclose(image * 255, ds.images[i].float())
        assert 0 <= image.min() and image.max() <= 1
        if kind == SEGMENTATION:
            assert target.dtype == torch.int64 and target.shape == (size, size)
            assert set(target.unique().tolist()) <= set(range(n_classes)) | {IGNORE_INDEX}
        elif kind == DETECTION:
            boxes, labels = target["boxes"], target["labels"]
            assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
            assert boxes.shape == (len(labels), 4) and len(labels) <= 5
            assert ((labels >= 0) & (labels < n_classes)).all()
            assert (boxes >= 0).all() and (boxes <= size).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        else:
            assert type(target) is int and 0 <= target < n_classes


def test_dataset_targets_are_the_rendered_ones():
    for kind in KINDS:
        ds = make_shapes_dataset(kind, "train", 3, seed=5)
        for i, scene in enumerate(scenes(kind, 3, seed=5)):
            assert torch.equal(ds.images[i], torch.from_numpy(scene.image).permute(2, 0, 1))
            assert same_targets(ds.targets[i], scene.target)


def test_segmentation_labels_follow_the_objects_with_void_exactly_on_class_borders():
    rendered = scenes(SEGMENTATION, 240)
    seen = set()
    for scene in rendered:
        semantic = scene.instance_classes[scene.instances]
        # independent border: a pixel whose 3x3 neighbourhood (edge-replicated) holds more than one class
        neighbourhood = {"size": 3, "mode": "nearest"}
        border = ndimage.maximum_filter(semantic, **neighbourhood) != ndimage.minimum_filter(semantic, **neighbourhood)
        target = scene.target.numpy()
        np.testing.assert_array_equal(target, np.where(border, IGNORE_INDEX, semantic))
        seen |= set(np.unique(target).tolist())
        assert 0.002 < border.mean() < 0.2  # a thin band, present whenever an object is visible
    assert seen == set(range(len(SHAPES_CLASSES[SEGMENTATION]))) | {IGNORE_INDEX}


def test_void_band_is_one_pixel_either_side_of_a_hand_made_boundary():
    labels = np.zeros((6, 6), dtype=np.int64)
    labels[:, 3:] = 2
    expected = np.zeros((6, 6), dtype=np.int64)
    expected[:, 4:] = 2
    expected[:, 2:4] = IGNORE_INDEX
    np.testing.assert_array_equal(_void_borders(labels), expected)


def test_detection_boxes_are_tight_around_visible_pixels_and_hidden_objects_are_dropped():
    dropped = occluded_kept = 0
    label_counts = np.zeros(len(SHAPES_CLASSES[DETECTION]), dtype=int)
    for scene in scenes(DETECTION, 240):
        boxes, labels = scene.target["boxes"].numpy(), scene.target["labels"].numpy()
        n_objects = len(scene.instance_classes) - 1
        assert 1 <= n_objects <= 5
        visible = np.array([np.count_nonzero(scene.instances == k) for k in range(n_objects + 1)])
        expected_kept = [k for k in range(1, n_objects + 1) if visible[k] >= 0.3 * scene.areas[k]]
        assert scene.kept.tolist() == expected_kept
        dropped += n_objects - len(expected_kept)
        for box, label, k in zip(boxes, labels, expected_kept):
            ys, xs = np.nonzero(scene.instances == k)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            assert label == scene.instance_classes[k]
            occluded_kept += bool(visible[k] < scene.areas[k])
        label_counts += np.bincount(labels, minlength=len(label_counts))
    assert dropped > 0 and occluded_kept > 10  # occlusion happens, and sometimes hides an object
    assert (label_counts > 0.15 * label_counts.sum()).all()


def test_classification_object_is_whole_and_classes_are_balanced():
    ds = make_shapes_dataset(CLASSIFICATION, "train", 242)
    counts = np.bincount(ds.targets, minlength=len(SHAPES_CLASSES[CLASSIFICATION]))
    assert counts.tolist() == [49, 49, 48, 48, 48]
    for i, scene in enumerate(scenes(CLASSIFICATION, 50)):
        assert scene.target == i % 5 == scene.instance_classes[1] and len(scene.instance_classes) == 2
        assert np.count_nonzero(scene.instances == 1) == scene.areas[1]  # drawn last, nothing hides it
        ys, xs = np.nonzero(scene.instances)
        assert max(np.ptp(xs), np.ptp(ys)) + 1 >= 0.2 * S  # the labelled object is large, unlike the clutter


def test_objects_contrast_with_a_textured_background():
    contrasts, texture = [], []
    for scene in scenes(SEGMENTATION, 60):
        image = scene.image.astype(float) / 255
        background = scene.instances == 0
        smoothed = ndimage.uniform_filter(image, size=(9, 9, 1))  # averages pixel noise away, keeps texture
        texture.append(smoothed[ndimage.binary_erosion(background, iterations=5)].std(axis=0).mean())
        for k in range(1, len(scene.instance_classes)):
            inside = ndimage.binary_erosion(scene.instances == k, iterations=2)
            ring = ndimage.binary_dilation(scene.instances == k, iterations=4) & background
            if inside.sum() > 20 and ring.sum() > 20:
                contrasts.append(np.abs(image[inside].mean(0) - image[ring].mean(0)).max())
    assert np.median(texture) > 0.04  # a flat background with pixel noise only gives ~0.02
    assert np.mean(np.array(contrasts) > 0.3) > 0.9  # per-channel gap between object and its surroundings


def test_generation_draws_from_its_own_generators_only():
    """Building a dataset leaves Python's, NumPy's and torch's global generators where they were: making data in the
    middle of a run (a baseline's, a replayed task's) must not change the run's shuffles and augmentations."""
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    before = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    for kind in KINDS:
        make_shapes_dataset(kind, "train", 3, image_size=64, seed=2)
    python, numpy_state, torch_state = before
    assert random.getstate() == python
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    assert torch.equal(torch.get_rng_state(), torch_state)
