"""Joint flips move masks and boxes with the image; hue rotation changes colours only."""
import math

import torch
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors

from clmtl.data.shapes import make_shapes_dataset
from clmtl.data.transforms import RandomHueRotation, hue_rotation_matrix, train_augmentation


def test_a_certain_flip_mirrors_image_mask_and_boxes_together():
    seg = make_shapes_dataset("segmentation", "train", 2, 64)
    image, mask = train_augmentation(seg, "segmentation", hflip=1.0)[0]
    torch.testing.assert_close(image, seg[0][0].flip(-1))
    assert torch.equal(mask, seg[0][1].flip(-1))

    det = make_shapes_dataset("detection", "train", 4, 64)
    index = next(i for i in range(len(det)) if len(det[i][1]["boxes"]))
    image, target = train_augmentation(det, "detection", hflip=1.0)[index]
    original = det[index][1]["boxes"]
    expected = torch.stack([64 - original[:, 2], original[:, 1], 64 - original[:, 0], original[:, 3]], dim=1)
    torch.testing.assert_close(target["boxes"], expected)
    assert torch.equal(target["labels"], det[index][1]["labels"])

    cls = make_shapes_dataset("classification", "train", 2, 64)
    image, label = train_augmentation(cls, "classification", hflip=1.0)[1]
    assert label == cls[1][1] and torch.equal(image, cls[1][0].flip(-1))


def test_no_augmentation_returns_the_dataset_itself():
    seg = make_shapes_dataset("segmentation", "train", 1, 64)
    assert train_augmentation(seg, "segmentation", hflip=0.0, hue=0.0) is seg
    assert train_augmentation(seg, "segmentation", hflip=0.0, hue=0.1) is not seg


def test_a_third_turn_of_hue_equals_torchvisions_hsv_hue_shift():
    # A third of a turn permutes the RGB channels cyclically, both about the grey axis and in HSV: an exact reference.
    image = make_shapes_dataset("classification", "train", 1, 64)[0][0]
    rotated = torch.einsum("ij,jhw->ihw", hue_rotation_matrix(2 * math.pi / 3), image).clamp(0, 1)
    torch.testing.assert_close(rotated, F.adjust_hue(image, 1 / 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotated, image[[2, 0, 1]], atol=1e-5, rtol=0)


def test_hue_rotation_keeps_greys_and_is_a_rotation():
    matrix = hue_rotation_matrix(1.234)
    torch.testing.assert_close(matrix @ torch.full((3,), 0.4), torch.full((3,), 0.4))
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(hue_rotation_matrix(0.0), torch.eye(3))


def test_random_hue_changes_the_image_and_leaves_mask_and_boxes_alone():
    seg = make_shapes_dataset("segmentation", "train", 1, 64)
    augmented = train_augmentation(seg, "segmentation", hflip=0.0, hue=0.5)
    torch.manual_seed(0)
    draws = [augmented[0] for _ in range(20)]
    assert all(torch.equal(mask, seg[0][1]) for _, mask in draws)
    changes = [(image - seg[0][0]).abs().max().item() for image, _ in draws]
    assert sum(change > 0.1 for change in changes) >= 10  # any hue: most draws move colours far
    image = draws[changes.index(max(changes))][0]
    # Brightness (the channel mean) is what a rotation about the grey axis keeps, up to clipping into [0, 1].
    unclipped = (image > 0) & (image < 1)
    kept = unclipped.all(0)
    torch.testing.assert_close(image.mean(0)[kept], seg[0][0].mean(0)[kept], atol=1e-5, rtol=0)

    boxes = tv_tensors.BoundingBoxes(torch.tensor([[1.0, 2.0, 30.0, 40.0]]), format="XYXY", canvas_size=(64, 64))
    _, out = RandomHueRotation(0.5)(tv_tensors.Image(seg[0][0]), boxes)
    assert torch.equal(out, boxes)


def test_hue_rotation_applies_to_the_tasks_it_is_set_for():
    from clmtl.config import load_config
    from clmtl.stream.benchmark import build_benchmark

    config = load_config(None, ["data.train_size=5", "data.val_size=5", "data.image_size=64", "data.hflip=0",
                                "data.hue.cls=0.5"])
    benchmark = build_benchmark(config)
    for task, experience in zip(benchmark.tasks, benchmark.stream.train_stream):
        draws = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            draws.append(experience.dataset[0][0])
        assert torch.equal(*draws) == (task.name != "cls"), task.name
