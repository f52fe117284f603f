"""The Python API (``import clmtl``): the docs' examples as pasted, the same numbers as the command line, no side
effects unless asked, and a user's own Avalanche benchmark through clmtl's template, strategies, metrics and report."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import clmtl
from clmtl.report.results import Results

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
TINY = {"data": {"train_size": 8, "val_size": 4, "image_size": 64}, "train": {"epochs": 1, "batch_size": 4},
        "output": {"overlays": 0}}
TINY_OVERRIDES = ["data.train_size=8", "data.val_size=4", "data.image_size=64", "train.epochs=1", "train.batch_size=4",
                  "output.overlays=0"]


def test_import_clmtl_is_light_and_lists_its_api():
    """``import clmtl`` imports neither torch nor Avalanche (the CLI's first error stays fast); names load on use."""
    code = "import sys, clmtl; print('torch' in sys.modules, 'avalanche' in sys.modules, sorted(dir(clmtl)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    torch_loaded, avalanche_loaded, names = done.stdout.split(" ", 2)
    assert (torch_loaded, avalanche_loaded) == ("False", "False")
    for name in ("run", "load_config", "build_benchmark", "from_avalanche", "build_model", "build_strategy",
                 "make_template", "evaluate", "write_report", "strategies", "Results"):
        assert name in names
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        clmtl.nothing  # noqa: B018


def python_block(path: Path, heading: str) -> str:
    """The first python code block after ``heading`` in ``path``."""
    section = path.read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_api_example_runs_as_pasted_and_writes_what_it_returns(tmp_path, monkeypatch, capsys):
    code = python_block(API_DOC, "Two strategies on a small stream")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/api.md", "exec"), namespace)  # noqa: S102 - the documented example, as a user pastes it
    results = namespace["results"]  # the last strategy's
    assert results.strategy == "ewc+replay" and len(results.matrix) == len(results.tasks) == 3
    written = Results.load(tmp_path / "runs" / "api_ewc-replay")  # where the example asked
    assert written == results  # replay's statistics included: their keys are text, as JSON keeps them
    last_row = results.matrix[-1]
    assert results.average_accuracy == sum(last_row) / len(last_row)
    printed = capsys.readouterr().out
    assert [line.split()[0] for line in printed.splitlines() if line.startswith(("naive ", "ewc+replay "))] == [
        "naive", "ewc+replay"]
    assert "## Accuracy matrix" in printed


@pytest.mark.slow
def test_the_step_by_step_example_of_the_api_docs_runs_and_scores_every_task(capsys):
    exec(compile(python_block(API_DOC, "## Step by step"), "docs/api.md", "exec"), {})  # noqa: S102
    printed = [line for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert [line.split(" ", 1)[0] for line in printed] == ["0", "1", "2"]
    assert all(set(ast.literal_eval(line.split(" ", 1)[1])) == {"seg", "det", "cls"} for line in printed)


@pytest.mark.slow
def test_the_api_returns_the_matrix_the_command_line_writes(tmp_path, clmtl_cli):
    """The same config and seed through ``clmtl.run`` and ``clmtl run`` (one thread each): the same numbers."""
    done = clmtl_cli("run", "--strategy", "ewc", "--seed", "3", "--no-baselines", "--out", tmp_path / "cli",
                     *TINY_OVERRIDES, "train.threads=1", "train.parallel_baselines=false")
    assert done.returncode == 0, done.stderr[-3000:]
    from_cli = json.loads((tmp_path / "cli" / "results.json").read_text())

    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = clmtl.run({**TINY, "seed": 3}, strategy="ewc", out=tmp_path / "api", threads=1)
        assert torch.get_num_threads() == 2  # put back
    finally:
        torch.set_num_threads(threads_before)
    assert results.matrix == from_cli["matrix"]
    assert results.final == from_cli["final"] and results.seed == 3
    assert results.threads == {"stream": 1, "baselines": None}
    written = json.loads((tmp_path / "api" / "results.json").read_text())
    assert set(written) == {field for field in Results.__dataclass_fields__}  # every field, and only those
    assert Results.load(tmp_path / "api") == results
    assert "## Accuracy matrix" in results.summary()


@pytest.mark.slow
def test_the_api_changes_no_threads_starts_no_process_and_writes_nothing_unless_asked(tmp_path, monkeypatch):
    import clmtl.baselines as baselines

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(baselines, "BackgroundBaselines", lambda *a: pytest.fail("a second process was started"))
    torch.set_num_threads(1)
    results = clmtl.run(TINY, strategy="naive", baselines=True)
    assert torch.get_num_threads() == 1
    assert results.threads == {"stream": 1, "baselines": 1}
    assert set(results.baseline) == {"seg", "det", "cls"}
    assert list(tmp_path.iterdir()) == []


class Tensors(Dataset):
    """Local tensors with the ``targets`` Avalanche's generators read: grey 12x12 images of 4 classes, each class
    a bright square in its own quadrant, so a model can learn them in a few steps."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.targets = (torch.arange(count) % 4).tolist()
        self.images = torch.rand(count, 1, 12, 12, generator=generator) * 0.2
        for i, label in enumerate(self.targets):
            row, col = divmod(label, 2)
            self.images[i, 0, row * 6:row * 6 + 6, col * 6:col * 6 + 6] += 0.8

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


def tensors_benchmark(task_labels: bool, train_images: int = 32):
    from avalanche.benchmarks import nc_benchmark

    return nc_benchmark(Tensors(train_images, 0), Tensors(16, 1), n_experiences=2, task_labels=task_labels, seed=0,
                        fixed_class_order=[0, 1, 2, 3])


@pytest.mark.parametrize("task_labels, scenario, heads, labels", [
    (True, "task", [0, 1], [[0, 1], [0, 1]]),
    (False, "class", [0, 0], [[0, 1], [2, 3]]),
])
def test_an_avalanche_benchmark_becomes_a_clmtl_stream(task_labels, scenario, heads, labels):
    config = clmtl.load_config(TINY)
    benchmark = clmtl.from_avalanche(tensors_benchmark(task_labels), config, class_names="abcd")
    assert benchmark.scenario == scenario and benchmark.name == "avalanche"
    assert [t.head for t in benchmark.tasks] == heads and [list(t.labels) for t in benchmark.tasks] == labels
    assert [t.classes for t in benchmark.tasks] == [("a", "b"), ("c", "d")]
    image, label, task_label = benchmark.stream.train_stream[1].dataset[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert label == labels[1][0] and task_label == heads[1]  # the first sample of experience 1 is class 2 ("c")
    assert len(benchmark.val_sets[0]) == 8


def test_domain_scenario_shares_one_head_by_class_position():
    benchmark = clmtl.from_avalanche(tensors_benchmark(False), clmtl.load_config(TINY), scenario="domain")
    assert [t.head for t in benchmark.tasks] == [0, 0]
    assert [list(t.labels) for t in benchmark.tasks] == [[0, 1], [0, 1]]


def test_task_labels_that_repeat_partly_are_refused():
    from clmtl.errors import ConfigError
    from clmtl.stream.from_avalanche import scenario_of

    class Experience:
        def __init__(self, label):
            self.task_labels, self.current_experience = [label], label

    with pytest.raises(ConfigError, match=r"task labels \[0, 1, 1\] repeat"):
        scenario_of([Experience(0), Experience(1), Experience(1)])


@pytest.mark.slow
@pytest.mark.parametrize("strategy, baselines", [("ewc+replay", True), ("avalanche.SynapticIntelligence", False)])
def test_an_avalanche_benchmark_trains_and_writes_what_clmtl_run_writes(tmp_path, strategy, baselines):
    """``SplitMNIST``-like: a class-incremental Avalanche benchmark through template, strategy, metrics and report,
    on the papers' MLP, which learns the quadrants with a wide margin (the unified model, 32 images and 8 epochs sat
    at the edge of what it learns: another CPU's numerics tipped the first task to chance)."""
    config = clmtl.load_config(TINY, ["train.epochs=8", "train.warmup=0", "train.batch_size=8",
                                      "strategy.replay.mem_size=8", "model.backbone=mlp", "model.hidden=[32]"])
    benchmark = clmtl.from_avalanche(tensors_benchmark(False, train_images=64), config)
    results = clmtl.run(config, strategy=strategy, out=tmp_path, benchmark=benchmark, baselines=baselines)
    assert bool(results.baseline) == baselines
    assert results.benchmark == "avalanche" and results.scenario == "class"
    assert [t["name"] for t in results.tasks] == ["cls1", "cls2"]
    assert len(results.matrix) == 2 and all(len(row) == 2 for row in results.matrix)
    assert results.matrix[0][0] == 1.0  # the quadrants are learnt
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["checkpoints", "log.txt", "metrics.csv", "plots", "results.json", "summary.md"]
    assert json.loads((tmp_path / "results.json").read_text())["matrix"] == results.matrix
    scores = clmtl.evaluate(_final_model(tmp_path, config, benchmark), benchmark, config)
    assert [scores[t["name"]]["top1"] for t in results.tasks] == pytest.approx(results.matrix[-1])


def _final_model(out: Path, config, benchmark):
    from clmtl.training.checkpoint import load_model_checkpoint

    model = clmtl.build_model(config, benchmark.tasks, initial_weights=False)
    model.load_state_dict(load_model_checkpoint(out / "checkpoints" / "last.pt").model)
    return model
