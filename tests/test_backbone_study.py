"""benchmarks/backbone_study.py: per backbone, its cost and each strategy's drop, from real (tiny) runs."""
import json

import pytest
from benchmark_scripts import load_benchmark


@pytest.mark.slow
def test_study_table_holds_each_backbones_cost_and_the_runs_drops(tmp_path):
    study = load_benchmark("backbone_study")
    tiny = ["data.train_size=4", "data.val_size=2", "data.image_size=64", "train.epochs=1", "train.batch_size=2",
            "output.overlays=0", "output.checkpoints=false", "train.threads=1"]
    argv = ["--backbones", "yolov8n,mobilenet_v3_small", "--strategies", "naive", "--seeds", "0,1", "--jobs", "1",
            "--image-size", "64", "--repeats", "2", "--out", str(tmp_path), *tiny]
    assert study.main(argv) == 0

    rows = {row["backbone"]: row for row in json.loads((tmp_path / "backbones.json").read_text())}
    assert rows["yolov8n"]["params"] == 1_451_701 and rows["mobilenet_v3_small"]["params"] == 1_031_685
    assert rows["mobilenet_v3_small"]["gflops"] < rows["yolov8n"]["gflops"]
    runs = [json.loads((tmp_path / "mobilenet_v3_small" / f"seed{s}" / "naive" / "results.json").read_text())
            for s in (0, 1)]
    assert all(r["config"]["model"]["backbone"] == "mobilenet_v3_small" for r in runs)
    assert set(rows["mobilenet_v3_small"]["drops"]["naive"]) == {"seg", "det", "cls"}
    assert (tmp_path / "plots" / "drops.png").stat().st_size > 0
    assert "| mobilenet_v3_small | 1.03 M |" in (tmp_path / "backbones.md").read_text()


def run_results(seed: int, baseline: dict, drop: dict) -> dict:
    """The fields of a results.json that the study reads, for one naive run on seg, det, cls."""
    tasks = [{"name": name, "metric": "score"} for name in ("seg", "det", "cls")]
    return {"strategy": "naive", "seed": seed, "benchmark": "shapes", "tasks": tasks, "baseline": baseline,
            "final": {name: 0.1 for name in baseline}, "drop_vs_baseline": drop, "average_accuracy": 0.1,
            "forgetting": {"seg": 0.0, "det": 0.0, "cls": None}, "bwt": 0.0, "train_seconds": {"seg": 1.0}}


def test_study_rows_on_hand_made_runs(tmp_path, monkeypatch):
    """Two seeds: det baselines 0.2 and 0.4 give 0.300 ± 0.141 (sample std); seg drops 0.1 and 0.3 give 20.0 ± 14.1 %;
    a drop defined on one seed only (0.5) gives 50.0 ± 0.0; a drop defined on none gives –."""
    study = load_benchmark("backbone_study")
    runs = [run_results(0, {"seg": 0.5, "det": 0.2, "cls": 0.9}, {"seg": 0.1, "det": None, "cls": None}),
            run_results(1, {"seg": 0.7, "det": 0.4, "cls": 0.9}, {"seg": 0.3, "det": 0.5, "cls": None})]
    monkeypatch.setattr(study, "run_grid", lambda *args, **kwargs: runs)
    monkeypatch.setattr(study, "backbone_cost", lambda name, size, repeats: {
        "params": 2_000_000, "gflops": 1.5, "forward_all_ms": 20.0, "forward_all_iqr_ms": 1.0})
    assert study.main(["--backbones", "yolov8n", "--strategies", "naive", "--seeds", "0,1", "--out",
                       str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "backbones.json").read_text())
    assert row["baseline"] == {"seg": "0.600 ± 0.141", "det": "0.300 ± 0.141", "cls": "0.900 ± 0.000"}
    assert row["drops"]["naive"] == {"seg": "20.0 ± 14.1", "det": "50.0 ± 0.0", "cls": "–"}
    assert "| yolov8n | 2.00 M | 1.50 | 20.0 | 0.600 ± 0.141 | 0.300 ± 0.141 | 0.900 ± 0.000 | 20.0 ± 14.1 | " \
           "50.0 ± 0.0 | – |" in (tmp_path / "backbones.md").read_text()
