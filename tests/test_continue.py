"""Continuing a finished run on new tasks (``clmtl continue``, ``clmtl.run(start_from=)``): the parent's rows bit for
bit, its strategy state taken over, only the new tasks trained, the old tasks read from their validation data alone,
and every bad input refused in one line with the parent's folder unchanged."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bitwise import same
from inprocess import clmtl_here
from realdata import write_folder

import clmtl
from clmtl.data.digits import main as digits_main
from clmtl.deploy.continuation import ContinueError, carried_plugin_states, output_folder_claimed
from clmtl.deploy.evaluation import evaluate_checkpoint
from clmtl.io import load_checkpoint
from clmtl.training.registry import load_strategy_file

TINY = ["data.image_size=64", "train.epochs=1", "train.batch_size=4", "output.overlays=0", "train.threads=1",
        "train.parallel_baselines=false", "strategy.replay.mem_size=8"]


def digit_task(name: str, root, classes) -> dict:
    return {"name": name, "kind": "classification", "data": {"format": "folder", "root": str(root),
                                                              "classes": list(classes)}}


def files_of(folder) -> dict:
    """Every file under ``folder``: relative path -> (SHA-256, modification time)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """Run A trains d01, d23 (ewc+replay); A's training images are then deleted, and B continues A with d45."""
    root = tmp_path_factory.mktemp("continue")
    old, new = root / "old", root / "new"
    write_folder(old, classes=("0", "1", "2", "3"), counts={"train": 4, "val": 2})
    write_folder(new, classes=("4", "5"), counts={"train": 4, "val": 2})
    parent = clmtl.run({"tasks": [digit_task("d01", old, "01"), digit_task("d23", old, "23")]}, "ewc+replay",
                       root / "A", overrides=TINY)
    shutil.rmtree(old / "train")  # weeks later: only the validation images are kept
    before = files_of(root / "A")
    child = clmtl.run({"tasks": [digit_task("d45", new, "45")]}, out=root / "B", start_from=root / "A")
    return root, parent, child, before


@pytest.mark.slow
def test_a_continuation_keeps_the_parents_rows_bit_for_bit_and_its_strategy_state(lineage):
    root, parent, child, before = lineage
    assert [task["name"] for task in child.tasks] == ["d01", "d23", "d45"] and child.strategy == "ewc+replay"
    assert child.matrix[:2] == [[*row, None] for row in parent.matrix]  # ==, not approximately
    assert child.forgetting["d01"] == child.matrix[0][0] - child.matrix[2][0]  # over the whole lineage
    assert child.bwt == -(child.forgetting["d01"] + child.forgetting["d23"]) / 2
    assert child.parent == {"run": str((root / "A").resolve()), "tasks": 2, "strategy": "ewc+replay",
                            "results_sha256": hashlib.sha256((root / "A" / "results.json").read_bytes()).hexdigest(),
                            "not_taken_over": []}
    assert set(child.train_seconds) == {"d01", "d23", "d45"} and child.train_seconds["d01"] == parent.train_seconds[
        "d01"]  # the parent's timings, kept: the continuation trained d45 only
    assert files_of(root / "A") == before and not (root / "B" / ".continuing").exists()  # the lock is released

    ours, theirs = (load_checkpoint(root / run / "checkpoints" / "last.pt") for run in ("B", "A"))
    assert ours["plugin_names"] == theirs["plugin_names"]
    ewc = ours["plugin_names"].index("MultiTaskEWCPlugin")
    for key in ("saved_params", "importances"):  # the parent's anchors and Fisher, as it left them
        assert same({k: ours["plugins"][ewc][key][k] for k in (0, 1)}, theirs["plugins"][ewc][key])
    replay = ours["plugin_names"].index("MultiTaskReplayPlugin")
    assert set(ours["plugins"][replay]["buffer.tasks"]) == {0, 1, 2}  # B never read tasks 0 and 1's training data


EXAMPLE = Path(__file__).parents[1] / "examples" / "custom_strategy.py"  # registers "mas"
MIXED = [{"name": name, "kind": kind, "data": {"format": "shapes"}}
         for name, kind in (("seg1", "seg"), ("det1", "det"), ("cls1", "cls"), ("seg2", "seg"))]
SHAPES = ["data.train_size=16", "data.val_size=8", "data.image_size=64", "train.epochs=2", "train.batch_size=4",
          "output.overlays=0", "train.threads=1", "strategy.replay.mem_size=8"]
SGD = ["train.optimizer=sgd", "train.lr=0.001", "train.weight_decay=0.01"]  # decays a zero gradient too


@pytest.mark.slow
@pytest.mark.parametrize("strategy,optimizer", [("ewc", []), ("replay", []), ("lwf", []), ("ewc+replay", []),
                                                ("mas", []), ("lwf", SGD), ("ewc", SGD),
                                                ("ewc", ["train.reset_optimizer=false"])])  # the papers' one state
def test_four_tasks_in_one_run_equal_two_then_two_more_continued(tmp_path, isolated_registry, strategy, optimizer):
    """The must-show: a run of four tasks, and a run of the first two continued with the last two, end with the
    same matrix and the same model, bit for bit (the parent's rows have no entries for the tasks it never had)."""
    load_strategy_file(EXAMPLE)
    settings = {"overrides": [*SHAPES, *optimizer], "baselines": False}
    whole = clmtl.run({"tasks": MIXED}, strategy, tmp_path / "whole", **settings)
    clmtl.run({"tasks": MIXED[:2]}, strategy, tmp_path / "first", **settings)
    then = clmtl.run({"tasks": MIXED[2:]}, out=tmp_path / "then", start_from=tmp_path / "first")
    assert then.matrix == [[None if row < 2 <= column else value for column, value in enumerate(values)]
                           for row, values in enumerate(whole.matrix)]
    assert then.matrix[3][3] != then.matrix[2][3]  # training moved the last task's score: a real comparison
    assert then.forgetting == whole.forgetting and then.bwt == whole.bwt
    ours, theirs = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("then", "whole"))
    assert same(ours["model"], theirs["model"])


@pytest.mark.slow
def test_in_the_class_scenario_too_four_tasks_equal_two_then_two_more_continued(tmp_path):
    """The shared head grows at every task, in one run as in the parent and its continuation."""
    write_folder(tmp_path / "digits", classes=tuple("01234567"), counts={"train": 6, "val": 3})
    tasks = [digit_task(f"d{pair}", tmp_path / "digits", pair) for pair in ("01", "23", "45", "67")]
    settings = {"overrides": [*TINY, "scenario=class", "train.epochs=2"], "baselines": False}
    whole = clmtl.run({"tasks": tasks}, "ewc+replay", tmp_path / "whole", **settings)
    clmtl.run({"tasks": tasks[:2]}, "ewc+replay", tmp_path / "first", **settings)
    then = clmtl.run({"tasks": tasks[2:]}, out=tmp_path / "then", start_from=tmp_path / "first")
    assert then.matrix[2:] == whole.matrix[2:] and then.bwt == whole.bwt
    ours, theirs = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("then", "whole"))
    assert ours["model"]["head.outputs.0.weight"].shape[0] == 8 and same(ours["model"], theirs["model"])


@pytest.mark.slow
def test_a_continued_run_is_evaluated_exported_resumed_and_continued_again(lineage, tmp_path):
    root, _, child, _ = lineage
    scores = evaluate_checkpoint(root / "B" / "checkpoints" / "last.pt")  # the old training images are gone
    assert {name: scores[name]["top1"] for name in scores} == child.final
    assert clmtl_here("export", "--checkpoint", root / "B" / "checkpoints" / "last.pt",
                      "--out", tmp_path / "model.pt").returncode == 0
    assert len(torch.jit.load(str(tmp_path / "model.pt"))(torch.rand(1, 3, 64, 64))) == 3  # one output per head

    (tmp_path / "more.yaml").write_text(json.dumps(
        {"tasks": [{"name": "shapes", "kind": "classification", "data": {"format": "shapes", "train_size": 8,
                                                                          "val_size": 4}}]}))
    again = clmtl_here("continue", root / "B", "--config", tmp_path / "more.yaml", "--out", tmp_path / "C")
    assert again.returncode == 0, again.stderr[-2000:]
    grandchild = clmtl.Results.load(tmp_path / "C")
    assert grandchild.matrix[:3] == [[*row, None] for row in child.matrix]
    assert grandchild.parent["run"] == str((root / "B").resolve()) and grandchild.parent["tasks"] == 3

    resumed = clmtl_here("run", "--resume", tmp_path / "C")  # a finished continuation: nothing to retrain
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert clmtl.Results.load(tmp_path / "C").to_dict() | {"total_seconds": 0} == grandchild.to_dict() | {
        "total_seconds": 0}


@pytest.mark.slow
def test_another_strategy_says_and_records_what_it_does_not_take_over(lineage, tmp_path):
    root, *_ = lineage
    (tmp_path / "new.yaml").write_text(json.dumps({"tasks": [digit_task("d4", root / "new", "4")]}))
    done = clmtl_here("continue", root / "A", "--config", tmp_path / "new.yaml", "--out", tmp_path / "lwf",
                      "--strategy", "lwf")
    assert done.returncode == 0, done.stderr[-2000:]
    notes = clmtl.Results.load(tmp_path / "lwf").parent["not_taken_over"]
    assert notes == ["LwFPlugin starts empty (the parent run had none)",
                     "MultiTaskReplayPlugin's state is dropped (the new strategy has none)",
                     "MultiTaskEWCPlugin's state is dropped (the new strategy has none)"]
    assert all(f"clmtl: {note}" in done.stdout for note in notes)


def _unfinished(run):
    (run / "results.json").unlink()


def _corrupt_results(run):
    (run / "results.json").write_text('{"matrix": [[0.5')


def _truncated_checkpoint(run):
    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.unlink()  # exp1.pt is the same file (a hard link); keep it whole
    last.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    (_unfinished, "no results.json, so the run has not finished"),
    (_corrupt_results, "results.json: not valid JSON"),
    (_truncated_checkpoint, "last.pt: not a readable checkpoint"),
])
def test_a_broken_parent_is_one_line_and_left_as_it_was(lineage, tmp_path, damage, message):
    root, *_ = lineage
    shutil.copytree(root / "A", tmp_path / "A")
    damage(tmp_path / "A")
    before = files_of(tmp_path / "A")
    (tmp_path / "new.yaml").write_text(json.dumps({"tasks": [digit_task("d4", root / "new", "4")]}))
    done = clmtl_here("continue", tmp_path / "A", "--config", tmp_path / "new.yaml", "--out", tmp_path / "out")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert files_of(tmp_path / "A") == before and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("missing parent", "no such run folder"),
    ("missing data", "does not exist"),
    ("no new task", "lists no new task"),
    ("name taken", "task name(s) d01 already in the parent run"),
    ("scenario", "was trained in the task scenario, not class"),
    ("model", "model differs from the parent run's"),
    ("image size", "data.image_size differs from the parent run's"),
    ("out is the parent", "is the parent run's folder"),
    ("out holds a run", "already holds a run"),
    ("out being written", "writes into this folder; choose another --out"),
    ("joint", "joint trains on every task's training data at once"),
])
def test_a_bad_continuation_is_one_line_and_the_parent_is_left_as_it_was(lineage, tmp_path, case, message):
    root, *_ = lineage
    parent, out, new = root / "A", tmp_path / "out", [digit_task("d4", root / "new", "4")]
    extra = {"missing parent": [], "missing data": [], "no new task": [], "name taken": [],
             "scenario": ["scenario=class"], "model": ["model.fpn_channels=32"], "image size": ["data.image_size=96"],
             "out is the parent": [], "out holds a run": [], "out being written": [],
             "joint": ["--strategy", "joint"]}[case]
    if case == "missing parent":
        parent = tmp_path / "nowhere"
    if case == "missing data":
        new = [digit_task("d4", tmp_path / "gone", "4")]
    if case == "name taken":
        new = [digit_task("d01", root / "new", "4")]
    if case == "out is the parent":
        out = parent
    if case == "out holds a run":
        out = root / "B"
    if case == "out being written":
        out.mkdir()
        (out / ".continuing").write_text(str(os.getpid()))  # a live process's continuation writes here
    (tmp_path / "new.yaml").write_text(json.dumps({"train": {"lr": 0.01}} if case == "no new task" else {"tasks": new}))
    before, out_before = files_of(root / "A"), files_of(out) if out.exists() else None
    done = clmtl_here("continue", parent, "--config", tmp_path / "new.yaml", "--out", out, *extra)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert case != "out being written" or f"another continuation (process {os.getpid()})" in done.stderr
    assert files_of(root / "A") == before
    assert (files_of(out) if out.exists() else None) == out_before


def test_plugin_states_go_to_plugins_of_the_same_class_in_order_and_the_rest_is_said():
    class A:
        pass

    class C:
        pass

    carried, notes = carried_plugin_states(["A", "B", "A"], [{"a": 1}, {"b": 2}, {"a": 3}], [A(), C(), A()])
    assert carried == [{"a": 1}, None, {"a": 3}]
    assert notes == ["B's state is dropped (the new strategy has none)"]  # C declares no state


@pytest.mark.slow
def test_moved_validation_data_is_named_and_found_again_with_continues_moved(lineage, tmp_path):
    root, parent, *_ = lineage
    shutil.copytree(root / "A", tmp_path / "A")
    old = tmp_path / "old"
    write_folder(old, classes=("0", "1", "2", "3"), counts={"train": 4, "val": 2})
    (tmp_path / "A" / "checkpoints" / "last.pt").unlink()  # the parent's config points at the module's data: move it
    saved = load_checkpoint(root / "A" / "checkpoints" / "last.pt")
    for entry in saved["config"]["tasks"]:
        entry["data"]["root"] = str(old)
    torch.save(saved, tmp_path / "A" / "checkpoints" / "last.pt")
    shutil.move(old, tmp_path / "moved")
    (tmp_path / "new.yaml").write_text(json.dumps({"tasks": [digit_task("d4", root / "new", "4")]}))
    before = files_of(tmp_path / "A")
    lost = clmtl_here("continue", tmp_path / "A", "--config", tmp_path / "new.yaml", "--out", tmp_path / "lost")
    assert lost.returncode == 2 and lost.stderr.count("\n") == 1, lost.stderr
    assert f"{old} does not exist" in lost.stderr and "continues.moved='{OLD_FOLDER: NEW_FOLDER}'" in lost.stderr
    found = clmtl_here("continue", tmp_path / "A", "--config", tmp_path / "new.yaml", "--out", tmp_path / "found",
                       f"continues.moved={{{old}: {tmp_path / 'moved'}}}")
    assert found.returncode == 0, found.stderr[-2000:]
    assert clmtl.Results.load(tmp_path / "found").matrix[:2] == [[*row, None] for row in parent.matrix]
    assert files_of(tmp_path / "A") == before


@pytest.mark.slow
def test_the_documented_commands_continue_the_two_digit_example(tmp_path, monkeypatch):
    """docs/continue.md's commands on examples/streams/, at the example's budget (one epoch learns too little for the
    new classes to show)."""
    monkeypatch.chdir(tmp_path)
    examples = Path(__file__).parents[1] / "examples" / "streams"
    assert digits_main(["data/digits"]) == 0
    first = clmtl_here("run", "--config", examples / "two_digit_tasks.yaml", "--strategy", "ewc+replay",
                       "--out", "runs/first", "--no-baselines", "train.threads=1")
    assert first.returncode == 0, first.stderr[-2000:]
    second = clmtl_here("continue", "runs/first", "--config", examples / "next_digit_task.yaml", "--out",
                        "runs/second")
    assert second.returncode == 0, second.stderr[-2000:]
    results = clmtl.Results.load("runs/second")
    assert [task["name"] for task in results.tasks] == ["d01", "d23", "d45"] and results.scenario == "class"
    assert results.matrix[:2] == [[*row, None] for row in clmtl.Results.load("runs/first").matrix]
    assert results.matrix[2][2] > 0.5  # the new digits are learnt (chance: 1/6 in the class scenario)


def test_the_output_lock_stops_a_live_writer_takes_over_a_dead_ones_and_is_released(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()  # a process id that has ended
    (tmp_path / ".continuing").write_text(dead)
    with output_folder_claimed(tmp_path):
        assert (tmp_path / ".continuing").read_text() == str(os.getpid())
        with pytest.raises(ContinueError, match=f"another continuation \\(process {os.getpid()}\\) writes"):
            with output_folder_claimed(tmp_path):
                pass
    assert not (tmp_path / ".continuing").exists()
