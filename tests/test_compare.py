"""Strategy comparison: aggregation over seeds, table formats, resumable runs and the reproducibility check."""
import csv
import io
import json

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

from clmtl.studies.compare import Comparison, Stat

TASKS = [{"name": "seg", "kind": "segmentation", "metric": "mIoU"},
         {"name": "cls", "kind": "classification", "metric": "top1"}]


def fake_results(strategy, seed, seg, cls, baseline=None, memory=0):
    matrix = [[seg + 0.2, 0.0], [seg, cls]]
    base = baseline or {}
    return {"strategy": strategy, "seed": seed, "benchmark": "shapes", "tasks": TASKS, "matrix": matrix,
            "final": {"seg": seg, "cls": cls}, "baseline": base,
            "forgetting": {"seg": 0.2, "cls": None}, "bwt": -0.2, "average_accuracy": (seg + cls) / 2,
            "drop_vs_baseline": {k: (v - {"seg": seg, "cls": cls}[k]) / v for k, v in base.items()},
            "train_seconds": {"seg": 10.0, "cls": 5.0 + seed}, "memory_bytes": memory}


def test_stat_is_mean_and_sample_std_ignoring_undefined_values():
    stat = Stat.of([0.2, None, 0.4, float("nan")])
    assert stat.mean == pytest.approx(0.3) and stat.std == pytest.approx(np.sqrt(0.02)) and stat.count == 2
    assert Stat.of([0.5]).std == 0.0 and Stat.of([None]).text() == "–"
    assert Stat.of([0.1234, 0.1434]).text(digits=3, scale=100) == "13.340 ± 1.414"


def test_comparison_table_values_are_the_per_seed_means():
    base = {"seg": 0.5, "cls": 0.8}
    results = [fake_results("naive", 0, 0.2, 0.6, base), fake_results("naive", 1, 0.4, 0.8, base),
               fake_results("ewc+replay", 0, 0.45, 0.7, base, memory=2**20)]
    comparison = Comparison.from_results(["ewc+replay", "naive"], results)
    rows = {row["strategy"]: row for row in csv.DictReader(io.StringIO(comparison.csv()))}
    assert list(rows) == ["ewc+replay", "naive"]  # the order asked for
    assert float(rows["naive"]["seg mIoU mean"]) == pytest.approx(0.3)
    assert float(rows["naive"]["seg mIoU std"]) == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert float(rows["naive"]["seg drop % mean"]) == pytest.approx(100 * np.mean([0.6, 0.2]))
    assert float(rows["naive"]["avg forgetting mean"]) == pytest.approx(0.2)
    assert float(rows["naive"]["train s mean"]) == pytest.approx(15.5)
    assert float(rows["ewc+replay"]["memory MB mean"]) == pytest.approx(1.0)
    assert rows["ewc+replay"]["seeds"] == "1"
    assert float(rows["naive"]["seg mIoU ci95"]) == pytest.approx(12.7062 * np.std([0.2, 0.4], ddof=1) / np.sqrt(2),
                                                                  rel=1e-4)  # t(0.975, 1) = 12.7062 from tables
    markdown = comparison.markdown()
    assert "| single-task baseline | 2 |  | 0.500 ± 0.000 | 0.800 ± 0.000 |" in markdown
    assert "| naive | 2 | 0.500 ± 1.271 | 0.300 ± 1.271 |" in markdown  # avg accuracy 0.5 = mean of last rows
    assert "| ewc+replay | 1 | 0.575 | 0.450 |" in markdown  # one seed: no interval
    assert "ewc+replay" in comparison.latex() and "\\pm" in comparison.latex() and "drop \\%" in comparison.latex()
    np.testing.assert_allclose(comparison.mean_matrix("naive"), [[0.5, 0.0], [0.3, 0.7]])


def test_strategies_are_marked_where_they_differ_from_ewc_seed_by_seed():
    seeds = range(6)
    noise = [0.05, -0.03, 0.02, -0.04, 0.01, 0.0]
    results = ([fake_results("ewc", s, 0.3 + noise[s], 0.5) for s in seeds]
               + [fake_results("replay", s, 0.4 + noise[s], 0.5 + 0.01 * (-1) ** s) for s in seeds]
               + [fake_results("naive", s, 0.3 + noise[(s + 1) % 6], 0.5) for s in seeds])
    comparison = Comparison.from_results(["ewc", "replay", "naive"], results)
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in comparison.markdown().splitlines()
            if line.startswith("| ")}
    assert rows["replay"][3].endswith("*")  # seg: +0.1 on every seed, although seeds vary by 0.09
    assert not rows["replay"][4].endswith("*")  # cls: +-0.01 around 0
    assert not rows["naive"][3].endswith("*")  # seg: the same values, paired with other seeds
    assert not any(cell.endswith("*") for cell in rows["ewc"])
    table = {row["strategy"]: row for row in csv.DictReader(io.StringIO(comparison.csv()))}
    assert float(table["replay"]["seg mIoU p vs ewc"]) < 0.05 and table["ewc"]["seg mIoU p vs ewc"] == ""
    assert "Minimum detectable difference vs ewc" in comparison.markdown()
    assert "$^*$" in comparison.latex()


def test_a_strategy_without_runs_is_an_error():
    with pytest.raises(ValueError, match="no finished run of \\['lwf'\\]"):
        Comparison.from_results(["naive", "lwf"], [fake_results("naive", 0, 0.2, 0.6)])


def test_check_reports_each_target_and_fails_outside_the_tolerance():
    script = load_benchmark("compare_strategies")
    targets = [{"strategy": "naive", "seed": 0, "task": "seg", "value": 0.30},
               {"strategy": "naive", "seed": 0, "task": "cls", "value": 0.50},
               {"strategy": "ewc", "seed": 0, "task": "seg", "value": 0.30}]
    lines = script.check_against(targets, [fake_results("naive", 0, 0.31, 0.6)], tolerance=0.02)
    assert [line[:4] for line in lines] == ["ok  ", "FAIL", "FAIL"]
    assert "missing" in lines[2]


def test_targets_name_how_their_runs_were_trained(tmp_path):
    script = load_benchmark("compare_strategies")
    shipped = script.read_targets()
    assert {row["strategy"] for row in shipped} >= {"naive", "ewc"} and shipped[0]["overrides"]
    written = tmp_path / "written.csv"
    runs = [fake_results("naive", 0, 0.25, 0.5), fake_results("naive", 1, 0.3, 0.6), fake_results("lwf", 0, 0.1, 0.2)]
    script.write_targets(runs, ["data.val_size=200", "strategy.ewc.lambda=100.0"], written)
    assert [(r["strategy"], r["task"], r["value"], r["overrides"]) for r in script.read_targets(written)] == [
        ("naive", "seg", 0.25, ["data.val_size=200", "strategy.ewc.lambda=100.0"]),
        ("naive", "cls", 0.5, ["data.val_size=200", "strategy.ewc.lambda=100.0"])]  # seed 0 of CHECKED only
    mixed = tmp_path / "targets.csv"
    mixed.write_text("strategy,seed,task,value,overrides\nnaive,0,seg,0.5,data.val_size=200\n"
                     "ewc,0,seg,0.5,data.val_size=60\n")
    with pytest.raises(SystemExit, match="every row must name the same overrides"):
        script.read_targets(mixed)


@pytest.mark.slow
def test_script_runs_resumes_and_writes_the_table(tmp_path, monkeypatch):
    script = load_benchmark("compare_strategies")
    tiny = ["data.train_size=6", "data.val_size=3", "data.image_size=64", "train.epochs=1", "train.batch_size=3",
            "output.overlays=0", "output.checkpoints=false", "train.threads=1"]
    argv = ["--strategies", "naive,ewc", "--seeds", "0,1", "--out", str(tmp_path), "--jobs", "1", *tiny]
    assert script.main(argv) == 0

    runs = [json.loads((tmp_path / f"seed{s}" / name / "results.json").read_text())
            for s in (0, 1) for name in ("naive", "ewc")]
    baselines = json.loads((tmp_path / "seed1" / "baselines.json").read_text())
    assert runs[3]["baseline"] == {t: baselines["scores"][t][m] for t, m in
                                   [("seg", "mIoU"), ("det", "mAP50_95"), ("cls", "top1")]}
    rows = {row["strategy"]: row for row in csv.DictReader(open(tmp_path / "table.csv"))}
    assert float(rows["ewc"]["cls top1 mean"]) == pytest.approx(np.mean([runs[1]["final"]["cls"],
                                                                          runs[3]["final"]["cls"]]))
    assert "python benchmarks/compare_strategies.py --strategies naive,ewc" in (tmp_path / "table.md").read_text()
    for plot in ("final_scores.png", "matrices.png"):
        assert (tmp_path / "plots" / plot).stat().st_size > 0

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    import clmtl.studies.grid

    monkeypatch.setattr(clmtl.studies.grid, "train_strategy", must_not_train)
    monkeypatch.setattr(clmtl.studies.grid, "train_baselines", must_not_train)
    assert script.main(argv) == 0  # everything is reused


def test_stopping_a_parallel_run_terminates_its_workers(process_tree):
    # Before, SIGTERM killed only the parent: the spawned trainings ran on as orphans, finishing and writing results.
    import signal
    import sys
    import time

    import psutil

    code = ("import time; from clmtl.studies.engines import Engine, Job, run_jobs; "
            "run_jobs([Job('a', time.sleep, (120,)), Job('b', time.sleep, (120,))], Engine('local', 2))")
    parent = process_tree.start([sys.executable, "-c", code])
    deadline, workers = time.monotonic() + 60, []
    while len(workers) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        workers = process_tree.workers()
    assert len(workers) == 2, "the pool's two workers did not start"
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=30)
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"workers left running: {[p.pid for p in alive]}"
    assert parent.returncode == 128 + signal.SIGTERM  # exits like a SIGTERM'd process, through `finally` blocks
