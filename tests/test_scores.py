"""Scorers against hand-computed values, torchmetrics and pycocotools called directly."""
import contextlib
import io

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics.classification import MulticlassJaccardIndex

from clmtl.metrics.scores import CocoMAP, MeanIoU, Top1, scorer_for
from clmtl.stream.tasks import TaskSpec

# --- mIoU -----------------------------------------------------------------------------------------------------

# target/prediction pairs over the non-ignored pixels: (0,0) (0,1) (1,1) (1,1) (2,0); class 3 appears nowhere.
# IoU: class 0 = 1/(2+2-1) = 1/3, class 1 = 2/(2+3-2) = 2/3, class 2 = 0/(1+0-0) = 0 -> mIoU = 1/3.
HAND_TARGET = torch.tensor([[[0, 0, 1], [1, 255, 2]]])
HAND_PRED = torch.tensor([[[0, 1, 1], [1, 2, 0]]])


def test_miou_hand_case_skips_ignored_pixels_and_absent_classes():
    miou = MeanIoU(num_classes=4)
    miou.update(HAND_PRED, HAND_TARGET)
    assert miou.result()["mIoU"] == pytest.approx(1 / 3)
    assert miou.result()["mIoU_fg"] == pytest.approx((2 / 3 + 0) / 2)  # classes 1 and 2: background left out
    scored = MeanIoU(num_classes=4, scored=[0, 2])
    scored.update(HAND_PRED, HAND_TARGET)
    assert scored.result() == pytest.approx({"mIoU": 1 / 6, "mIoU_fg": 0.0})


def test_miou_accepts_logits():
    logits = torch.nn.functional.one_hot(HAND_PRED, 4).permute(0, 3, 1, 2).float()
    miou = MeanIoU(num_classes=4)
    miou.update(logits, HAND_TARGET)
    assert miou.result()["mIoU"] == pytest.approx(1 / 3)


def test_miou_is_one_confusion_matrix_over_the_set_not_a_mean_of_batches():
    # Image 2 alone: class 0 IoU 1/(2+1-1) = 1/2, class 1 IoU 0/(0+1-0) = 0 -> 0.25.
    # Both images: class 0 IoU 5/(6+5-5) = 5/6, class 1 IoU 0 -> 5/12 (a mean of per-image scores would differ).
    t1, p1 = torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long)
    t2, p2 = torch.tensor([[[0, 0]]]), torch.tensor([[[0, 1]]])
    miou = MeanIoU(num_classes=2)
    miou.update(p1, t1)
    miou.update(p2, t2)
    assert miou.result()["mIoU"] == pytest.approx((5 / 6 + 0) / 2)
    miou.reset()
    miou.update(p2, t2)
    assert miou.result()["mIoU"] == pytest.approx(0.25)


def test_miou_matches_torchmetrics_on_random_batches():
    generator = torch.Generator().manual_seed(0)
    num_classes = 6
    ours = MeanIoU(num_classes)
    reference = MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=255)
    for _ in range(4):
        target = torch.randint(0, num_classes - 1, (3, 16, 16), generator=generator)  # class 5 never in the target
        target[torch.rand(target.shape, generator=generator) < 0.2] = 255
        logits = torch.randn(3, num_classes - 2, 16, 16, generator=generator)  # classes 4, 5 never predicted
        logits = torch.cat([logits, torch.full((3, 2, 16, 16), -1e9)], dim=1)
        ours.update(logits, target)
        reference.update(logits.argmax(1), target)
    assert ours.result()["mIoU"] == pytest.approx(float(reference.compute()), abs=1e-6)


def test_miou_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError):
        MeanIoU(num_classes=2).update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))


# --- top-1 ----------------------------------------------------------------------------------------------------

def test_top1_counts_argmax_hits_over_batches():
    top1 = Top1()
    top1.update(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 1]))  # 2 of 3
    top1.update(torch.tensor([[2.0, 1.0]]), torch.tensor([0]))  # 1 of 1
    assert top1.result() == {"top1": pytest.approx(3 / 4)}


# --- COCO mAP -------------------------------------------------------------------------------------------------

def _image(boxes, labels, scores=None):
    entry = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
             "labels": torch.tensor(labels, dtype=torch.long)}
    if scores is not None:
        entry["scores"] = torch.tensor(scores, dtype=torch.float32)
    return entry


# Three images, two classes: a tight hit, a loose hit (IoU ~0.6), a wrong-class box, a duplicate, a miss and a
# false positive on an image without objects. Boxes xyxy.
TARGETS = [
    _image([[10, 10, 50, 50], [60, 60, 100, 120]], [0, 1]),
    _image([[0, 0, 30, 40]], [1]),
    _image([], []),
]
PREDICTIONS = [
    _image([[11, 10, 50, 51], [60, 70, 100, 120], [10, 10, 50, 50]], [0, 1, 1], [0.9, 0.8, 0.3]),
    _image([[0, 0, 30, 40], [1, 1, 30, 40]], [1, 1], [0.6, 0.7]),
    _image([[5, 5, 20, 20]], [0], [0.95]),
]


def _pycocotools_direct() -> tuple[float, float]:
    """The same case written as COCO json by hand (xywh, 1-based category ids) and scored by pycocotools alone."""
    gt = {
        "images": [{"id": 1}, {"id": 2}, {"id": 3}],
        "categories": [{"id": 1}, {"id": 2}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 60, 40, 60], "area": 2400, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 30, 40], "area": 1200, "iscrowd": 0},
        ],
    }
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [11, 10, 39, 41], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [60, 70, 40, 50], "score": 0.8},
        {"image_id": 1, "category_id": 2, "bbox": [10, 10, 40, 40], "score": 0.3},
        {"image_id": 2, "category_id": 2, "bbox": [0, 0, 30, 40], "score": 0.6},
        {"image_id": 2, "category_id": 2, "bbox": [1, 1, 29, 39], "score": 0.7},
        {"image_id": 3, "category_id": 1, "bbox": [5, 5, 15, 15], "score": 0.95},
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0]), float(evaluator.stats[1])


def test_coco_map_equals_pycocotools_on_the_same_detections():
    expected_50_95, expected_50 = _pycocotools_direct()
    assert 0.1 < expected_50_95 < expected_50 < 1.0  # the case is not degenerate
    scorer = CocoMAP()
    scorer.update(PREDICTIONS[:2], TARGETS[:2])  # two batches: accumulation across updates
    scorer.update(PREDICTIONS[2:], TARGETS[2:])
    assert scorer.result() == {"mAP50_95": pytest.approx(expected_50_95), "mAP50": pytest.approx(expected_50)}


def test_coco_map_in_the_files_own_ids():
    expected_50_95, expected_50 = _pycocotools_direct()
    scorer = CocoMAP(category_ids=[1, 2])
    scorer.update(PREDICTIONS, TARGETS, image_ids=[42, 7, 1000])
    assert scorer.result() == {"mAP50_95": pytest.approx(expected_50_95), "mAP50": pytest.approx(expected_50)}
    with pytest.raises(ValueError):
        scorer.update(PREDICTIONS[:1], TARGETS[:1], image_ids=[7])


def test_coco_map_perfect_predictions_score_one():
    scorer = CocoMAP()
    perfect = [{**target, "scores": torch.ones(len(target["labels"]))} for target in TARGETS]
    scorer.update(perfect, TARGETS)
    assert scorer.result() == {"mAP50_95": pytest.approx(1.0), "mAP50": pytest.approx(1.0)}


def test_coco_map_without_detections_or_without_ground_truth_is_zero():
    empty = [_image([], [], []) for _ in TARGETS]
    scorer = CocoMAP()
    scorer.update(empty, TARGETS)
    assert scorer.result() == {"mAP50_95": 0.0, "mAP50": 0.0}
    scorer = CocoMAP()
    scorer.update(PREDICTIONS, [_image([], []) for _ in PREDICTIONS])
    assert scorer.result() == {"mAP50_95": 0.0, "mAP50": 0.0}


def test_coco_map_detection_on_a_crowd_box_is_not_a_false_positive():
    # the 0.9 box lies inside the second box (IoU 0.16): ignored if that box is a crowd region, else a false positive
    boxes = _image([[10, 10, 50, 50], [60, 60, 100, 100]], [0, 0])
    prediction = _image([[10, 10, 50, 50], [62, 62, 78, 78]], [0, 0], [0.5, 0.9])
    scorer = CocoMAP()
    scorer.update([prediction], [{**boxes, "iscrowd": torch.tensor([False, True])}])
    assert scorer.result()["mAP50"] == pytest.approx(1.0)
    scorer = CocoMAP()
    scorer.update([prediction], [boxes])
    assert scorer.result()["mAP50"] < 0.5


def test_coco_map_recomputes_after_new_data():
    scorer = CocoMAP()
    scorer.update(PREDICTIONS[:1], TARGETS[:1])
    first = scorer.result()
    scorer.update(PREDICTIONS[1:], TARGETS[1:])
    assert scorer.result() != first
    scorer.reset()
    assert scorer.result() == {"mAP50_95": 0.0, "mAP50": 0.0}


def test_scorer_for_each_kind():
    assert isinstance(scorer_for(TaskSpec("s", "segmentation", ("background", "a"))), MeanIoU)
    assert isinstance(scorer_for(TaskSpec("d", "detection", ("a",))), CocoMAP)
    assert isinstance(scorer_for(TaskSpec("c", "classification", ("a", "b"))), Top1)
    assert scorer_for(TaskSpec("s", "segmentation", ("background", "a", "b"))).num_classes == 3


def test_scorer_for_detection_reports_in_the_tasks_category_ids():
    expected_50_95, expected_50 = _pycocotools_direct()
    scorer = scorer_for(TaskSpec("d", "detection", ("a", "b"), category_ids=(1, 2)))
    assert scorer.category_ids == [1, 2]
    scorer.update(PREDICTIONS, TARGETS)
    assert scorer.result() == {"mAP50_95": pytest.approx(expected_50_95), "mAP50": pytest.approx(expected_50)}
    with pytest.raises(ValueError, match="2 category ids for 1 classes"):
        TaskSpec("d", "detection", ("a",), category_ids=(1, 2))


def test_coco_map_scores_letterboxed_detections_in_original_pixels():
    # a 100 wide x 50 high image letterboxed to 64: scale 0.64, 16 rows of padding above
    original = {"boxes": torch.tensor([[10.0, 20.0, 50.0, 40.0]], dtype=torch.float64), "labels": torch.tensor([0]),
                "iscrowd": torch.tensor([False]), "size": (50, 100)}
    target = {**_image([[6.4, 28.8, 32.0, 41.6]], [0]), "image_id": 5,
              "letterbox": torch.tensor([0.64, 0.0, 16.0]), "original": original}
    in_model_pixels = _image([[6.4, 28.8, 32.0, 41.6]], [0], [0.9])
    scorer = CocoMAP()
    scorer.update([in_model_pixels], [target])
    assert scorer.result() == {"mAP50_95": pytest.approx(1.0), "mAP50": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="image id 5 was already scored"):  # the target's own id was used
        scorer.update([in_model_pixels], [target])
    scorer = CocoMAP()
    scorer.update([_image([[10.0, 20.0, 50.0, 40.0]], [0], [0.9])], [target])  # already original: mapped again, off
    assert scorer.result()["mAP50"] == 0.0
