"""benchmarks/speed.py: its timing helpers, and one tiny end-to-end run (no speed is asserted here)."""
import json
import statistics

import pytest
import torch
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def speed():
    return load_benchmark("speed")


@pytest.mark.slow
def test_tiny_run_writes_every_measurement_and_ratios_of_its_medians(speed, tmp_path):
    speed.main(["--image-size", "64", "--repeats", "2", "--warmup", "1", "--train-image-size", "64",
                "--train-batch-size", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "speed.json").read_text())
    assert (tmp_path / "speed.md").read_text().startswith("# Speed")

    assert result["machine"]["torch"] and result["machine"]["threads"] >= 1
    params = result["params"]
    assert params["total"] == params["backbone"] + params["neck"] + params["head"] > 0
    flops = result["flops"]
    assert set(flops) == {"backbone", "forward_all", "seg", "det", "cls", "forward_all_neck", "forward_all_head"}
    assert all(value > 0 for value in flops.values())
    assert flops["forward_all"] == flops["backbone"] + flops["forward_all_neck"] + flops["forward_all_head"]
    assert flops["backbone"] < flops["cls"] < flops["forward_all"]  # one task reads part of what all tasks do

    latency = result["latency"]
    for variant in ("eager", "fused", "fused_cl"):
        for forward in ("backbone", "seg", "det", "cls", "forward_all", "pipeline"):
            assert f"{variant}/{forward}" in latency
    assert {"decode", "decode_worst", "class_maps", "class_maps_argmax", "eager/pipeline_worst"} <= latency.keys()
    for entry in [*latency.values(), *result["train"].values()]:
        assert entry["median_ms"] > 0 and entry["iqr_ms"] >= 0 and len(entry["runs_ms"]) == 2
        assert entry["median_ms"] == pytest.approx(statistics.median(entry["runs_ms"]))

    assert set(result["train"]) == {"naive", "ewc", "replay", "lwf", "joint", "routing"}
    for entry in result["train"].values():
        assert entry["images_per_s"] == pytest.approx(2 / (entry["median_ms"] / 1000))

    medians = {name: entry["median_ms"] for name, entry in {**latency, **result["train"]}.items()}
    expected = set(speed.RATIOS) - {"compile_speedup"}  # --compile not given
    assert set(result["ratios"]) == expected
    for name, ratio in result["ratios"].items():
        assert ratio["value"] == pytest.approx(medians[ratio["numerator"]] / medians[ratio["denominator"]])
        assert ratio["met"] is (None if ratio["target"] is None else ratio["value"] <= ratio["target"])


def test_timed_steps_run_each_strategy_with_its_state_from_the_first_experience(speed, monkeypatch):
    from clmtl.benchmark import build_benchmark

    config = speed.training_config(64, 2)
    benchmark = build_benchmark(config)
    for strategy in ("ewc", "replay", "lwf", "joint", "routing"):
        template = speed.trained_template(strategy, config, benchmark)
        assert template.clock.train_exp_counter == 1 and template.experience.task_label == 1
        plugin = template.plugins[0]
        state = {"ewc": lambda p: 0 in p.importances, "replay": lambda p: len(p.buffer) > 0,
                 "lwf": lambda p: p.teacher is not None, "joint": lambda p: set(p._batches) == {0, 2},
                 "routing": lambda p: 0 in p.usage}[strategy]
        assert state(plugin), strategy
        calls = []
        original = plugin.before_backward
        monkeypatch.setattr(plugin, "before_backward", lambda s, **kw: (calls.append(1), original(s, **kw)))
        weights = [p.detach().clone() for p in template.model.parameters()]
        speed.train_step(template, next(iter(template.dataloader)))
        assert calls == [1], strategy  # the strategy's term joined the timed step
        assert any(not torch.equal(w, p) for w, p in zip(weights, template.model.parameters()))  # and it updated
