"""Export: the TorchScript and ONNX files reproduce the eager forward_all; ONNX without its packages fails clearly."""
import importlib.util
import json

import pytest
import torch
from test_fuse import randomise_batchnorm, randomised_model

from clmtl.data.shapes import shapes_task
from clmtl.deploy.export import export_model, load_metadata
from clmtl.stream.tasks import TASK_KINDS

SIZE = 64
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is deprecated in torch 2.14


STREAM = ("det", "cls", "seg")
"""Stream order det, cls, seg: the export's order (seg, cls, det levels) must not depend on it."""
TASKS = [shapes_task(TASK_KINDS[name], name) for name in STREAM]


@pytest.fixture(scope="module")
def model():
    return randomised_model(STREAM, SIZE)


def test_torchscript_round_trip_gives_the_eager_outputs(model, tmp_path):
    path = export_model(model, tmp_path / "model.pt", "torchscript", tasks=TASKS, image_size=SIZE)
    loaded = torch.jit.load(str(path))
    generator = torch.Generator().manual_seed(3)
    # the traced size, then another batch size and side: shapes are traced symbolically
    for batch, side in ((1, SIZE), (2, 2 * SIZE)):
        x = torch.rand(batch, 3, side, side, generator=generator)
        with torch.no_grad():
            got = loaded(x)
            eager = model.forward_all(x)  # labels: 0 det, 1 cls, 2 seg
        expected = [eager[2], eager[1], *eager[0]]
        assert len(got) == len(expected) == 5
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, atol=1e-4, rtol=0)
    metadata = load_metadata(path)
    assert metadata["outputs"] == ["seg", "cls", "det_stride8", "det_stride16", "det_stride32"]
    assert [t["name"] for t in metadata["tasks"]] == ["det", "cls", "seg"]
    assert metadata["anchor_layout"]["strides"] == [8, 16, 32]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the model itself stays unfolded


@pytest.mark.slow
@pytest.mark.xdist_group("onnx")  # one worker pays the ONNX exporter's first-call cost once
def test_onnx_round_trip_in_onnxruntime_gives_the_eager_outputs(model, tmp_path):
    import onnxruntime

    path = export_model(model, tmp_path / "model.onnx", "onnx", tasks=TASKS, image_size=SIZE)
    session = onnxruntime.InferenceSession(str(path))
    metadata = json.loads(session.get_modelmeta().custom_metadata_map["clmtl.json"])
    assert [o.name for o in session.get_outputs()] == metadata["outputs"]
    assert [t["name"] for t in metadata["tasks"]] == ["det", "cls", "seg"]
    generator = torch.Generator().manual_seed(4)
    for batch in (1, 3):  # the batch dimension is dynamic
        x = torch.rand(batch, 3, SIZE, SIZE, generator=generator)
        got = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            eager = model.forward_all(x)
        expected = [eager[2], eager[1], *eager[0]]
        assert len(got) == len(expected) == 5
        for g, e in zip(got, expected):
            torch.testing.assert_close(torch.from_numpy(g), e, atol=1e-4, rtol=0)


def test_onnx_without_its_packages_names_them(model, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"needs the Python package\(s\) onnx\b.*pip install onnx"):
        export_model(model, tmp_path / "model.onnx", "onnx", tasks=TASKS, image_size=SIZE)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("format, size, message", [("tflite", 64, "format must be one of"),
                                                   ("torchscript", 80, "multiple of 32"),
                                                   ("torchscript", 32, "at least 64")])
def test_bad_format_or_size_is_refused(model, tmp_path, format, size, message):
    with pytest.raises(ValueError, match=message):
        export_model(model, tmp_path / "model", format, tasks=TASKS, image_size=size)


def run_checkpoint(path, tasks=None, backbone="yolov8n"):
    """A checkpoint as ``clmtl run`` writes it (plus ``tasks`` when given); returns the eval-mode model saved."""
    from clmtl.builders import build_model
    from clmtl.config import load_config
    from clmtl.io import atomic_torch_save
    from clmtl.stream.benchmark import build_benchmark

    config = load_config(None, [f"data.image_size={SIZE}", "data.train_size=2", "data.val_size=2",
                                f"model.backbone={backbone}"])
    model = build_model(config, tasks or build_benchmark(config).tasks)
    randomise_batchnorm(model, seed=5)
    checkpoint = {"model": model.state_dict(), "experience": 2, "matrix": [], "config": config.to_dict(),
                  "strategy": "naive"}
    if tasks is not None:
        checkpoint["tasks"] = [task.as_dict() for task in tasks]
    atomic_torch_save(checkpoint, path)
    return model.eval()


@pytest.mark.parametrize("with_tasks", [False, True])
def test_checkpoint_export_rebuilds_the_run_model(tmp_path, with_tasks):
    from clmtl.deploy.export import export_checkpoint
    from clmtl.stream.tasks import TaskSpec

    # tasks the shapes benchmark does not have: only a checkpoint's own task list can rebuild this model
    tasks = [TaskSpec("seg", "segmentation", ("bg", "a")), TaskSpec("det", "detection", ("x", "y", "z", "w")),
             TaskSpec("cls", "classification", ("p", "q"))] if with_tasks else None
    model = run_checkpoint(tmp_path / "last.pt", tasks)
    path = export_checkpoint(tmp_path / "last.pt", tmp_path / "model.pt")
    loaded = torch.jit.load(str(path))
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        got, eager = loaded(x), model.forward_all(x)
    for g, e in zip(got, [eager[0], eager[2], *eager[1]]):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=0)
    assert load_metadata(path)["input"]["shape"] == [1, 3, SIZE, SIZE]


def test_a_file_that_is_not_a_run_checkpoint_is_named(tmp_path):
    from clmtl.deploy.export import export_checkpoint

    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: not a clmtl run checkpoint"):
        export_checkpoint(tmp_path / "other.pt", tmp_path / "model.pt")


def test_checkpoint_export_keeps_the_runs_backbone(tmp_path):
    from clmtl.deploy.export import export_checkpoint

    model = run_checkpoint(tmp_path / "last.pt", backbone="mobilenet_v3_small")
    path = export_checkpoint(tmp_path / "last.pt", tmp_path / "model.pt")
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        got, eager = torch.jit.load(str(path))(x), model.forward_all(x)
    torch.testing.assert_close(got[0], eager[0], atol=1e-4, rtol=0)


# --- a malformed task list in a checkpoint: one line naming the file, from the function and from the command ----

CUSTOM_TASKS = [("seg", "segmentation", ("bg", "a")), ("det", "detection", ("x", "y", "z", "w")),
                ("cls", "classification", ("p", "q"))]


@pytest.fixture(scope="module")
def saved_with_tasks(tmp_path_factory):
    """A run checkpoint with its own task list (tasks the shapes benchmark does not have), as loaded."""
    from clmtl.stream.tasks import TaskSpec

    path = tmp_path_factory.mktemp("checkpoint") / "last.pt"
    run_checkpoint(path, [TaskSpec(*task) for task in CUSTOM_TASKS])
    return torch.load(path, weights_only=True)


def _entry(index, **changes):
    """Change entry ``index`` of the task list (a value of None drops the key)."""
    def change(tasks):
        entry = {key: value for key, value in {**tasks[index], **changes}.items() if value is not None}
        return tasks[:index] + [entry] + tasks[index + 1:]
    return change


@pytest.mark.parametrize("change, problem", [
    (lambda tasks: {"seg": tasks[0]}, "'tasks' must be a non-empty list of task entries, got dict"),
    (lambda tasks: [], "'tasks' must be a non-empty list of task entries, got an empty list"),
    (lambda tasks: [tasks[0], "det", tasks[2]], r"tasks\[1\] must be a mapping, got str 'det'"),
    (_entry(1, kind=None), r"tasks\[1\] has no 'kind'"),
    (_entry(0, name=None, classes=None), r"tasks\[0\] has no 'name', 'classes'"),
    (_entry(1, kind="depth"), r"tasks\[1\]: task 'det': unknown kind 'depth'; expected one of"),
    (_entry(1, kind=3), r"tasks\[1\]\.kind must be a string, got 3"),
    (_entry(1, labels=[0, 1]), r"tasks\[1\]: task 'det': 2 head labels for 4 classes"),
    (_entry(1, category_ids=[1, 2]), r"tasks\[1\]: task 'det': 2 category ids for 4 classes"),
    (_entry(2, classes="pq"), r"tasks\[2\]\.classes must be a list of str, got 'pq'"),  # not the classes p and q
    (_entry(2, classes=[]), r"tasks\[2\]: task 'cls': needs at least one class"),
    (_entry(2, labels=[0, "1"]), r"tasks\[2\]\.labels must be a list of int, got \[0, '1'\]"),
    (_entry(2, head="2"), r"tasks\[2\]\.head must be a head index \(int >= 0\), got '2'"),
    (_entry(2, head=-1), r"tasks\[2\]\.head must be a head index \(int >= 0\), got -1"),
])
def test_a_malformed_task_list_is_one_line_naming_the_checkpoint(saved_with_tasks, tmp_path, capsys, monkeypatch,
                                                                 change, problem):
    import copy
    import re

    from clmtl.cli import main
    from clmtl.deploy.export import export_checkpoint

    monkeypatch.delenv("CLMTL_DEBUG", raising=False)
    saved = copy.deepcopy(saved_with_tasks)
    saved["tasks"] = change(saved["tasks"])
    bad = tmp_path / "bad.pt"
    torch.save(saved, bad)
    with pytest.raises(ValueError, match=f"^{re.escape(str(bad))}: {problem}"):
        export_checkpoint(bad, tmp_path / "model.pt")
    assert main(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "model.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clmtl: error: {bad}: ") and err.count("\n") == 1
    assert not (tmp_path / "model.pt").exists()


def test_the_intact_task_list_gives_its_tasks(saved_with_tasks, tmp_path):
    from clmtl.stream.tasks import TaskSpec
    from clmtl.training.checkpoint import checkpoint_tasks

    expected = [TaskSpec(*task) for task in CUSTOM_TASKS]
    assert checkpoint_tasks(saved_with_tasks["tasks"], tmp_path / "last.pt") == expected
    old = [{key: value for key, value in entry.items() if key not in ("head", "labels")}
           for entry in saved_with_tasks["tasks"]]  # without head (its position) and labels
    assert checkpoint_tasks(old, "old.pt") == [TaskSpec(*task, head=head) for head, task in enumerate(CUSTOM_TASKS)]


def test_eval_scores_the_tasks_of_the_checkpoints_config_and_never_reads_its_task_list(tmp_path, capsys):
    """``clmtl eval`` rebuilds the benchmark, tasks included, from the saved config (``evaluate_checkpoint``): a
    malformed ``tasks`` entry cannot reach it, so the metrics are those of the intact checkpoint."""
    import json

    from clmtl.cli import main

    run_checkpoint(tmp_path / "intact.pt")
    saved = torch.load(tmp_path / "intact.pt", weights_only=True)
    saved["tasks"] = [{"name": "det", "kind": "depth"}, "cls"]
    torch.save(saved, tmp_path / "bad.pt")
    threads = torch.get_num_threads()
    for name in ("intact", "bad"):
        assert main(["eval", "--checkpoint", str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / name),
                     "train.threads=2"]) == 0
        assert torch.get_num_threads() == threads  # the caller's, whatever train.threads asked for
    assert capsys.readouterr().err == ""
    intact, bad = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("intact", "bad"))
    assert list(bad) == ["seg", "det", "cls"] and bad == intact
