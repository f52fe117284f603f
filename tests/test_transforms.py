"""Joint flips move masks and boxes with the image."""
import torch

from clmtl.data.shapes import make_shapes_dataset
from clmtl.data.transforms import train_augmentation


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


def test_no_flip_probability_returns_the_dataset_itself():
    seg = make_shapes_dataset("segmentation", "train", 1, 64)
    assert train_augmentation(seg, "segmentation", hflip=0.0) is seg
