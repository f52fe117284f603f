"""benchmarks/backbone_study.py: per backbone, its cost and each strategy's drop, from real (tiny) runs."""
import json

import numpy as np
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
    row = rows["mobilenet_v3_small"]
    baselines = [r["baseline"]["det"] for r in runs]
    assert row["baseline"]["det"] == f"{np.mean(baselines):.3f} ± {np.std(baselines, ddof=1):.3f}"
    for task in ("seg", "det", "cls"):  # a drop is undefined (–) where a tiny baseline scored 0
        drops = [d for d in (r["drop_vs_baseline"][task] for r in runs) if d is not None]
        if not drops:
            expected = "–"
        elif len(drops) == 1:
            expected = f"{100 * drops[0]:.1f} ± 0.0"
        else:
            expected = f"{100 * np.mean(drops):.1f} ± {100 * np.std(drops, ddof=1):.1f}"
        assert row["drops"]["naive"][task] == expected
    assert (tmp_path / "plots" / "drops.png").stat().st_size > 0
    assert "| mobilenet_v3_small | 1.03 M |" in (tmp_path / "backbones.md").read_text()
