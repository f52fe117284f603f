"""General streams: any number of tasks of any kind from real files or shapes, in the task, class and domain
scenarios, trained, evaluated and reproduced by ``clmtl eval``; and every bad stream refused in one line."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from realdata import write_folder, write_voc

from clmtl.cli import main
from clmtl.config import load_config
from clmtl.data.shapes import make_shapes_dataset
from clmtl.data.sources import LoadOptions, load_task
from clmtl.deploy.evaluation import evaluate_checkpoint
from clmtl.errors import ConfigError
from clmtl.io import load_checkpoint
from clmtl.runner import run
from clmtl.stream.benchmark import build_benchmark, split_entries
from clmtl.training.registry import strategy_schemas

TINY = ["data.image_size=64", "data.train_size=12", "data.val_size=6", "train.epochs=1", "train.batch_size=4",
        "output.overlays=0", "train.threads=1", "train.parallel_baselines=false"]
EXAMPLE = """
scenario: {scenario}
tasks:
  - {{name: d01, kind: classification, data: {{format: folder, root: data/mnist, classes: ["0", "1"]}}}}
  - {{name: d23, kind: classification, data: {{format: folder, root: data/mnist, classes: ["2", "3"]}}}}
"""


def config_of(tmp_path: Path, text: str, overrides=()):
    path = tmp_path / "stream.yaml"
    path.write_text(text)
    return load_config(path, [*TINY, *overrides], strategies=strategy_schemas())


@pytest.fixture
def digits_folder(tmp_path, monkeypatch):
    """Class folders 0-3 at data/mnist, relative to the working directory, as the documented example reads them."""
    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "data" / "mnist", classes=("0", "1", "2", "3"), counts={"train": 3, "val": 2})
    return tmp_path


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_the_documented_example_runs_in_the_class_and_task_scenarios(digits_folder, scenario):
    config = config_of(digits_folder, EXAMPLE.format(scenario=scenario))
    results = run(config, "naive", digits_folder / "out", baselines=False)
    assert results.scenario == scenario and results.benchmark == "folder"
    placed = [(task["name"], task["head"], task["labels"]) for task in results.tasks]
    heads = load_checkpoint(digits_folder / "out" / "checkpoints" / "last.pt")["model"]
    if scenario == "class":
        assert placed == [("d01", 0, [0, 1]), ("d23", 0, [2, 3])]
        assert heads["head.outputs.0.weight"].shape == (4, 64) and "head.outputs.1.weight" not in heads
        assert results.matrix[0][1] == 0.0  # before d23 is trained, its digits cannot be predicted at all
    else:
        assert placed == [("d01", 0, [0, 1]), ("d23", 1, [0, 1])]
        assert heads["head.outputs.0.weight"].shape == heads["head.outputs.1.weight"].shape == (2, 64)
    assert len(results.matrix) == 2 and all(len(row) == 2 for row in results.matrix)
    assert results.average_accuracy == pytest.approx(sum(results.matrix[-1]) / 2)
    evaluated = evaluate_checkpoint(digits_folder / "out" / "checkpoints" / "last.pt")
    assert {name: scores["top1"] for name, scores in evaluated.items()} == results.final


def test_the_domain_scenario_shares_one_head_of_the_same_classes(tmp_path):
    for domain in ("photos", "sketches"):
        write_folder(tmp_path / domain, classes=("cat", "dog"), counts={"train": 3, "val": 2})
    text = f"""
scenario: domain
tasks:
  - {{name: photos, kind: cls, data: {{format: folder, root: {tmp_path / 'photos'}}}}}
  - {{name: sketches, kind: cls, data: {{format: folder, root: {tmp_path / 'sketches'}}}}}
"""
    results = run(config_of(tmp_path, text), "ewc", tmp_path / "out", baselines=False)
    assert [(task["head"], task["labels"]) for task in results.tasks] == [(0, [0, 1]), (0, [0, 1])]
    assert load_checkpoint(tmp_path / "out" / "checkpoints" / "last.pt")["model"]["head.outputs.0.weight"].shape == (
        2, 64)


MIXED = """
tasks:
  - seg
  - {name: cls_a, kind: classification, data: {format: shapes, classes: [heart, arrow]}}
  - det
  - {name: cls_b, kind: classification, data: {format: shapes, classes: [semicircle, l_shape, frame]}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["task", "class"])
def test_a_mixed_stream_with_repeated_kinds_is_reproduced_by_clmtl_eval(tmp_path, scenario):
    config = config_of(tmp_path, MIXED, [f"scenario={scenario}"])
    results = run(config, "ewc+replay+lwf", tmp_path / "out")
    assert [task["name"] for task in results.tasks] == ["seg", "cls_a", "det", "cls_b"]
    assert len(results.matrix) == 4 and all(len(row) == 4 and None not in row for row in results.matrix)
    assert set(results.baseline) == {"seg", "cls_a", "det", "cls_b"}
    assert [task["head"] for task in results.tasks] == ([0, 1, 2, 3] if scenario == "task" else [0, 1, 2, 1])
    evaluated = evaluate_checkpoint(tmp_path / "out" / "checkpoints" / "last.pt", tmp_path / "predictions")
    for task in results.tasks:
        assert evaluated[task["name"]][task["metric"]] == results.final[task["name"]], task["name"]
    assert {p.name for p in (tmp_path / "predictions").iterdir()} == {"seg", "cls_a.csv", "det.json", "cls_b.csv",
                                                                      "metrics.json"}


def test_class_incremental_detection_grows_its_head_and_scores_each_tasks_classes(tmp_path):
    text = """
scenario: class
tasks:
  - {name: det_a, kind: detection, data: {format: shapes, classes: [cross, star], keep_empty: false}}
  - {name: det_b, kind: detection, data: {format: shapes, classes: [hexagon, crescent], keep_empty: false}}
"""
    config = config_of(tmp_path, text)
    benchmark = build_benchmark(config)
    for dataset, allowed in zip(benchmark.val_sets, ({0, 1}, {2, 3})):  # iOD: a task's images carry its boxes only
        labels = [set(dataset[i][1]["labels"].tolist()) for i in range(len(dataset))]
        assert all(present and present <= allowed for present in labels)
    results = run(config, "naive", tmp_path / "out", baselines=False)
    model = load_checkpoint(tmp_path / "out" / "checkpoints" / "last.pt")["model"]
    assert model["head.outputs.0.weight"].shape == (3, 5 + 4, 64)
    assert load_checkpoint(tmp_path / "out" / "checkpoints" / "exp0.pt")["model"]["head.outputs.0.weight"].shape == (
        3, 5 + 2, 64)
    evaluated = evaluate_checkpoint(tmp_path / "out" / "checkpoints" / "last.pt")
    assert {name: scores["mAP50_95"] for name, scores in evaluated.items()} == results.final


def test_class_scenario_segmentation_labels_other_tasks_classes_as_background(tmp_path):
    """MiB/PLOP: a task's masks keep its own classes (in the shared head's labels) and make every other class
    background; void stays void. Checked against the written masks, pixel by pixel."""
    written = write_voc(tmp_path / "voc")
    present = sorted({int(c) for s in written.splits["train"] + written.splits["val"] for c in
                      set(s.labels.flatten().tolist()) - {0, 255}})
    first, second = present[:2], present[2:4]
    names = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
             "tvmonitor")
    root = tmp_path / "voc"
    text = f"""
scenario: class
tasks:
  - {{name: a, kind: segmentation, data: {{format: voc, root: {root}, classes: {[names[c] for c in first]}}}}}
  - {{name: b, kind: segmentation, data: {{format: voc, root: {root}, classes: {[names[c] for c in second]}}}}}
"""
    config = config_of(tmp_path, text, ["data.image_size=64"])
    benchmark = build_benchmark(config)
    b = benchmark.tasks[1]
    assert b.labels == (0, 3, 4)  # after a's two classes in the shared head
    dataset = benchmark.val_sets[1]
    for i in range(len(dataset)):
        mask = dataset[i][1]
        source = dataset.dataset.dataset[dataset.dataset.indices[i]][1]  # the loader's own letterboxed mask
        expected = torch.zeros_like(source)
        expected[source == 255] = 255
        for label, voc_class in zip((3, 4), second):
            expected[source == voc_class] = label
        assert torch.equal(mask, expected)


def test_split_deals_classes_into_tasks_with_disjoint_sets():
    config = load_config(None, ["split={kind: cls, data: {format: shapes}, experiences: 2}"])
    entries = split_entries(config.split, seed=0)
    assert [(e.name, e.data.classes) for e in entries] == [("cls1", ["heart", "arrow", "semicircle"]),
                                                           ("cls2", ["l_shape", "frame"])]
    config = load_config(None, ["split={kind: seg, data: {format: shapes}, experiences: [1, 3], class_order: seed}"])
    shuffled = split_entries(config.split, seed=3)
    dealt = [name for entry in shuffled for name in entry.data.classes]
    assert sorted(dealt) == ["disk", "ring", "square", "triangle"] and [len(e.data.classes) for e in shuffled] == [1, 3]
    assert dealt == [name for entry in split_entries(config.split, seed=3) for name in entry.data.classes]
    assert dealt != [name for entry in split_entries(config.split, seed=4) for name in entry.data.classes]


@pytest.mark.parametrize("setting", [None, "overlapped", "disjoint"])
def test_the_segmentation_settings_pick_each_steps_training_images_as_the_literature_does(setting):
    config = load_config(None, [f"split={{kind: seg, data: {{format: shapes}}, experiences: [2, 1, 1], "
                                f"setting: {setting or 'null'}}}"])
    names = ("background", "disk", "square", "triangle", "ring")
    options = LoadOptions(image_size=64, seed=0, shapes_train_size=60, shapes_val_size=30)
    every = make_shapes_dataset("segmentation", "train", 60, 64, 0)  # what each step draws its images from
    for step, entry in enumerate(split_entries(config.split, seed=0)):
        own = {names.index(name) for name in entry.data.classes}
        later = {names.index(name) for later in split_entries(config.split, seed=0)[step + 1:]
                 for name in later.data.classes}
        expected = [i for i in range(len(every)) if setting is None or (
            set(every[i][1].unique().tolist()) & own
            and not (setting == "disjoint" and set(every[i][1].unique().tolist()) & later))]
        data = load_task(entry.name, "segmentation", entry.data, options)
        assert data.train.indices == expected  # overlapped: a class of the step; disjoint: and none still to come
        shown = {label for i in range(len(data.val)) for label in data.val[i][1].unique().tolist()}
        assert shown <= {0, *range(1, len(own) + 1), 255}  # other classes' pixels are background
        if setting == "disjoint" and later:
            overlapped = load_task(entry.name, "segmentation", dataclasses.replace(entry.data, exclude=None), options)
            assert len(data.train) < len(overlapped.train) and len(data.val) == len(overlapped.val)


def test_a_setting_is_refused_on_a_split_of_another_kind_and_exclude_needs_classes():
    with pytest.raises(ConfigError, match="setting 'disjoint' is a segmentation split's; this split is 'det'"):
        load_config(None, ["split={kind: det, data: {format: shapes}, experiences: 2, setting: disjoint}"])
    source = load_config(None, ["tasks=[{name: a, kind: seg, data: {exclude: [ring]}}]"]).tasks[0].data
    with pytest.raises(ConfigError, match="data.exclude drops images of classes outside the task's; it needs"):
        load_task("a", "segmentation", source, LoadOptions(image_size=64, seed=0))


BAD = {
    "duplicate names": ("tasks:\n  - {name: a, kind: cls}\n  - {name: a, kind: det}\n",
                        "tasks: duplicate task name(s) a"),
    "unknown kind": ("tasks:\n  - {name: a, kind: depth}\n", "tasks[0].kind: must be one of segmentation"),
    "unknown format": ("tasks:\n  - {name: a, kind: cls, data: {format: imagenet}}\n",
                       "tasks[0].data.format: must be one of shapes, coco, voc, folder, torchvision"),
    "unknown class": ("tasks:\n  - {name: a, kind: cls, data: {format: shapes, classes: [heart, cube]}}\n",
                      "task 'a': shapes classification: no class named ['cube']"),
    "empty class list": ("tasks:\n  - {name: a, kind: cls, data: {format: shapes, classes: []}}\n",
                         "task 'a': shapes classification: the class list is empty"),
    "overlapping classes": ("scenario: class\ntasks:\n  - {name: a, kind: cls, data: {classes: [heart, arrow]}}\n"
                            "  - {name: b, kind: cls, data: {classes: [arrow, frame]}}\n",
                            "scenario class: tasks 'a' and 'b' (classification) both have class 'arrow'"),
    "domain classes differ": ("scenario: domain\ntasks:\n  - {name: a, kind: cls, data: {classes: [heart, arrow]}}\n"
                              "  - {name: b, kind: cls, data: {classes: [frame, arrow]}}\n",
                              "scenario domain: tasks 'a' and 'b' (classification) have different classes"),
    "split too fine": ("split: {kind: cls, data: {format: shapes}, experiences: 6}\n",
                       "split: 6 experiences, but the data has 5 classes"),
    "routing on shared heads": ("scenario: class\nsplit: {kind: cls, data: {format: shapes}, experiences: 2}\n",
                                "strategy routing keeps state per task"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_stream_is_one_line_naming_the_problem_and_nothing_is_written(tmp_path, capsys, case):
    text, message = BAD[case]
    (tmp_path / "bad.yaml").write_text(text)
    out = tmp_path / "out"
    strategy = "routing" if case == "routing on shared heads" else "naive"
    code = main(["run", "--config", str(tmp_path / "bad.yaml"), "--strategy", strategy, "--out", str(out), *TINY])
    stderr = capsys.readouterr().err
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("clmtl: error: ") and message in stderr, stderr
    assert not out.exists()


def test_yaml_entries_round_trip_through_a_saved_config(tmp_path):
    """A checkpoint stores the config as a dict; reading it back gives the same stream."""
    config = config_of(tmp_path, MIXED)
    again = load_config(None, [], strategies=strategy_schemas(), base=yaml.safe_load(
        yaml.safe_dump(json.loads(json.dumps(config.to_dict())))))
    assert again == config
