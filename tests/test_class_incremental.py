"""benchmarks/class_incremental.py: old / new / all from a hand-made matrix, a tiny run of the whole script whose
table rows equal what its runs' results hold, and a VOC setting on files in VOC's own layout."""
import csv
import json

import pytest
from benchmark_scripts import load_benchmark
from realdata import write_voc

from clmtl.data.voc import VOC_CLASSES

script = load_benchmark("class_incremental")


def test_old_is_the_first_task_new_the_later_ones_all_every_task_and_steps_average_the_tasks_so_far():
    matrix = [[0.9, 0.0, 0.0], [0.5, 0.8, 0.0], [0.3, 0.4, 0.7]]
    run = {"matrix": matrix, "tasks": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
           "extra": {"final": {"a": {"mAP50": 0.6, "mIoU_fg": 0.1}, "b": {"mAP50": 0.5, "mIoU_fg": 0.2},
                               "c": {"mAP50": 0.9, "mIoU_fg": 0.3}}}}
    assert script.old_new_all(script.final_scores(run, "cls")) == pytest.approx((0.3, 0.55, 1.4 / 3))
    assert script.final_scores(run, "det") == [0.6, 0.5, 0.9]  # detection's table reads mAP50, as its literature
    assert script.final_scores(run, "seg") == [0.1, 0.2, 0.3]  # segmentation's the foreground classes' mIoU
    assert script.all_per_step(matrix) == pytest.approx([0.9, 0.65, 1.4 / 3])


@pytest.mark.parametrize("setting,kind,steps", [
    ("voc-15-1", "segmentation", [15, 1, 1, 1, 1, 1]), ("voc-10-1", "segmentation", [10] + [1] * 10),
    ("voc-15-5", "segmentation", [15, 5]), ("voc-det-19-1", "detection", [19, 1]),
    ("voc-det-10-10", "detection", [10, 10]), ("voc-det-15-5", "detection", [15, 5])])
def test_the_voc_settings_are_the_literatures_splits(setting, kind, steps):
    from clmtl.config import load_config

    _, overrides, _ = script.SETTINGS[setting]
    config = load_config(None, [item.replace("ROOT", "/data/VOC") for item in overrides])
    assert (config.scenario, config.split.kind, config.split.experiences) == ("class", kind, steps)
    assert config.split.setting == ("overlapped" if kind == "segmentation" else None)
    assert config.split.data.format == ("voc" if kind == "segmentation" else "coco")


def test_a_voc_setting_without_its_root_is_one_line(capsys):
    with pytest.raises(SystemExit):
        script.main(["--setting", "voc-15-1"])
    assert "setting voc-15-1 reads its data at --root" in capsys.readouterr().err


@pytest.mark.slow
def test_the_script_writes_a_table_of_its_runs(tmp_path):
    out = tmp_path / "ci"
    assert script.main(["--kind", "seg", "--strategies", "naive,replay", "--seeds", "0,1", "--out", str(out),
                        "--jobs", "1", "data.image_size=64", "data.train_size=16", "data.val_size=12",
                        "train.epochs=1", "train.batch_size=4", "output.overlays=0"]) == 0
    with open(out / "table.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["kind"], row["setting"], row["strategy"], row["seeds"]) for row in rows] == [
        ("seg", "shapes-seg-2-1-1", "naive", "2"), ("seg", "shapes-seg-2-1-1", "replay", "2")]
    for row in rows:
        runs = [json.loads((out / f"seed{seed}" / row["strategy"] / "results.json").read_text()) for seed in (0, 1)]
        assert [len(run["matrix"]) for run in runs] == [3, 3] and runs[0]["scenario"] == "class"
        expected = [sum(script.old_new_all(script.final_scores(run, "seg"))[i] for run in runs) / 2 for i in range(3)]
        assert [float(row[name]) for name in ("old", "new", "all")] == pytest.approx(expected, abs=1e-4)
    assert (out / "plots" / "steps.png").stat().st_size > 0 and "| replay | 2 |" in (out / "table.md").read_text()


@pytest.mark.slow
def test_a_voc_setting_runs_on_files_in_vocs_own_layout(tmp_path):
    """voc-15-5 on a small folder in VOC's layout (JPEGImages, SegmentationClass, ImageSets): 15 classes, then the
    last 5 in one head that grows to 21 outputs."""
    samples = {"train": [(f"2007_{i:06d}", (48, 48)) for i in range(30)],
               "val": [(f"2008_{i:06d}", (48, 48)) for i in range(16)]}
    root = write_voc(tmp_path / "VOC2012", samples=samples).root
    out = tmp_path / "ci"
    assert script.main(["--setting", "voc-15-5", "--root", str(root), "--strategies", "naive,mib", "--seeds", "0",
                        "--out", str(out), "--jobs", "1", "data.image_size=64", "train.epochs=1",
                        "train.batch_size=8", "output.overlays=0"]) == 0
    with open(out / "table.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["kind"], row["setting"], row["strategy"]) for row in rows] == [
        ("seg", "voc-15-5", "naive"), ("seg", "voc-15-5", "mib")]
    run = json.loads((out / "seed0" / "mib" / "results.json").read_text())
    assert [task["labels"] for task in run["tasks"]] == [list(range(16)), [0, *range(16, 21)]]
    assert [task["classes"][1:] for task in run["tasks"]] == [list(VOC_CLASSES[1:16]), list(VOC_CLASSES[16:])]
