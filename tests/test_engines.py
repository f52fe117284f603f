"""Where a grid's trainings run: the local pool and Ray behave alike, run jobs at once, report failures without
stopping the others, resume, and leave no process behind when stopped."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

from clmtl.studies.engines import Engine, Failure, Job, run_jobs

ray = pytest.importorskip("ray")
# Under pytest-xdist the Ray tests share one worker: each starts a Ray instance, and one at a time they start faster.


def stamp(path: str) -> None:
    """Say the job ran."""
    Path(path).write_text("done")


def meet(path: str, other: str, patience: float = 120.0) -> None:
    """Say the job started, then wait (up to ``patience`` seconds) for the ``other`` job to say so: two jobs that run
    at once both see each other however slowly their workers start, and two run one after the other cannot."""
    Path(path + ".started").touch()
    deadline = time.time() + patience
    while not Path(other + ".started").exists() and time.time() < deadline:
        time.sleep(0.05)
    Path(path).write_text(json.dumps({"met": Path(other + ".started").exists(), "pid": os.getpid(),
                                      "usage_stats": os.environ.get("RAY_USAGE_STATS_ENABLED")}))


def fail(message: str) -> None:
    raise ValueError(message)


def test_an_engine_is_checked_where_it_is_chosen():
    with pytest.raises(ValueError, match="engine must be one of"):
        Engine("dask")
    with pytest.raises(ValueError, match="needs --engine ray"):
        Engine("local", 2, "ray://head:10001")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_is_reported_and_the_others_finish_locally(tmp_path, workers):
    jobs = [Job("first", stamp, (str(tmp_path / "a.json"),)), Job("broken", fail, ("no such file",)),
            Job("last", stamp, (str(tmp_path / "b.json"),))]
    failures = run_jobs(jobs, Engine("local", workers))
    assert [(f.label, f.error) for f in failures] == [("broken", "ValueError: no such file")]
    assert "Traceback" in failures[0].details
    assert (tmp_path / "a.json").exists() and (tmp_path / "b.json").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_ray_runs_two_jobs_at_once_reports_a_failure_and_keeps_usage_stats_off(tmp_path, capsys):
    paths = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    jobs = [Job("a", meet, (paths[0], paths[1])), Job("broken", fail, ("bad config",)),
            Job("b", meet, (paths[1], paths[0]))]
    failures = run_jobs(jobs, Engine("ray", 2))
    assert failures == [Failure("broken", "ValueError: bad config", failures[0].details)]
    a, b = (json.loads(Path(p).read_text()) for p in paths)
    assert a["met"] and b["met"]  # they ran at once
    assert a["pid"] != b["pid"] and a["pid"] != os.getpid()  # in Ray worker processes
    assert a["usage_stats"] == "0"
    assert not ray.is_initialized()  # the Ray it started is shut down
    printed = capsys.readouterr().out
    assert "broken FAILED (ValueError: bad config)" in printed and "[3/3]" in printed


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_a_grid_on_ray_writes_what_the_local_engine_writes_and_resumes(tmp_path, capsys, monkeypatch):
    from clmtl.studies.grid import run_grid

    tiny = ["data.train_size=6", "data.val_size=3", "data.image_size=64", "train.epochs=1", "train.batch_size=3",
            "output.overlays=0", "output.checkpoints=false", "tasks=[cls]", "train.threads=1"]
    starts = []
    monkeypatch.setattr(ray, "init", lambda *a, _init=ray.init, **k: starts.append(1) or _init(*a, **k))
    script = load_benchmark("compare_strategies")
    one_worker = ["--jobs", "1"]  # its imports done once for the baselines and the strategy
    assert script.main(["--engine", "ray", *one_worker, "--strategies", "naive", "--seeds", "0", "--reference",
                        "naive", "--out", str(tmp_path / "ray"), *tiny]) == 0
    assert len(starts) == 1  # one Ray for the baselines and the strategies: it starts once per comparison
    assert json.loads((tmp_path / "ray" / "comparison.json").read_text())["engine"] == "ray"
    on_ray = [json.loads((tmp_path / "ray" / "seed0" / "naive" / "results.json").read_text())]
    local = run_grid(None, tiny, ["naive"], [0], tmp_path / "local", Engine("local", 1))  # here, on one thread
    assert [r["matrix"] for r in on_ray] == [r["matrix"] for r in local]
    assert on_ray[0]["baseline"] == local[0]["baseline"]
    written = tmp_path / "ray" / "seed0" / "naive" / "results.json"
    before = written.stat().st_mtime_ns
    capsys.readouterr()
    assert run_grid(None, tiny, ["naive"], [0], tmp_path / "ray", Engine("ray", 2)) == on_ray
    assert "resuming: 1 finished run(s)" in capsys.readouterr().out
    assert len(starts) == 1  # nothing to train: Ray is not started
    assert written.stat().st_mtime_ns == before  # not trained again
    assert not (tmp_path / "ray" / "failures.log").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_stopping_a_grid_on_ray_stops_its_trials_and_leaves_no_process(tmp_path):
    import psutil

    code = ("import time; from clmtl.studies.engines import Engine, Job, run_jobs; "
            "run_jobs([Job('a', time.sleep, (120,)), Job('b', time.sleep, (120,))], Engine('ray', 2))")
    log = open(tmp_path / "driver.log", "w")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    try:
        driver = psutil.Process(parent.pid)
        deadline, sleepers = time.monotonic() + 180, []  # Ray starts slowly on a loaded machine
        while len(sleepers) < 2 and time.monotonic() < deadline:  # Ray's workers running the two jobs
            time.sleep(0.5)
            tree = driver.children(recursive=True)
            sleepers = [p for p in tree if "ray::run_job" in " ".join(_cmdline(p))]
        assert len(sleepers) == 2, f"the two trials did not start: {(tmp_path / 'driver.log').read_text()[-2000:]}"
        tree = driver.children(recursive=True)
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=60)
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"left running: {[' '.join(_cmdline(p))[:80] for p in alive]}"
        assert parent.returncode == 128 + signal.SIGTERM
    finally:
        if parent.poll() is None:
            parent.kill()
        log.close()


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_a_grid_joins_a_running_ray_cluster_by_its_address(tmp_path):
    import shutil
    import socket
    import tempfile

    import psutil

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # a test cluster: no token
    session = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                        f"--temp-dir={session}"], check=True, capture_output=True, env=env)
        outputs = [tmp_path / "a.txt", tmp_path / "b.txt"]
        jobs = [Job(path.name, path.write_text, (path.name,)) for path in outputs]  # importable on any node
        assert run_jobs(jobs, Engine("ray", 2, f"127.0.0.1:{port}")) == []
        assert [path.read_text() for path in outputs] == ["a.txt", "b.txt"]
        assert not ray.is_initialized()  # disconnected; the cluster is not ours to stop
    finally:  # stop this cluster's processes only (`ray stop` would stop every Ray on the machine)
        started = [p for p in psutil.process_iter() if session in " ".join(_cmdline(p))]
        ours = started + [child for p in started for child in _children(p)]  # agents renamed ray::..., workers
        for process in ours:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(ours, timeout=30)
        shutil.rmtree(session, ignore_errors=True)


def _children(process) -> list:
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:
        return []
