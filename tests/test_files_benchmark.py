"""benchmark=files: the challenge bundle layout from one key, explicit paths, and a real-format run end to end
whose exported predictions an external evaluator (pycocotools) scores the same as we do."""
import contextlib
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics.classification import MulticlassJaccardIndex
from realdata import COCO_IMAGES, write_coco, write_folder, write_voc

from clmtl.config import load_config
from clmtl.data.files import DetectionFiles, RootFiles, resolve_paths
from clmtl.deploy.evaluation import evaluate_checkpoint
from clmtl.errors import ConfigError
from clmtl.runner import run
from clmtl.training.registry import strategy_schemas

TINY = ["data.image_size=64", "train.epochs=1", "train.batch_size=2", "train.eval_batch_size=3",
        "output.overlays=1", "train.threads=1", "eval.score_threshold=0.0"]  # keep boxes of an untrained model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The challenge bundle layout: mini_voc_seg/{train,val}, mini_coco_det/{train,val}+annotations, imagenette_160."""
    root = tmp_path_factory.mktemp("bundle")
    voc = write_voc(root / "mini_voc_seg", layout="folders")
    coco = {split: write_coco(root / "mini_coco_det", split=split) for split in ("train", "val")}
    folder = write_folder(root / "imagenette_160")
    return root, voc, coco, folder


def bundle_paths(root, det: DetectionFiles | None = None):
    """What ``data.root=ROOT`` (and ``data.det.*``) resolve to."""
    return resolve_paths(str(root), RootFiles(), det or DetectionFiles(), RootFiles())


def test_data_root_alone_finds_the_challenge_layout_and_explicit_keys_win(bundle, tmp_path):
    root = bundle[0]
    paths = bundle_paths(root)
    assert paths.seg_root == root / "mini_voc_seg" and paths.cls_root == root / "imagenette_160"
    assert paths.det_train_ann == root / "mini_coco_det" / "annotations" / "instances_train.json"
    assert paths.det_val_images == root / "mini_coco_det" / "val"
    moved = bundle_paths(root, DetectionFiles(val_ann=f"{tmp_path}/mine.json"))
    assert moved.det_val_ann == tmp_path / "mine.json" and moved.det_train_ann == paths.det_train_ann


def test_missing_paths_are_clear_errors(bundle, tmp_path):
    from clmtl.stream.benchmark import build_benchmark

    with pytest.raises(ConfigError, match="benchmark=files: data.seg.root is not set"):
        build_benchmark(load_config(None, ["benchmark=files", *TINY]))
    with pytest.raises(ConfigError, match=f"data.det.train_ann: {tmp_path}/none.json does not exist"):
        build_benchmark(load_config(None, [f"data.root={bundle[0]}", f"data.det.train_ann={tmp_path}/none.json",
                                           *TINY]))
    with pytest.raises(ConfigError, match="data.root: .* is not a folder"):
        bundle_paths(tmp_path / "nowhere")


def test_two_annotation_files_for_one_split_are_ambiguous(tmp_path):
    (tmp_path / "mini_coco_det" / "annotations").mkdir(parents=True)
    for name in ("instances_train2017.json", "instances_train_small.json"):
        (tmp_path / "mini_coco_det" / "annotations" / name).write_text("{}")
    with pytest.raises(ConfigError, match="several annotation files for split 'train'"):
        bundle_paths(tmp_path)


# Detections whose COCO mAP is known by hand, on the val annotation file ``write_coco`` writes (realdata.py): non-crowd
# ground truth cat (id 3): annotations 1, 8, 12; dog (7): 3, 6 (5 is crowd); bird (42): 2, 11.
KNOWN_DETECTIONS = [  # image id, category id, bbox xywh in the file's pixels, score
    (4, 3, [4.5, 6.0, 20.0, 14.0], 0.9),  # cat: annotation 1 exactly
    (9, 3, [10.0, 40.0, 12.0, 15.0], 0.8),  # cat: annotation 8 exactly (12 is missed)
    (23, 7, [30.0, 2.0, 15.0, 15.0], 0.95),  # dog where image 23 has none: a false positive ranked first
    (9, 7, [5.0, 3.0, 20.0, 25.0], 0.7),  # dog: annotation 6 exactly (3 is missed)
]  # no bird
KNOWN_MAP = (67 / 101 + 0.5 * 51 / 101 + 0.0) / 3
"""At every IoU threshold (the boxes are exact): cat finds 2 of 3 at precision 1, so 67 of COCO's 101 recall points
(0, 0.01, ..., 0.66) score 1; dog finds 1 of 2 after a false positive, so 51 points (up to 0.5) score 0.5; bird 0."""


def _model_pixels(box: list[float], height: int, width: int, size: int = 64) -> list[float]:
    """An xywh box of a ``height x width`` image as xyxy in its letterboxed ``size``-pixel square, by hand."""
    scale = size / max(height, width)
    pad_x, pad_y = (size - round(width * scale)) // 2, (size - round(height * scale)) // 2
    x, y, w, h = box
    return [x * scale + pad_x, y * scale + pad_y, (x + w) * scale + pad_x, (y + h) * scale + pad_y]


def _known_predictions(image_ids: list[int], categories: tuple[int, ...]) -> list[dict]:
    """``KNOWN_DETECTIONS`` as a model would output them for the images ``image_ids``: model pixels, task labels."""
    sizes = {image["id"]: (image["height"], image["width"]) for image in COCO_IMAGES}
    predictions = []
    for image_id in image_ids:
        mine = [d for d in KNOWN_DETECTIONS if d[0] == image_id]
        predictions.append({
            "boxes": torch.tensor([_model_pixels(box, *sizes[image_id]) for _, _, box, _ in mine]).reshape(-1, 4),
            "scores": torch.tensor([score for *_, score in mine]),
            "labels": torch.tensor([categories.index(category) for _, category, _, _ in mine], dtype=torch.long),
        })
    return predictions


def _cocoeval(annotation_file, detections: list[dict]) -> tuple[float, float]:
    """pycocotools' (mAP50_95, mAP50) of a results list on the annotation file itself."""
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotation_file))
        evaluator = COCOeval(truth, truth.loadRes(detections), iouType="bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    return float(evaluator.stats[0]), float(evaluator.stats[1])


def test_detection_map_of_known_detections_equals_cocoeval_on_the_annotation_file_and_the_hand_value(bundle):
    from clmtl.metrics.scores import scorer_for
    from clmtl.stream.benchmark import build_benchmark

    root, _, coco, _ = bundle
    results = [{"image_id": image, "category_id": category, "bbox": box, "score": score}
               for image, category, box, score in KNOWN_DETECTIONS]
    expected = _cocoeval(coco["val"].annotation_file, results)
    assert expected == pytest.approx((KNOWN_MAP, KNOWN_MAP), abs=1e-12) and 0.3 < KNOWN_MAP < 0.31

    benchmark = build_benchmark(load_config(None, [f"data.root={root}", *TINY]))
    label = [task.kind for task in benchmark.tasks].index("detection")
    task, val = benchmark.tasks[label], benchmark.val_sets[label]
    targets = [val[i][1] for i in range(len(val))]
    image_ids = [target["image_id"] for target in targets]
    assert image_ids == [4, 9, 17, 23] and task.category_ids == (3, 7, 42)
    predictions = _known_predictions(image_ids, task.category_ids)
    scorer = scorer_for(task)
    scorer.update(predictions[:3], targets[:3])  # in batches, as evaluation feeds it
    scorer.update(predictions[3:], targets[3:])
    assert scorer.result() == pytest.approx({"mAP50_95": expected[0], "mAP50": expected[1]}, abs=1e-9)


@pytest.fixture(scope="module")
def real_run(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("real_run")
    config = load_config(None, [f"data.root={bundle[0]}", *TINY], strategies=strategy_schemas())
    return out, run(config, "ewc", out, baselines=False)


@pytest.mark.slow
def test_a_real_format_run_goes_through_the_same_stream_and_report(real_run):
    out, results = real_run
    assert results.benchmark == "files"  # data.root alone selects it
    assert [t["name"] for t in results.tasks] == ["seg", "det", "cls"]
    assert len(results.matrix) == 3 and all(len(row) == 3 for row in results.matrix)
    assert (out / "summary.md").exists() and (out / "plots" / "predictions_det.png").exists()
    assert set(results.final) == {"seg", "det", "cls"}


@pytest.mark.slow
def test_eval_reproduces_the_run_and_exports_predictions_external_tools_score_the_same(real_run, bundle, tmp_path):
    out, results = real_run
    _, voc, coco, folder = bundle
    metrics = evaluate_checkpoint(out / "checkpoints" / "last.pt", tmp_path)

    for task in results.tasks:
        name = task["name"]
        assert metrics[name][task["metric"]] == pytest.approx(results.final[name], abs=1e-9)
    assert metrics["det"]["mAP50"] == pytest.approx(results.extra["final"]["det"]["mAP50"], abs=1e-9)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics

    detections = json.loads((tmp_path / "det.json").read_text())
    assert detections, "a random model at score threshold 0.0 predicts boxes"
    assert {d["category_id"] for d in detections} <= {3, 7, 42}
    assert {d["image_id"] for d in detections} <= {image["id"] for image in coco["val"].data["images"]}
    external = _cocoeval(coco["val"].annotation_file, detections)
    assert min(external) >= 0  # defined (the file has ground truth): no -1 to hide
    assert (metrics["det"]["mAP50_95"], metrics["det"]["mAP50"]) == pytest.approx(external, abs=1e-6)

    jaccard = MulticlassJaccardIndex(num_classes=21, average="macro", ignore_index=255)
    for sample in voc.splits["val"]:
        written = np.asarray(Image.open(tmp_path / "seg" / f"{sample.id}.png"))
        assert written.shape == sample.labels.shape and written.max() < 21
        jaccard.update(torch.from_numpy(written).long()[None], torch.from_numpy(sample.labels).long()[None])
    assert metrics["seg"]["mIoU"] == pytest.approx(float(jaccard.compute()), abs=1e-6)  # at the files' resolution

    with open(tmp_path / "cls.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["file"] for row in rows) == sorted(str(path.resolve()) for path, _ in folder.files["val"])
    accuracy = np.mean([row["true_label"] == row["predicted_label"] for row in rows])
    assert metrics["cls"]["top1"] == pytest.approx(accuracy)


@pytest.mark.slow
def test_eval_exports_known_detections_that_cocoeval_scores_as_we_do(real_run, bundle, tmp_path, monkeypatch):
    """The trained model's detections score near 0, where agreement proves little: here the checkpoint's evaluation
    decodes to ``KNOWN_DETECTIONS`` instead, so the exported det.json must hold them in the file's pixels and ids, and
    both scores must be the hand value."""
    import clmtl.deploy.evaluation

    out, _ = real_run
    coco = bundle[2]
    queue = _known_predictions([4, 9, 17, 23], (3, 7, 42))  # the val images in the order evaluation reads them

    def known(config, model):
        def decode(raw):
            return [queue.pop(0) for _ in range(len(raw[0]))]
        return decode

    monkeypatch.setattr(clmtl.deploy.evaluation, "make_decoder", known)
    metrics = evaluate_checkpoint(out / "checkpoints" / "last.pt", tmp_path)
    assert not queue
    assert metrics["det"] == pytest.approx({"mAP50_95": KNOWN_MAP, "mAP50": KNOWN_MAP}, abs=1e-9)
    detections = json.loads((tmp_path / "det.json").read_text())
    assert sorted((d["image_id"], d["category_id"]) for d in detections) == sorted(k[:2] for k in KNOWN_DETECTIONS)
    for detection in detections:
        key = (detection["image_id"], detection["category_id"])
        _, _, box, score = next(known for known in KNOWN_DETECTIONS if known[:2] == key)
        assert detection["bbox"] == pytest.approx(box, abs=1e-4)  # back in the file's pixels
        assert detection["score"] == pytest.approx(score, abs=1e-6)
    assert _cocoeval(coco["val"].annotation_file, detections) == pytest.approx((KNOWN_MAP, KNOWN_MAP), abs=1e-9)


def test_bad_data_stops_the_run_before_it_touches_earlier_outputs(bundle, tmp_path):
    import shutil

    from clmtl.errors import DataError

    root = tmp_path / "bundle"
    shutil.copytree(bundle[0], root)
    broken = next((root / "imagenette_160" / "val").rglob("*.png"))
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": "run"}')
    (out / "metrics.csv").write_text("metric,x,value\n")
    config = load_config(None, [f"data.root={root}", *TINY], strategies=strategy_schemas())
    with pytest.raises(DataError, match=broken.name):
        run(config, "naive", out, baselines=False)
    assert (out / "results.json").read_text() == '{"earlier": "run"}'
    assert (out / "metrics.csv").read_text() == "metric,x,value\n"


def test_the_cli_reports_bad_data_in_one_line(bundle, tmp_path, clmtl_cli):
    import shutil

    root = tmp_path / "bundle"
    shutil.copytree(bundle[0], root)
    (root / "mini_coco_det" / "annotations" / "instances_val.json").write_text("{not json")
    result = clmtl_cli("run", "--out", tmp_path / "o", f"data.root={root}", *TINY)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "instances_val.json" in result.stderr and result.stderr.strip().count("\n") == 0


def test_segmentation_is_scored_at_each_files_resolution_the_resolution_of_its_exports(bundle, tmp_path):
    from clmtl.builders import build_model
    from clmtl.deploy.evaluation import PredictionWriter, evaluate_task
    from clmtl.metrics.scores import MeanIoU
    from clmtl.stream.benchmark import build_benchmark

    root, voc, _, _ = bundle
    config = load_config(None, [f"data.root={root}", *TINY])
    benchmark = build_benchmark(config)
    label = [task.kind for task in benchmark.tasks].index("segmentation")
    task, val = benchmark.tasks[label], benchmark.val_sets[label]
    model = build_model(config, benchmark.tasks)
    mixing = torch.randn(21, 3, generator=torch.Generator().manual_seed(0))
    model.forward = lambda x, head: torch.einsum("bchw,kc->bkhw", x, mixing)  # predictions follow the colour blocks
    reported = evaluate_task(model, task, val, config, PredictionWriter(task, model.spaces[label], val, tmp_path))

    jaccard = MulticlassJaccardIndex(num_classes=21, average="macro", ignore_index=255)
    for sample in voc.splits["val"]:
        written = torch.from_numpy(np.asarray(Image.open(tmp_path / task.name / f"{sample.id}.png"))).long()
        jaccard.update(written[None], torch.from_numpy(sample.labels).long()[None])
    assert reported["mIoU"] == pytest.approx(float(jaccard.compute()), abs=1e-6)

    at_model = MeanIoU(21)  # what scoring at the model's resolution gives: another number
    for i in range(len(val)):
        image, target = val[i]
        at_model.update(model(image[None], label), target[None])
    assert at_model.result()["mIoU"] != pytest.approx(reported["mIoU"], rel=0.05)
