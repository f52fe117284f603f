"""benchmarks/seed_protocol.py: the seed's Table 1 and efficiency section from one protocol run."""
import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

from clmtl.config import load_config
from clmtl.stream.tasks import DETECTION, TaskSpec
from clmtl.training.registry import strategy_schemas

ROOT = Path(__file__).parents[1]


def test_task_descriptions_round_trip_through_results_json():
    task = TaskSpec("det", DETECTION, ("cat", "dog"), (3, 17))
    assert TaskSpec.from_dict(json.loads(json.dumps(task.as_dict()))) == task


def test_the_real_data_example_config_is_valid():
    config = load_config(ROOT / "examples" / "real_data.yaml", strategies=strategy_schemas())
    assert config.benchmark == "files" and config.data.image_size == 512
    assert config.strategy["ewc"]["lambda"] == 1000.0 and config.train.optimizer == "adam"
    assert (config.data.det.train_size, config.data.det.val_size) == (240, 60)


@pytest.mark.slow
def test_protocol_writes_table_one_and_efficiency_from_its_run(tmp_path):
    script = load_benchmark("seed_protocol")
    tiny = ["data.train_size=6", "data.val_size=3", "data.image_size=64", "train.epochs=1", "train.batch_size=3",
            "output.overlays=0", "output.checkpoints=false", "train.threads=1", "train.optimizer=sgd"]
    assert script.main(["--out", str(tmp_path), "--repeats", "2", *tiny]) == 0

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    summary = json.loads((tmp_path / "seed_protocol.json").read_text())
    assert results["strategy"] == "ewc" and results["config"]["strategy"]["ewc"]["lambda"] == 1000.0
    assert results["config"]["train"]["optimizer"] == "sgd"  # an explicit override wins over the protocol
    last_row = results["matrix"][-1]  # each task's primary metric after the last experience, from the raw matrix
    for index, (name, row) in enumerate(summary["table1"].items()):
        assert row["ewc_final"] == last_row[index]
        baseline = row["baseline"]
        expected_drop = None if not baseline else (baseline - last_row[index]) / baseline
        assert row["drop"] == pytest.approx(expected_drop)
    # the parts of a freshly built model add up to the trained model's parameter count
    assert results["params"] == sum(v for k, v in summary["params"].items() if k != "total")
    assert set(summary["inference_ms"]) == {"seg", "det", "cls", "all three (forward_all)"}
    assert all(t["median_ms"] > 0 for t in summary["inference_ms"].values())
    text = (tmp_path / "seed_protocol.md").read_text()
    assert "| seg | mIoU |" in text and "## Efficiency" in text and "| sequential cls |" in text


def test_table_one_on_hand_made_scores():
    """Baseline 0.5 and final 0.2: a drop of 60.0 % relative and 0.300 absolute; no baseline: dashes."""
    script = load_benchmark("seed_protocol")
    results = {"benchmark": "shapes", "seed": 0, "params": 1000,
               "tasks": [{"name": "seg", "metric": "mIoU"}, {"name": "cls", "metric": "top1"}],
               "config": {"strategy": {"ewc": {"lambda": 1000.0}}, "train": {"optimizer": "adam", "threads": 1},
                          "data": {"image_size": 64}},
               "baseline": {"seg": 0.5}, "final": {"seg": 0.2, "cls": 0.75}, "drop_vs_baseline": {"seg": 0.6},
               "baseline_train_seconds": {"seg": 1.0}, "train_seconds": {"seg": 2.0, "cls": 3.0}}
    latency = {"seg": {"median_ms": 5.0, "iqr_ms": 0.5}}
    text = script.protocol_markdown(results, latency, {"backbone": 600, "head": 400})
    assert "| seg | mIoU | 0.500 | 0.200 | 60.0 % | 0.300 |" in text
    assert "| cls | top1 | – | 0.750 | – | – |" in text
    assert "Parameters: 1,000 (backbone 600, head 400)." in text
