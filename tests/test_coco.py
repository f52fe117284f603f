"""COCO loader on files written by the test: hand-checked targets, class subsets, errors, and mAP equal to
pycocotools COCOeval run on the annotation file itself."""
import contextlib
import copy
import io
import json
import re

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from realdata import COCO_ANNOTATIONS, COCO_IMAGES, write_coco, write_image

from clmtl.data.coco import CocoDetection
from clmtl.data.letterbox import Letterbox
from clmtl.errors import DataError
from clmtl.metrics.scores import scorer_for
from clmtl.stream.tasks import DETECTION, TaskSpec


def _load(written, **kwargs) -> CocoDetection:
    return CocoDetection(written.images_dir, written.annotation_file, 64, **kwargs)


def _rewrite(written, change) -> None:
    """Apply ``change`` to the written JSON and save it again."""
    data = copy.deepcopy(written.data)
    change(data)
    written.annotation_file.write_text(json.dumps(data))


def test_categories_and_targets_hand_checked(tmp_path):
    written = write_coco(tmp_path)
    data = _load(written)
    assert data.kind == DETECTION and len(data) == 4
    assert data.classes == ("cat", "dog", "bird") and data.category_ids == (3, 7, 42)  # sorted by id
    assert [data[i][1]["image_id"] for i in range(4)] == [4, 9, 17, 23]  # sorted by the file's ids

    # image 4, 64 wide x 40 high: scale 1, 12 rows of padding above; the dog box crosses the right/bottom edge
    image, target = data[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert torch.allclose(target["boxes"], torch.tensor(
        [[4.5, 18.0, 24.5, 32.0], [30.0, 22.0, 55.5, 44.0], [50.0, 32.0, 64.0, 52.0]]))
    assert target["labels"].tolist() == [0, 2, 1]
    assert target["letterbox"].tolist() == [1.0, 0.0, 12.0]
    assert target["original"]["boxes"].tolist() == [[4.5, 6.0, 24.5, 20.0], [30.0, 10.0, 55.5, 32.0],
                                                    [50.0, 20.0, 70.0, 50.0]]  # as in the file: not clipped
    assert target["original"]["size"] == (40, 64)

    # image 9, 36 wide x 64 high: 14 columns of padding left; the crowd box is left out of the training target
    image, target = data[1]
    assert torch.allclose(target["boxes"], torch.tensor([[19.0, 3.0, 39.0, 28.0], [24.0, 40.0, 36.0, 55.0]]))
    assert target["labels"].tolist() == [1, 0]
    assert target["original"]["labels"].tolist() == [1, 1, 0]
    assert target["original"]["iscrowd"].tolist() == [True, False, False]
    pixels = torch.from_numpy(written.pixels["tall.png"]).permute(2, 0, 1).float() / 255
    assert torch.equal(image[:, :, 14:50], pixels)  # PNG at scale 1: the exact pixels
    assert (image[:, :, :14] == 114 / 255).all()

    # image 17 has no annotation: an empty target, kept by default
    assert data[2][1]["boxes"].shape == (0, 4) and data[2][1]["labels"].shape == (0,)

    # image 23, 50 wide x 24 high into 64: scale 1.28, 31 rows (30.72 rounded), 16 rows of padding above
    target = data[3][1]
    assert target["letterbox"].tolist() == pytest.approx([1.28, 0.0, 16.0])
    assert torch.allclose(target["boxes"][0], torch.tensor([1.28, 2 * 1.28 + 16, 19 * 1.28, 22 * 1.28 + 16]))

    meta = data.meta(3)
    assert meta.file == (written.images_dir / "small.png").resolve()
    assert (meta.original_size, meta.image_id) == ((24, 50), 23)
    assert meta.letterbox == Letterbox(1.28, 0, 16)


def test_classes_chosen_by_name_in_the_given_order(tmp_path):
    data = _load(write_coco(tmp_path), classes=["bird", "cat"])
    assert data.classes == ("bird", "cat") and data.category_ids == (42, 3)
    target = data[0][1]  # image 4: cat, bird (dog no longer a class)
    assert target["labels"].tolist() == [1, 0] and target["original"]["labels"].tolist() == [1, 0]
    with pytest.raises(DataError, match=r"no category named \['fish'\]; the file's categories are 3: cat, 7: dog, "
                                        r"42: bird"):
        _load(write_coco(tmp_path), classes=["cat", "fish"])


def test_images_without_kept_annotations_dropped_on_request(tmp_path):
    written = write_coco(tmp_path)
    assert [data[1]["image_id"] for data in _load(written, keep_empty=False)] == [4, 9, 23]
    only_birds = _load(written, classes=["bird"], keep_empty=False)  # image 9 has only a dog and a cat
    assert [data[1]["image_id"] for data in only_birds] == [4, 23]
    assert len(_load(written, classes=["bird"])) == 4


def test_empty_boxes_after_clipping_leave_the_training_target_with_one_warning(tmp_path):
    annotations = COCO_ANNOTATIONS + [
        {"id": 90, "image_id": 4, "category_id": 3, "bbox": [70.0, 5.0, 10.0, 10.0]},  # right of a 64-wide image
        {"id": 91, "image_id": 23, "category_id": 3, "bbox": [5.0, 5.0, 0.0, 8.0]},  # zero width
    ]
    with pytest.warns(UserWarning, match=r"dropped 2 box\(es\) of zero size .*: wide.jpg, small.png") as seen:
        data = _load(write_coco(tmp_path, annotations=annotations))
    assert len(seen) == 1
    assert len(data[0][1]["labels"]) == 3 and len(data[0][1]["original"]["labels"]) == 4
    assert len(data[3][1]["labels"]) == 2 and len(data[3][1]["original"]["labels"]) == 3


def _drop(key):
    return lambda data: data.pop(key)


def _set(section, index, field, value):
    return lambda data: data[section][index].__setitem__(field, value)


@pytest.mark.parametrize("change, message", [
    (_drop("categories"), "'categories' must be a list, got NoneType"),
    (lambda data: data.__setitem__("images", {}), "'images' must be a list, got dict"),
    (_set("images", 0, "id", "4"), r"images\[0\].id must be int, got '4'"),
    (_set("images", 1, "width", 36.0), r"images\[1\].width must be int"),
    (_set("annotations", 2, "bbox", [1, 2, 3]), r"annotations\[2\] \(id 3\): bbox must be 4 finite numbers"),
    (_set("annotations", 0, "image_id", 99), r"annotations\[0\] \(id 1\): unknown image id 99"),
    (_set("annotations", 1, "category_id", 5), r"annotations\[1\] \(id 2\): unknown category id 5"),
    (_set("categories", 1, "id", 3), "categories ids are not unique"),
    (lambda data: data.update(images=[], annotations=[]), "the split has no sample"),
])
def test_invalid_annotation_files_name_the_file_and_the_problem(tmp_path, change, message):
    written = write_coco(tmp_path)
    _rewrite(written, change)
    with pytest.raises(DataError, match=f"instances_train.json.*{message}"):
        _load(written)


@pytest.mark.parametrize("bbox, problem", [
    ([1.0, 2.0, float("nan"), 4.0], "4 finite numbers"),  # json writes NaN, Infinity: Python's json reads them back
    ([1.0, float("inf"), 3.0, 4.0], "4 finite numbers"),
    ([1.0, 2.0, -3.0, 4.0], "width and height must not be negative"),
    ([1.0, 2.0, 3.0, -0.5], "width and height must not be negative"),
    ([1.0, 2.0, "3", 4.0], "4 finite numbers"),
])
def test_boxes_that_are_not_finite_or_have_negative_sides_are_refused(tmp_path, bbox, problem):
    written = write_coco(tmp_path)
    _rewrite(written, _set("annotations", 4, "bbox", bbox))
    with pytest.raises(DataError) as info:
        _load(written)
    message = str(info.value)
    assert message.startswith(f"{written.annotation_file}: annotations[4] (id 6): bbox ")
    assert problem in message and "\n" not in message


@pytest.mark.parametrize("change, message", [
    (lambda data: data.clear() or data.update(top=[]), "'images' must be a list, got NoneType"),
    (lambda data: data["images"].__setitem__(2, [17, "nested/empty.jpg"]), r"images\[2\] must be an object"),
    (lambda data: data["annotations"].__setitem__(0, "box"), r"annotations\[0\] must be an object"),
    (lambda data: data["categories"].__setitem__(1, None), r"categories\[1\] must be an object"),
    (lambda data: data.update(categories=[]), "no category"),
    (lambda data: data.update(categories=[], annotations=[]), "no category"),
    (_set("categories", 2, "name", "cat"), r"several categories are named \['cat'\]"),
])
def test_malformed_entries_categories_and_duplicate_names_are_one_line_naming_the_file(tmp_path, change, message):
    written = write_coco(tmp_path)
    _rewrite(written, change)
    with pytest.raises(DataError, match=f"^{re.escape(str(written.annotation_file))}: .*{message}") as info:
        _load(written)
    assert "\n" not in str(info.value)


def test_a_duplicate_category_name_is_refused_only_where_it_is_used(tmp_path):
    written = write_coco(tmp_path)
    _rewrite(written, _set("categories", 2, "name", "cat"))  # 3: cat, 7: dog, 42: cat
    with pytest.raises(DataError, match=r"several categories are named \['cat'\]; the file's categories are "
                                        r"3: cat, 7: dog, 42: cat$"):
        _load(written, classes=["dog", "cat"])
    data = _load(written, classes=["dog"])  # the duplicate is not among the chosen classes
    assert data.classes == ("dog",) and data.category_ids == (7,)


@pytest.mark.parametrize("top", [[], "instances", 3, None])
def test_a_top_level_that_is_not_an_object_is_refused(tmp_path, top):
    written = write_coco(tmp_path)
    written.annotation_file.write_text(json.dumps(top))
    with pytest.raises(DataError) as info:
        _load(written)
    assert str(info.value) == (f"{written.annotation_file}: expected a JSON object with 'images', 'annotations' and "
                               "'categories'")


def test_malformed_json(tmp_path):
    written = write_coco(tmp_path)
    written.annotation_file.write_text('{"images": [')
    with pytest.raises(DataError, match="instances_train.json: not valid JSON"):
        _load(written)


def test_bad_images_raise_or_are_skipped(tmp_path):
    written = write_coco(tmp_path)
    (written.images_dir / "tall.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="tall.png: cannot decode"):
        _load(written)
    with pytest.warns(UserWarning, match=r"skipped 1 bad sample\(s\): .*tall.png: cannot decode") as seen:
        data = _load(written, on_bad_sample="skip")
    assert len(seen) == 1 and [d[1]["image_id"] for d in data] == [4, 17, 23]
    (written.images_dir / "wide.jpg").unlink()
    with pytest.raises(DataError, match="wide.jpg: file not found"):
        _load(written)


def test_file_names_may_not_leave_the_image_folder(tmp_path):
    written = write_coco(tmp_path / "coco")
    write_image(tmp_path / "outside.png", np.zeros((4, 4, 3), dtype=np.uint8))
    _rewrite(written, _set("images", 0, "file_name", "../../outside.png"))
    with pytest.raises(DataError, match="outside.png: path leads outside the dataset root"):
        _load(written)


def test_image_size_must_match_the_annotation_file(tmp_path):
    written = write_coco(tmp_path)
    _rewrite(written, _set("images", 0, "width", 65))
    with pytest.raises(DataError, match=r"wide.jpg: image is 64x40 pixels upright but .*instances_train.json says "
                                        r"65x40 \(width x height\)$"):
        _load(written)
    _rewrite(written, lambda data: data["images"][0].update(width=40, height=64))
    with pytest.raises(DataError, match="says 40x64 .*swapped: annotations made without the EXIF orientation"):
        _load(written)


def test_subset_is_seeded_and_independent_of_the_files_order(tmp_path):
    forward = _load(write_coco(tmp_path / "a"), subset=2, seed=3)
    backward = _load(write_coco(tmp_path / "b", images=COCO_IMAGES[::-1], annotations=COCO_ANNOTATIONS[::-1]),
                     subset=2, seed=3)
    ids = [target["image_id"] for _, target in forward]
    assert len(ids) == 2 and ids == [target["image_id"] for _, target in backward]
    assert torch.equal(forward.images, backward.images)


# --- mAP: our scorer through the dataset targets == COCOeval on the file ------------------------------------


def _predictions(data: CocoDetection, seed: int = 0) -> list[dict]:
    """Model-space detections: every ground-truth box (crowd too) jittered, sometimes mislabelled, plus false
    positives anywhere on the canvas (padding included)."""
    rng = np.random.default_rng(seed)
    predictions = []
    for i in range(len(data)):
        original = data[i][1]["original"]
        truth = data.meta(i).letterbox.boxes_to_model(original["boxes"].float())
        labels = original["labels"].clone()
        flip = torch.from_numpy(rng.random(len(labels)) < 0.2)
        labels[flip] = (labels[flip] + 1) % len(data.classes)
        false_xy = torch.from_numpy(rng.uniform(0, 48, (3, 2))).float()
        false_boxes = torch.cat([false_xy, false_xy + torch.from_numpy(rng.uniform(4, 16, (3, 2))).float()], 1)
        jitter = torch.from_numpy(rng.normal(0, 2.0, truth.shape)).float()
        predictions.append({
            "boxes": torch.cat([truth + jitter, false_boxes]),
            "scores": torch.from_numpy(rng.uniform(0.05, 1.0, len(labels) + 3)).float(),
            "labels": torch.cat([labels, torch.from_numpy(rng.integers(0, len(data.classes), 3))]),
        })
    return predictions


def _cocoeval_on_the_file(data: CocoDetection, predictions: list[dict]) -> tuple[float, float]:
    """Detections mapped to original pixels by hand (undo pad and scale, clip) with the file's ids, scored by
    pycocotools on the annotation file, restricted to the kept categories."""
    results = []
    for i, prediction in enumerate(predictions):
        meta = data.meta(i)
        h, w = meta.original_size
        box = meta.letterbox
        boxes = prediction["boxes"].double().numpy()
        x = np.clip((boxes[:, [0, 2]] - box.pad_x) / box.scale, 0, w)
        y = np.clip((boxes[:, [1, 3]] - box.pad_y) / box.scale, 0, h)
        for (x1, x2), (y1, y2), score, label in zip(x, y, prediction["scores"].tolist(),
                                                    prediction["labels"].tolist()):
            results.append({"image_id": meta.image_id, "category_id": data.category_ids[label],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(data.annotation_file))
        evaluator = COCOeval(truth, truth.loadRes(results), iouType="bbox")
        evaluator.params.catIds = list(data.category_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0]), float(evaluator.stats[1])


@pytest.mark.parametrize("classes", [None, ["bird", "cat"]])
def test_map_through_the_targets_equals_cocoeval_on_the_annotation_file(tmp_path, classes):
    data = _load(write_coco(tmp_path), classes=classes)
    predictions = _predictions(data)
    expected_50_95, expected_50 = _cocoeval_on_the_file(data, predictions)
    assert 0.1 < expected_50_95 < expected_50 < 1.0  # not a degenerate case

    scorer = scorer_for(TaskSpec("det", DETECTION, data.classes, data.category_ids))
    targets = [data[i][1] for i in range(len(data))]
    scorer.update(predictions[:2], targets[:2])  # in two batches, as an eval loop would
    scorer.update(predictions[2:], targets[2:])
    result = scorer.result()
    assert result["mAP50_95"] == pytest.approx(expected_50_95, abs=1e-6)
    assert result["mAP50"] == pytest.approx(expected_50, abs=1e-6)
