"""Detection decoding: the box formula inverts exactly, NMS, scores, caching; the loss agrees with the decoder."""
import math

import pytest
import torch

from clmtl.models.anchors import AnchorLayout
from clmtl.models.decode import box_from_raw, decode_detections, level_grid
from clmtl.training.losses import detection_loss_terms

SIZE = 64
NUM_CLASSES = 3
LAYOUT = AnchorLayout()


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def encode(box, stride, anchor, cell):
    """Raw (tx, ty, tw, th) that the documented formula maps to ``box`` — its inverse, written out by hand;
    None if this cell/anchor cannot express the box (offset outside (-0.5, 1.5) or size >= 4x the anchor)."""
    x0, y0, x1, y1 = box
    fractions = [
        ((x0 + x1) / 2 / stride - cell[0] + 0.5) / 2,
        ((y0 + y1) / 2 / stride - cell[1] + 0.5) / 2,
        math.sqrt((x1 - x0) / anchor[0]) / 2,
        math.sqrt((y1 - y0) / anchor[1]) / 2,
    ]
    if not all(0.001 < f < 0.999 for f in fractions):
        return None
    return torch.tensor([logit(f) for f in fractions])


def empty_raw(batch=1):
    return [torch.full((batch, 3, SIZE // s, SIZE // s, 5 + NUM_CLASSES), -12.0) for s in LAYOUT.strides]


def put(raw, image, level, anchor, cell, box, label, objectness=12.0):
    """Make one cell/anchor predict ``box`` of class ``label`` with the given objectness logit."""
    t = encode(box, LAYOUT.strides[level], LAYOUT.anchors[level][anchor], cell)
    entry = raw[level][image, anchor, cell[1], cell[0]]
    entry[:4] = t
    entry[4] = objectness
    entry[5:] = -12.0
    entry[5 + label] = 12.0


def test_encode_then_decode_returns_the_ground_truth():
    gts = [
        ([4.0, 6.0, 16.0, 18.0], 0, 0, 0),  # box, label, level, anchor
        ([30.0, 20.0, 66.0, 44.0], 2, 1, 1),  # runs past the right edge: decoded clipped to 64
        ([10.0, 10.0, 54.0, 54.0], 1, 2, 0),
    ]
    raw = empty_raw(batch=2)
    for box, label, level, anchor in gts:
        stride = LAYOUT.strides[level]
        cell = (int((box[0] + box[2]) / 2 // stride), int((box[1] + box[3]) / 2 // stride))
        put(raw, 0, level, anchor, cell, box, label)

    out = decode_detections(raw, LAYOUT)
    assert len(out) == 2 and len(out[1]["boxes"]) == 0 and out[1]["boxes"].shape == (0, 4)
    order = out[0]["labels"].argsort()
    expected = torch.tensor([gts[0][0], gts[2][0], [30.0, 20.0, 64.0, 44.0]])
    torch.testing.assert_close(out[0]["boxes"][order], expected, atol=1e-3, rtol=0)
    assert out[0]["labels"][order].tolist() == [0, 1, 2]
    assert out[0]["scores"].min() > 0.999


def test_loss_terms_vanish_when_raw_encodes_the_ground_truth_everywhere():
    """Every cell/anchor that can express its image's box does so exactly, with the right class:
    whatever the assignment picks as positives, box and class terms must be ~0."""
    targets = [
        {"boxes": torch.tensor([[20.0, 8.0, 36.0, 22.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 12.0, 45.0, 52.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    raw = empty_raw(batch=3)
    for image, target in enumerate(targets[:2]):
        box, label = target["boxes"][0].tolist(), int(target["labels"][0])
        for level, stride in enumerate(LAYOUT.strides):
            for anchor in range(3):
                for cy in range(SIZE // stride):
                    for cx in range(SIZE // stride):
                        if encode(box, stride, LAYOUT.anchors[level][anchor], (cx, cy)) is not None:
                            put(raw, image, level, anchor, (cx, cy), box, label)
    terms = detection_loss_terms(raw, targets, LAYOUT)
    assert terms["box"] < 1e-4 and terms["cls"] < 1e-3

    raw[0][..., :2] += 0.3  # shift every predicted center: the box term must notice
    raw[0][..., 5:] *= -1  # and flip every class decision at stride 8
    worse = detection_loss_terms(raw, targets, LAYOUT)
    assert worse["box"] > 100 * max(float(terms["box"]), 1e-5) and worse["cls"] > 1.0


def test_nms_removes_a_duplicate_of_the_same_class_only():
    raw = empty_raw()
    box = [20.0, 20.0, 40.0, 36.0]
    put(raw, 0, 1, 0, (1, 1), box, label=1, objectness=3.0)  # same box from two levels
    put(raw, 0, 0, 1, (3, 3), [20.5, 20.0, 40.5, 36.0], label=1, objectness=1.0)
    out = decode_detections(raw, LAYOUT)[0]
    assert out["labels"].tolist() == [1]
    assert out["scores"].item() == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item(), abs=1e-4)

    put(raw, 0, 0, 1, (3, 3), [20.5, 20.0, 40.5, 36.0], label=2, objectness=1.0)
    out = decode_detections(raw, LAYOUT)[0]
    assert sorted(out["labels"].tolist()) == [1, 2]  # class-wise NMS keeps the other class


def test_score_is_objectness_times_class_probability_per_class():
    raw = empty_raw()
    put(raw, 0, 0, 0, (2, 2), [14.0, 14.0, 26.0, 26.0], label=0, objectness=0.5)
    raw[0][0, 0, 2, 2, 5:] = torch.tensor([1.0, 0.0, -1.0])
    out = decode_detections(raw, LAYOUT, score_threshold=0.2)[0]
    obj = torch.sigmoid(torch.tensor(0.5))
    expected = sorted([obj * torch.sigmoid(torch.tensor(c)) for c in (1.0, 0.0, -1.0)], reverse=True)
    expected = [s.item() for s in expected if s > 0.2]
    assert out["scores"].tolist() == pytest.approx(expected, abs=1e-6)
    assert out["labels"].tolist() == [0, 1, 2][: len(expected)]


def test_threshold_and_max_detections():
    raw = empty_raw()
    for i in range(6):  # six separate boxes of growing objectness
        put(raw, 0, 0, 0, (i + 1, 1), [8.0 * i + 9, 9.0, 8.0 * i + 15, 15.0], label=0, objectness=float(i) - 2)
    scores = decode_detections(raw, LAYOUT, score_threshold=0.5)[0]["scores"]
    assert len(scores) == 3  # objectness logits 1, 2, 3 pass 0.5; -2, -1, 0 do not
    assert len(decode_detections(raw, LAYOUT, score_threshold=0.0, max_detections=4)[0]["scores"]) == 4


def test_level_grid_is_cached_and_matches_the_formula():
    a = level_grid(LAYOUT.anchors[0], 4, 5, torch.device("cpu"), torch.float32)
    b = level_grid(LAYOUT.anchors[0], 4, 5, torch.device("cpu"), torch.float32)
    assert a[0] is b[0] and a[1] is b[1]
    cell, anchors = a
    assert cell.shape == (1, 1, 4, 5, 2) and cell[0, 0, 3, 4].tolist() == [4.0, 3.0]  # (x, y) of row 3, col 4
    box = box_from_raw(torch.zeros(1, 3, 4, 5, 4), cell, anchors, 8)  # sigmoid(0)=0.5: center of cell, anchor size
    assert box[0, 1, 3, 4].tolist() == pytest.approx([36 - 10, 28 - 7, 36 + 10, 28 + 7])
