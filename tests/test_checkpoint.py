"""Resumable runs: a run killed during the second experience and resumed ends exactly like an uninterrupted one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bitwise import same
from inprocess import clmtl_here

from clmtl.io import load_checkpoint
from clmtl.training.checkpoint import (
    ResumeError,
    RunCheckpoint,
    StreamProgress,
    load_run_checkpoint,
    restore_plugins,
    rng_state,
    save_run_checkpoint,
    set_rng_state,
)

KILLER = Path(__file__).with_name("stopping_strategies.py")  # registers the strategy "killer"
STRATEGY = "ewc+replay+lwf+bnfreeze+layerlr+killer"
TINY = ["data.train_size=8", "data.val_size=4", "data.image_size=64", "train.epochs=1", "train.batch_size=4",
        "output.overlays=0", "train.threads=1", "strategy.bnfreeze.mode=per_task", "strategy.replay.mem_size=6",
        "train.ema=0.9", "train.ema_tau=2"]  # the moving average, too, continues where it stopped


def stopped_run(*args, signal_name: str = "SIGKILL", at: int = 1) -> subprocess.CompletedProcess:
    """``clmtl run ARGS`` that the killer strategy stops with ``signal_name`` before iteration ``at`` of the second
    experience. SIGKILL leaves nothing to clean up, so that run has a process of its own; ``clmtl run`` handles
    SIGTERM (it checkpoints and returns 130), so that one runs here like the rest."""
    env = {"KILL_FOR_TEST": "1", "KILL_AT": str(at), "KILL_SIGNAL": signal_name}
    if signal_name == "SIGKILL":
        return subprocess.run([sys.executable, "-m", "clmtl", "run", *args], capture_output=True, text=True,
                              timeout=600, env={**os.environ, **env})
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return clmtl_here("run", *args)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``uninterrupted(*arguments)``: the folder of a finished ``clmtl run`` with those arguments, trained once per
    module (the stopped-and-resumed runs of several tests compare with the same reference)."""
    folders = {}

    def reference(*arguments):
        if arguments not in folders:
            out = tmp_path_factory.mktemp("reference")
            done = clmtl_here("run", *arguments, "--out", out)
            assert done.returncode == 0, done.stderr[-3000:]
            folders[arguments] = out
        return folders[arguments]

    return reference


@pytest.mark.slow
def test_a_run_killed_in_the_second_experience_resumes_to_the_same_results(tmp_path, uninterrupted):
    common = ["--plugin-file", str(KILLER)]
    reference = uninterrupted(*common, "--strategy", STRATEGY, *TINY)

    killed = stopped_run(*common, "--strategy", STRATEGY, "--out", str(tmp_path / "run"), *TINY)
    assert killed.returncode == -9  # SIGKILL: no handler ran, nothing was flushed
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["exp0.pt", "last.pt"] and not (tmp_path / "run" / "results.json").exists()

    resumed = clmtl_here("run", *common, "--resume", str(tmp_path / "run"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((reference / "results.json").read_text())
    got = json.loads((tmp_path / "run" / "results.json").read_text())
    assert got["matrix"] == expected["matrix"]  # bit for bit, not approximately
    replay = "MultiTaskReplayPlugin"  # what it stored and replayed (the EWC stats are timings, which vary)
    assert got["baseline"] == expected["baseline"]
    assert got["strategy_stats"][replay] == expected["strategy_stats"][replay]
    assert "resumed after experience 0" in (tmp_path / "run" / "log.txt").read_text()
    for key in expected["extra"]["final"]:
        assert got["extra"]["final"][key] == expected["extra"]["final"][key]


@pytest.mark.slow
@pytest.mark.xdist_group("stopped_runs")  # on one worker, so the SIGKILL and SIGTERM cases share their reference
@pytest.mark.parametrize("signal_name,expected_returncode,strategy", [
    ("SIGKILL", -9, STRATEGY), ("SIGTERM", 130, STRATEGY), ("SIGTERM", 130, "routing+killer")])
def test_a_run_stopped_inside_an_experience_resumes_from_that_iteration(tmp_path, signal_name, expected_returncode,
                                                                      strategy, uninterrupted):
    """Periodic checkpoints every 3 iterations of 4-batch epochs: SIGKILL before iteration 5 of the second experience
    leaves the one after iteration 3 (inside the first epoch); SIGTERM checkpoints the iteration it interrupts
    (the 5th, inside the second epoch). Either way the resumed run ends bit for bit like an uninterrupted one."""
    config = [*TINY, "data.train_size=16", "train.epochs=2", "output.checkpoint_every=3"]
    common = ["--plugin-file", str(KILLER), "--strategy", strategy, "--no-baselines", *config]
    reference = uninterrupted(*common)

    stopped = stopped_run(*common, "--out", str(tmp_path / "run"), signal_name=signal_name, at=4)
    assert stopped.returncode == expected_returncode, stopped.stderr[-3000:]
    saved = load_run_checkpoint(tmp_path / "run")
    assert saved.progress.finished == 0
    expected = (0, 3) if signal_name == "SIGKILL" else (1, 1)
    assert (saved.partial["epoch"], saved.partial["iteration"]) == expected

    resumed = clmtl_here("run", "--plugin-file", str(KILLER), "--resume", str(tmp_path / "run"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((reference / "results.json").read_text())
    got = json.loads((tmp_path / "run" / "results.json").read_text())
    assert got["matrix"] == expected["matrix"]
    assert got["train_seconds"]["det"] > saved.partial["seconds"] > 0  # the time before the stop still counts
    assert "resumed inside experience 1" in (tmp_path / "run" / "log.txt").read_text()
    assert not (tmp_path / "run" / "checkpoints" / "partial.pt").exists()  # replaced by the finished experience's
    reference_model = load_checkpoint(reference / "checkpoints" / "last.pt")["model"]
    for name, tensor in load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"].items():
        assert torch.equal(tensor, reference_model[name]), name


@pytest.mark.slow
def test_a_class_scenario_run_stopped_after_its_head_grew_resumes_to_the_same_model(tmp_path, uninterrupted):
    """The classification head grows from 2 to 4 classes at the second experience; a SIGTERM inside it checkpoints
    the grown model, EWC's anchors of the smaller head, the replay memory and LwF's teacher (whose head is still
    the smaller one), and the resumed run ends bit for bit like an uninterrupted one."""
    stream = ["scenario=class", "tasks=[{name: a, kind: cls, data: {classes: [heart, arrow]}}, "
              "{name: b, kind: cls, data: {classes: [semicircle, frame]}}]"]
    config = [*(o for o in TINY if "bnfreeze" not in o), "data.train_size=16", "train.epochs=2",
              "output.checkpoint_every=3", *stream]
    common = ["--plugin-file", str(KILLER), "--strategy", "ewc+replay+lwf+killer", "--no-baselines", *config]
    reference = uninterrupted(*common)
    stopped = stopped_run(*common, "--out", str(tmp_path / "run"), signal_name="SIGTERM", at=4)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    saved = load_run_checkpoint(tmp_path / "run")
    assert saved.partial is not None and saved.model["head.outputs.0.weight"].shape == (4, 64)
    resumed = clmtl_here("run", "--plugin-file", str(KILLER), "--resume", str(tmp_path / "run"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((reference / "results.json").read_text())
    assert json.loads((tmp_path / "run" / "results.json").read_text())["matrix"] == expected["matrix"]
    reference_model = load_checkpoint(reference / "checkpoints" / "last.pt")["model"]
    for name, tensor in load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"].items():
        assert torch.equal(tensor, reference_model[name]), name


@pytest.mark.slow
def test_one_optimizer_state_for_the_stream_resumes_after_an_experience_bit_for_bit(tmp_path, uninterrupted):
    """``train.reset_optimizer=false`` (one Adam state for the stream, as the papers keep it): a run killed in its
    second experience goes on from the first one's checkpoint with the optimizer's state as it was then (it used to
    start a fresh one), and ends with the uninterrupted run's model."""
    common = ["--plugin-file", str(KILLER), "--strategy", "ewc+killer", "--no-baselines",
              *(o for o in TINY if "bnfreeze" not in o), "data.train_size=16", "train.epochs=2",
              "train.reset_optimizer=false"]
    reference = uninterrupted(*common)
    killed = stopped_run(*common, "--out", str(tmp_path / "run"), at=2)
    assert killed.returncode == -9 and load_run_checkpoint(tmp_path / "run").optimizer  # Adam's moments by name
    resumed = clmtl_here("run", "--plugin-file", str(KILLER), "--resume", str(tmp_path / "run"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference_model = load_checkpoint(reference / "checkpoints" / "last.pt")["model"]
    for name, tensor in load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"].items():
        assert torch.equal(tensor, reference_model[name]), name


CLASSIFICATION = ["scenario=class", "tasks=[{name: a, kind: cls, data: {classes: [heart, arrow]}}, "
                  "{name: b, kind: cls, data: {classes: [semicircle, frame]}}]"]
STOPPED_INSIDE = [*(o for o in TINY if "bnfreeze" not in o), "data.train_size=16", "train.epochs=2",
                  "output.checkpoint_every=3", *CLASSIFICATION]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,overrides", [
    ("avalanche.SynapticIntelligence", ["strategy.avalanche.SynapticIntelligence.si_lambda=100.0"]),
    ("avalanche.MAS", ["strategy.avalanche.MAS.lambda_reg=100.0"]),
    ("avalanche.RWalk", ["strategy.avalanche.RWalk.ewc_lambda=100.0", "strategy.avalanche.RWalk.delta_t=2"]),
    ("avalanche.GEM", ["strategy.avalanche.GEM.patterns_per_experience=6"]),
    ("si+bnfreeze", ["strategy.si.c=100.0", "strategy.bnfreeze.mode=freeze"]),  # SI's path integral so far
    ("ewc", ["strategy.ewc.mode=online"]),  # its stores stay defaultdicts, which online mode writes new keys into
    ("derpp+ewc", ["strategy.derpp.mem_size=6"]),  # DER++'s draws inside the experience, its stored logits
    ("derpp", ["strategy.derpp.mem_size=6", "scenario=class", "tasks=[{name: a, kind: det, data: {classes: [cross]}}, "
               "{name: b, kind: det, data: {classes: [hexagon]}}]"]),  # stored detection outputs: levels per sample
    ("er_ace", ["strategy.er_ace.mem_size=6"]),
    ("icarl+ewc", ["strategy.icarl.mem_size=6"]),  # the exemplars, class means and previous model
    ("mib+replay", ["scenario=class", "tasks=[{name: a, kind: seg, data: {classes: [disk, square]}}, "
                    "{name: b, kind: seg, data: {classes: [ring]}}]"]),  # its initial rows are not drawn again
    ("plop", ["scenario=class", "tasks=[{name: a, kind: seg, data: {classes: [disk, square]}}, "
              "{name: b, kind: seg, data: {classes: [ring]}}]"]),  # its entropy thresholds
    ("det_distill+pseudo_labels", ["scenario=class", "tasks=[{name: a, kind: det, data: {classes: [cross, star]}}, "
                                   "{name: b, kind: det, data: {classes: [hexagon]}}]"]),
])
def test_a_strategy_with_declared_state_stopped_inside_an_experience_resumes_bit_for_bit(tmp_path, uninterrupted,
                                                                                         strategy, overrides):
    """Avalanche's stock plugins that declare their state, and clmtl's strategies whose state changes inside an
    experience, stopped by SIGTERM inside the second: the resumed run ends with the uninterrupted run's matrix, model
    and plugin states."""
    common = ["--plugin-file", str(KILLER), "--strategy", f"{strategy}+killer", "--no-baselines", *STOPPED_INSIDE,
              *overrides]
    reference = uninterrupted(*common)
    stopped = stopped_run(*common, "--out", str(tmp_path / "run"), signal_name="SIGTERM", at=4)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    saved = load_run_checkpoint(tmp_path / "run")
    assert saved.partial is not None and saved.progress.finished == 0
    resumed = clmtl_here("run", "--plugin-file", str(KILLER), "--resume", str(tmp_path / "run"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((reference / "results.json").read_text())
    assert json.loads((tmp_path / "run" / "results.json").read_text())["matrix"] == expected["matrix"]
    expected, got = (load_checkpoint(folder / "checkpoints" / "last.pt") for folder in (reference, tmp_path / "run"))
    assert same(got["model"], expected["model"])
    timings = ("fisher_seconds",)  # EWC's: wall-clock seconds differ from run to run
    plugins = [[{k: v for k, v in state.items() if k not in timings} if state else state for state in c["plugins"]]
               for c in (got, expected)]
    assert same(*plugins)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,plugin,name", [("avalanche.AGEM", "AGEM", "A-GEM"),
                                                  ("avalanche.GDumb", "GDumb", "GDumb")])
def test_a_stock_plugin_whose_memory_is_avalanche_datasets_is_refused_at_resume_in_one_line(tmp_path, strategy,
                                                                                            plugin, name, monkeypatch):
    monkeypatch.delenv("CLMTL_DEBUG", raising=False)
    common = ["--plugin-file", str(KILLER), "--strategy", f"{strategy}+killer", "--no-baselines", *STOPPED_INSIDE]
    stopped = stopped_run(*common, "--out", str(tmp_path / "run"), signal_name="SIGTERM", at=1)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    before = _files(tmp_path / "run")
    resumed = clmtl_here("run", "--plugin-file", str(KILLER), "--resume", str(tmp_path / "run"))
    assert resumed.returncode == 2 and resumed.stderr.count("\n") == 1
    assert resumed.stderr.startswith(f"clmtl: error: plugin {plugin} cannot be resumed: {name} keeps its memory as "
                                     "Avalanche datasets")
    assert _files(tmp_path / "run") == before  # refused before anything is written


def test_resume_needs_the_runs_own_config(tmp_path, clmtl_cli):
    result = clmtl_cli("run", "--resume", str(tmp_path), "train.lr=0.1")
    assert result.returncode == 2 and "--resume continues a run with its own config" in result.stderr
    result = clmtl_cli("run", "--resume", str(tmp_path))
    assert result.returncode == 2 and "no checkpoints/last.pt to resume from" in result.stderr


def tiny_checkpoint(experience: int = 0, **fields) -> RunCheckpoint:
    """A run checkpoint of a two-task stream after ``experience``, with ``fields`` replaced."""
    progress = StreamProgress(matrix=[[0.5, None]], scores=[], finished=experience)
    tasks = [{"name": name, "kind": "classification", "classes": ["a", "b"]} for name in ("one", "two")]
    return RunCheckpoint(**{"model": {"w": torch.ones(2)}, "config": {}, "task_entries": tasks, "strategy": "naive",
                            "progress": progress, "baselines": None, "plugins": [None],
                            "clock": {"train_exp_counter": 1}, "rng": rng_state(), **fields})


def _files(folder) -> dict:
    """Every file under ``folder``: relative path -> (bytes, modification time)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("keep", [0.5, 0.999, 200, 0])  # fraction or number of bytes kept
def test_a_truncated_last_checkpoint_is_one_line_exit_2_and_nothing_is_written(tmp_path, capsys, monkeypatch, keep):
    from clmtl.cli import main
    from clmtl.config import load_config

    monkeypatch.delenv("CLMTL_DEBUG", raising=False)
    out = tmp_path / "run"
    checkpoint = tiny_checkpoint(model={"w": torch.randn(64, 64)}, config=load_config(None).to_dict())
    save_run_checkpoint(checkpoint, out / "checkpoints")
    (out / "results.json").write_text('{"earlier": "run"}')
    (out / "metrics.csv").write_text("metric,x,value\n")
    last = out / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])  # exp0.pt too: a hard link
    before = _files(out)

    assert main(["run", "--resume", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.endswith("\n") and captured.err.count("\n") == 1
    assert captured.err.startswith(f"clmtl: error: {last}: not a readable checkpoint (")
    assert "truncated" in captured.err or "central directory" in captured.err  # what is wrong, not just "error"
    assert _files(out) == before


def test_random_generators_come_back_exactly():
    import random

    state = rng_state()
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == drawn


@pytest.mark.slow
def test_last_points_at_the_newest_checkpoint_and_survives_a_failed_write(tmp_path):
    save_run_checkpoint(tiny_checkpoint(), tmp_path)
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "exp0.pt")

    class Exploding:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_run_checkpoint(tiny_checkpoint(experience=1, plugins=[{"bad": Exploding()}]), tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["experience"] == 0
    assert sorted(os.listdir(tmp_path)) == ["exp0.pt", "last.pt"]


def test_a_foreign_checkpoint_or_a_plain_avalanche_plugin_cannot_be_resumed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    torch.save({"model": {}}, tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(ResumeError, match="not a resumable clmtl run checkpoint"):
        load_run_checkpoint(tmp_path)
    with pytest.raises(ResumeError, match="plugin object is not a clmtl.training.plugin.Plugin"):
        restore_plugins([object()], [None], torch.nn.Linear(1, 1))


def test_a_run_checkpoint_survives_saving_and_loading_field_for_field(tmp_path):
    """What ``save_run_checkpoint`` writes, ``load_run_checkpoint`` reads back as the same typed checkpoint, also
    inside an experience; a file without a run's entries is refused by name."""
    written = tiny_checkpoint(task_states={0: {"bn.running_mean": torch.zeros(3)}})
    for checkpoint in (written, written.inside_experience({"epoch": 1, "iteration": 7})):
        save_run_checkpoint(checkpoint, tmp_path / "checkpoints")
        read = load_run_checkpoint(tmp_path)
        assert read.progress == checkpoint.progress and read.partial == checkpoint.partial
        assert read.tasks == checkpoint.tasks and [t.name for t in read.tasks] == ["one", "two"]
        torch.testing.assert_close(read.task_states, checkpoint.task_states)
        assert read.to_dict().keys() == checkpoint.to_dict().keys()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["exp0.pt", "last.pt", "partial.pt"]
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    del saved["clock"]
    torch.save(saved, tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(ResumeError, match="not a resumable clmtl run checkpoint \\(missing clock\\)$"):
        load_run_checkpoint(tmp_path)
