"""benchmark=files: the challenge bundle layout from one key, explicit paths, and a real-format run end to end
whose exported predictions an external evaluator (pycocotools) scores the same as we do."""
import contextlib
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from realdata import write_coco, write_folder, write_voc

from clmtl.config import ConfigError, load_config
from clmtl.data.files import resolve_paths
from clmtl.evaluate import evaluate_checkpoint
from clmtl.registry import strategy_schemas
from clmtl.run import run

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


def test_data_root_alone_finds_the_challenge_layout_and_explicit_keys_win(bundle, tmp_path):
    root = bundle[0]
    paths = resolve_paths(load_config(None, [f"data.root={root}"]).data)
    assert paths.seg_root == root / "mini_voc_seg" and paths.cls_root == root / "imagenette_160"
    assert paths.det_train_ann == root / "mini_coco_det" / "annotations" / "instances_train.json"
    assert paths.det_val_images == root / "mini_coco_det" / "val"
    moved = resolve_paths(load_config(None, [f"data.root={root}", f"data.det.val_ann={tmp_path}/mine.json"]).data)
    assert moved.det_val_ann == tmp_path / "mine.json" and moved.det_train_ann == paths.det_train_ann


def test_missing_paths_are_clear_errors(bundle, tmp_path):
    from clmtl.benchmark import build_benchmark

    with pytest.raises(ConfigError, match="benchmark=files: data.seg.root is not set"):
        build_benchmark(load_config(None, ["benchmark=files", *TINY]))
    with pytest.raises(ConfigError, match=f"data.det.train_ann: {tmp_path}/none.json does not exist"):
        build_benchmark(load_config(None, [f"data.root={bundle[0]}", f"data.det.train_ann={tmp_path}/none.json",
                                           *TINY]))
    with pytest.raises(ConfigError, match="data.root: .* is not a folder"):
        resolve_paths(load_config(None, [f"data.root={tmp_path}/nowhere"]).data)


def test_two_annotation_files_for_one_split_are_ambiguous(tmp_path):
    (tmp_path / "mini_coco_det" / "annotations").mkdir(parents=True)
    for name in ("instances_train2017.json", "instances_train_small.json"):
        (tmp_path / "mini_coco_det" / "annotations" / name).write_text("{}")
    with pytest.raises(ConfigError, match="several annotation files for split 'train'"):
        resolve_paths(load_config(None, [f"data.root={tmp_path}"]).data)


@pytest.fixture(scope="module")
def real_run(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("real_run")
    config = load_config(None, [f"data.root={bundle[0]}", *TINY], strategies=strategy_schemas())
    return out, run(config, "ewc", out, baselines=False)


@pytest.mark.slow
def test_a_real_format_run_goes_through_the_same_stream_and_report(real_run):
    out, results = real_run
    assert results["benchmark"] == "files"  # data.root alone selects it
    assert [t["name"] for t in results["tasks"]] == ["seg", "det", "cls"]
    assert len(results["matrix"]) == 3 and all(len(row) == 3 for row in results["matrix"])
    assert (out / "summary.md").exists() and (out / "plots" / "predictions_det.png").exists()
    assert set(results["final"]) == {"seg", "det", "cls"}


@pytest.mark.slow
def test_eval_reproduces_the_run_and_exports_predictions_external_tools_score_the_same(real_run, bundle, tmp_path):
    out, results = real_run
    _, voc, coco, folder = bundle
    metrics = evaluate_checkpoint(out / "checkpoints" / "last.pt", tmp_path)

    for task in results["tasks"]:
        name = task["name"]
        assert metrics[name][task["metric"]] == pytest.approx(results["final"][name], abs=1e-9)
    assert metrics["det"]["mAP50"] == pytest.approx(results["extra"]["final"]["det"]["mAP50"], abs=1e-9)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics

    detections = json.loads((tmp_path / "det.json").read_text())
    assert detections, "a random model at score threshold 0.01 predicts boxes"
    assert {d["category_id"] for d in detections} <= {3, 7, 42}
    assert {d["image_id"] for d in detections} <= {image["id"] for image in coco["val"].data["images"]}
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(coco["val"].annotation_file))
        evaluator = COCOeval(truth, truth.loadRes(detections), iouType="bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert metrics["det"]["mAP50_95"] == pytest.approx(max(evaluator.stats[0], 0.0), abs=1e-6)
    assert metrics["det"]["mAP50"] == pytest.approx(max(evaluator.stats[1], 0.0), abs=1e-6)

    for sample in voc.splits["val"]:
        written = np.asarray(Image.open(tmp_path / "seg" / f"{sample.id}.png"))
        assert written.shape == sample.labels.shape and written.max() < 21

    with open(tmp_path / "cls.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["file"] for row in rows) == sorted(str(path.resolve()) for path, _ in folder.files["val"])
    accuracy = np.mean([row["true_label"] == row["predicted_label"] for row in rows])
    assert metrics["cls"]["top1"] == pytest.approx(accuracy)


def test_bad_data_stops_the_run_before_it_touches_earlier_outputs(bundle, tmp_path):
    import shutil

    from clmtl.data.images import DataError

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


def test_the_cli_reports_bad_data_in_one_line(bundle, tmp_path):
    import shutil
    import subprocess
    import sys

    root = tmp_path / "bundle"
    shutil.copytree(bundle[0], root)
    (root / "mini_coco_det" / "annotations" / "instances_val.json").write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "clmtl", "run", "--out", str(tmp_path / "o"), f"data.root={root}",
                             *TINY], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "instances_val.json" in result.stderr and result.stderr.strip().count("\n") == 0
