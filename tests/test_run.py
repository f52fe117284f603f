"""End to end: a tiny run through stream, template, plugins, metrics and report, checked against the contract."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin

from clmtl.baselines import Baselines
from clmtl.builders import build_model
from clmtl.config import load_config
from clmtl.errors import ConfigError
from clmtl.io import atomic_torch_save, load_checkpoint
from clmtl.runner import run
from clmtl.stream.benchmark import build_benchmark
from clmtl.training.registry import register, strategy_schemas

TINY = ["data.train_size=8", "data.val_size=4", "data.image_size=64", "train.epochs=1", "train.batch_size=4",
        "output.overlays=2", "train.threads=1"]


CALLBACKS = [name for name in dir(SupervisedPlugin) if name.startswith(("before_", "after_"))]


class CallbackRecorder(SupervisedPlugin):
    """Records every callback the template fires, and the target type seen in training per task label."""

    def __init__(self):
        super().__init__()
        self.fired: set[str] = set()
        self.target_types: dict[int, str] = {}



def _recording(name):
    def callback(self, strategy, **kwargs):
        self.fired.add(name)
        if name == "before_backward":
            self.target_types[int(strategy.mb_task_id[0])] = type(strategy.mb_y).__name__

    return callback


for _name in CALLBACKS:
    setattr(CallbackRecorder, _name, _recording(_name))


RECORDER = CallbackRecorder()
register("recorder_for_run_test")(lambda: RECORDER)


ON_ONE_WORKER = pytest.mark.xdist_group("tiny_run")  # the tests of one run, trained once


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = load_config(None, TINY + ["strategy.ewc.lambda=10.0"], strategies=strategy_schemas())
    results = run(config, "ewc+recorder_for_run_test", out, baselines=True)
    return out, results


@pytest.mark.slow
@ON_ONE_WORKER
def test_every_avalanche_callback_fires_on_the_mixed_stream(tiny_run):
    assert set(CALLBACKS) - RECORDER.fired == set()
    assert RECORDER.target_types == {0: "Tensor", 1: "list", 2: "Tensor"}


@pytest.mark.slow
@ON_ONE_WORKER
def test_results_json_matches_the_contract(tiny_run):
    out, results = tiny_run
    written = json.loads((out / "results.json").read_text())
    assert written["matrix"] == results.matrix
    for key in ("clmtl_version", "config", "seed", "benchmark", "strategy", "tasks", "matrix", "baseline", "final",
                "extra", "forgetting", "forgetting_max", "bwt", "drop_vs_baseline", "params", "train_seconds",
                "versions"):
        assert key in written, key
    assert [t["name"] for t in written["tasks"]] == ["seg", "det", "cls"]
    assert [t["metric"] for t in written["tasks"]] == ["mIoU", "mAP50_95", "top1"]
    assert written["tasks"][1]["extra"] == ["mAP50"]
    matrix = written["matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert all(0.0 <= value <= 1.0 for row in matrix for value in row)
    assert written["final"] == {t["name"]: matrix[-1][j] for j, t in enumerate(written["tasks"])}
    assert written["forgetting"]["seg"] == pytest.approx(matrix[0][0] - matrix[2][0])
    assert written["forgetting"]["det"] == pytest.approx(matrix[1][1] - matrix[2][1])
    assert written["forgetting"]["cls"] is None
    assert written["bwt"] == pytest.approx(-(written["forgetting"]["seg"] + written["forgetting"]["det"]) / 2)
    assert set(written["baseline"]) == {"seg", "det", "cls"}
    assert set(written["extra"]["final"]["det"]) == {"mAP50"}
    assert written["config"]["strategy"]["ewc"]["lambda"] == 10.0
    model = build_model(load_config(None, TINY), build_benchmark(load_config(None, TINY)).tasks)
    assert written["params"] == sum(p.numel() for p in model.parameters())
    assert written["versions"]["torch"] == torch.__version__.split("+")[0]
    # EWC keeps θ* and a Fisher diagonal (float32) per trained experience; the recorder stores nothing
    assert written["memory_bytes"] == 3 * 2 * 4 * written["params"]
    assert len(written["strategy_stats"]["MultiTaskEWCPlugin"]["fisher_seconds"]) == 3
    assert len(written["strategy_stats"]["MultiTaskEWCPlugin"]["fisher_mean"]) == 3


def test_given_baselines_are_reused_instead_of_trained(tmp_path):
    config = load_config(None, TINY + ["output.overlays=0", "output.checkpoints=false"])
    given = Baselines({"seg": {"mIoU": 0.5}, "det": {"mAP50_95": 0.4, "mAP50": 0.8}, "cls": {"top1": 0.25}},
                      {"seg": 1.0, "det": 2.0, "cls": 3.0})
    results = run(config, "naive", tmp_path, reuse_baselines=given)
    assert results.baseline == {"seg": 0.5, "det": 0.4, "cls": 0.25}
    assert results.baseline_train_seconds == given.seconds
    assert results.drop_vs_baseline["cls"] == pytest.approx((0.25 - results.final["cls"]) / 0.25)
    assert "single-task baselines" not in (tmp_path / "log.txt").read_text()


@pytest.mark.slow
def test_baselines_beside_the_stream_equal_baselines_trained_before_it(tmp_path):
    """2 threads: baselines in a second process, 1 thread each; the same run on 1 thread trains them first."""
    results = {}
    callers = torch.get_num_threads()
    for threads in (2, 1):
        config = load_config(None, TINY + ["output.overlays=0", f"train.threads={threads}"])
        results[threads] = run(config, "naive", tmp_path / str(threads), baselines=True)
        assert torch.get_num_threads() == callers  # the caller's threads again once the run is done
    beside, before = results[2], results[1]
    assert beside.threads == before.threads == {"stream": 1, "baselines": 1}
    assert beside.baseline == before.baseline and beside.extra == before.extra
    assert beside.matrix == before.matrix
    assert set(beside.baseline_train_seconds) == {"seg", "det", "cls"}
    assert "single-task baselines (trained beside the stream)" in (tmp_path / "2" / "log.txt").read_text()
    last = load_checkpoint(tmp_path / "2" / "checkpoints" / "last.pt")  # rewritten once the baselines arrived
    assert last["baselines"]["scores"] == load_checkpoint(tmp_path / "1" / "checkpoints" / "last.pt")["baselines"][
        "scores"]

    # a checkpoint written while the baselines were still training holds none: resuming trains them again
    atomic_torch_save({**last, "baselines": None}, tmp_path / "2" / "checkpoints" / "last.pt")
    config = load_config(None, TINY + ["output.overlays=0", "train.threads=2"])
    resumed = run(config, "naive", tmp_path / "2", baselines=True, resume=True)
    assert resumed.baseline == before.baseline and resumed.matrix == before.matrix


def test_a_failing_stream_stops_the_baselines_process(tmp_path, isolated_registry):
    import multiprocessing

    class Failing(SupervisedPlugin):
        def before_training_exp(self, strategy, **kwargs):
            raise RuntimeError("plugin failed")

    register("failing_for_run_test")(Failing)
    config = load_config(None, TINY + ["output.overlays=0", "train.threads=2"])
    with pytest.raises(RuntimeError, match="plugin failed"):
        run(config, "failing_for_run_test", tmp_path, baselines=True)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("failure", ["training", "data"])
def test_the_callers_thread_count_comes_back_when_a_run_raises(tmp_path, isolated_registry, failure):
    """A run sets torch's threads for its training (``train.threads``) and puts the caller's back however it ends:
    a plugin that fails in training, data that fails to load."""
    class Failing(SupervisedPlugin):
        def before_training_exp(self, strategy, **kwargs):
            raise RuntimeError("plugin failed")

    register("failing_for_threads_test")(Failing)
    overrides = [*TINY, "output.overlays=0", "train.threads=2", "train.parallel_baselines=false", "tasks=[cls]",
                 "model.backbone=mlp", "model.hidden=[8]"]  # a small model, quick to build and score
    if failure == "data":
        overrides.append(f"data.root={tmp_path / 'nowhere'}")
    config = load_config(None, overrides)
    callers = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises((RuntimeError, ConfigError), match="plugin failed|is not a folder"):
            run(config, "failing_for_threads_test", tmp_path, baselines=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(callers)


@pytest.mark.slow
@pytest.mark.parametrize("stop, cpu_seconds", [("SIGTERM", 6.5), ("SIGKILL", 6.5), ("SIGKILL", 2)],
                         ids=["SIGTERM", "SIGKILL", "SIGKILL-while-importing"])
def test_a_stopped_or_killed_run_leaves_no_baselines_process_behind(tmp_path, stop, cpu_seconds, process_tree):
    """The signal once the baselines' process has used ``cpu_seconds`` of CPU: 6.5 is past its imports of torch and
    Avalanche (about 5 s here), into the baselines' training; 2 is amid them."""
    import signal
    import time

    idle = ["--plugin-file", str(Path(__file__).with_name("stopping_strategies.py")), "--strategy", "idle"]
    run_process = process_tree.start([sys.executable, "-m", "clmtl", "run", *idle, "--out", str(tmp_path), *TINY,
                                      "train.threads=2", "train.epochs=500"])  # the stream waits for the signal
    deadline, workers = time.monotonic() + 120, []
    while not workers and time.monotonic() < deadline:
        time.sleep(0.2)
        workers = process_tree.workers()
    assert workers, "the baselines' process did not start"
    while sum(workers[0].cpu_times()[:2]) < cpu_seconds and time.monotonic() < deadline:
        time.sleep(0.5)
    run_process.send_signal(getattr(signal, stop))
    run_process.wait(timeout=60)
    deadline = time.monotonic() + 20
    while _running(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(workers), f"{stop}: baselines' process left running"


def _running(processes: list) -> list:
    """Those of ``processes`` still running. A zombie has ended: an orphan's waits for the process that adopted it to
    collect it, which some init processes of containers never do."""
    import psutil

    running = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    return running


@pytest.mark.slow
@ON_ONE_WORKER
def test_outputs_checkpoints_and_metric_log_are_written(tiny_run):
    out, results = tiny_run
    for name in ("summary.md", "plots/accuracy_matrix.png", "plots/task_curves.png", "plots/predictions_seg.png",
                 "plots/predictions_det.png", "plots/predictions_cls.png", "log.txt"):
        assert (out / name).stat().st_size > 0, name
    for k in range(3):
        checkpoint = load_checkpoint(out / "checkpoints" / f"exp{k}.pt")
        assert checkpoint["experience"] == k
        assert checkpoint["matrix"] == results.matrix[: k + 1]
    with open(out / "metrics.csv") as handle:
        names = {row["metric"] for row in csv.DictReader(handle)}
    assert "mIoU/eval_phase/test_stream/Task000/Exp000" in names
    assert "mAP50/eval_phase/test_stream/Task001/Exp001" in names
    assert any(name.startswith("TaskForgetting/") for name in names)
    assert "| seg | mIoU |" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_python_m_clmtl_reports_a_config_typo_in_one_clear_line_with_a_suggestion():
    result = subprocess.run([sys.executable, "-m", "clmtl", "run", "train.lrr=0.1"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "did you mean 'train.lr'" in result.stderr


def test_an_out_of_range_value_and_an_unknown_strategy_are_clear_errors(clmtl_cli):
    result = clmtl_cli("run", "train.lr=-1")
    assert result.returncode == 2 and "train.lr" in result.stderr and "Traceback" not in result.stderr
    result = clmtl_cli("run", "--strategy", "ewc+replai")
    assert result.returncode == 2 and "unknown strategy 'replai'" in result.stderr


def test_strategies_lists_hyperparameters_and_their_search_values(clmtl_cli):
    result = clmtl_cli("strategies")
    assert result.returncode == 0
    for line in ("strategy.ewc.lambda = 1000.0 (float, must be >= 0): λ, the weight of the penalty; --tune tries "
                 "100.0, 1000.0, 10000.0, 100000.0, 1000000.0",
                 "strategy.ewc.mode = 'separate' (str, must be one of separate, online)",
                 "strategy.replay.per_task_cap = None (int | null, must be >= 1)"):
        assert line in result.stdout
    assert "joint: Upper bound" in result.stdout and "acts on: data, loss" in result.stdout


@pytest.mark.slow
@ON_ONE_WORKER
def test_clmtl_eval_reproduces_the_final_scores_and_writes_predictions(tiny_run, tmp_path, clmtl_cli):
    out, results = tiny_run
    result = clmtl_cli("eval", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--predictions", str(tmp_path),
                   "--out", str(tmp_path / "metrics"))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    for task in results.tasks:
        assert metrics[task["name"]][task["metric"]] == pytest.approx(results.final[task["name"]], abs=1e-9)
    assert len(list((tmp_path / "seg").glob("*.png"))) == 4  # data.val_size
    with open(tmp_path / "cls.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert {d["image_id"] for d in json.loads((tmp_path / "det.json").read_text())} <= {1, 2, 3, 4}


def test_clmtl_run_called_in_a_process_gives_back_its_signal_handlers(tmp_path, clmtl_cli):
    import signal

    before = [signal.getsignal(name) for name in (signal.SIGTERM, signal.SIGINT)]
    result = clmtl_cli("run", "--no-baselines", "--out", tmp_path, *TINY, "output.overlays=0", "tasks=[cls]")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [signal.getsignal(name) for name in (signal.SIGTERM, signal.SIGINT)] == before  # Ctrl-C works again


def test_clmtl_eval_refuses_a_file_that_is_not_a_checkpoint(tmp_path, clmtl_cli):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    result = clmtl_cli("eval", "--checkpoint", str(tmp_path / "last.pt"))
    assert result.returncode == 2 and "last.pt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@ON_ONE_WORKER
def test_clmtl_export_writes_a_torchscript_model_of_the_checkpoint(tiny_run, tmp_path, clmtl_cli):
    out, _ = tiny_run
    result = clmtl_cli("export", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--out", str(tmp_path / "m.pt"))
    assert result.returncode == 0, result.stderr[-2000:]
    exported = torch.jit.load(str(tmp_path / "m.pt"))
    outputs = exported(torch.rand(1, 3, 64, 64))
    assert [tuple(t.shape[:2]) for t in outputs[:2]] == [(1, 5), (1, 5)]  # seg logits, cls logits
    assert len(outputs) == 5  # + three detection levels


@pytest.mark.slow
def test_a_hybrid_calls_every_components_callbacks_in_the_composers_order(tmp_path, monkeypatch):
    import clmtl.builders
    from clmtl.training.registry import build_plugins

    calls = []

    def recording(spec, params):
        plugins = build_plugins(spec, params)
        for plugin in plugins:
            for name in ("before_training_exp", "before_backward", "after_training_exp"):
                def wrapper(strategy, _original=getattr(plugin, name), _name=name, _plugin=plugin, **kwargs):
                    calls.append((type(_plugin).__name__, _name))
                    return _original(strategy, **kwargs)

                setattr(plugin, name, wrapper)
        return plugins

    monkeypatch.setattr(clmtl.builders, "build_plugins", recording)
    config = load_config(None, TINY + ["output.overlays=0", "output.checkpoints=false"],
                         strategies=strategy_schemas())
    results = run(config, "lwf+replay+ewc+layerlr+bnfreeze", tmp_path, baselines=False)
    order = ["BatchNormFreeze", "LayerLearningRates", "MultiTaskReplayPlugin", "LwFPlugin", "MultiTaskEWCPlugin"]
    for callback in ("before_training_exp", "before_backward", "after_training_exp"):
        seen = [plugin for plugin, name in calls if name == callback]
        assert seen[:5] == order, callback  # model -> optimizer -> data -> loss, ties in the user's order
    assert results.strategy_stats["MultiTaskReplayPlugin"]["replayed"]  # the components did their work
    assert results.memory_bytes > 0
