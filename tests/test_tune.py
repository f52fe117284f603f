"""Hyperparameter selection: the carved validation split, the candidates, and ``--tune`` end to end."""
import json

import pytest
import torch
from benchmark_scripts import load_benchmark

from clmtl.config import load_config
from clmtl.settings import search_space
from clmtl.stream.benchmark import build_benchmark
from clmtl.training.registry import available, strategy_schemas

TINY = ["data.train_size=8", "data.val_size=3", "data.image_size=64", "train.epochs=1", "train.batch_size=4",
        "output.overlays=0", "output.checkpoints=false", "train.threads=1", "train.warmup=0", "train.ema=0"]


def tiny_config(*overrides):
    return load_config(None, [*TINY, "data.hflip=0", *overrides], strategies=strategy_schemas())


def test_holdout_evaluates_on_training_samples_it_does_not_train_on():
    whole = build_benchmark(tiny_config())
    carved = build_benchmark(tiny_config("data.holdout=0.25"))
    for index, task in enumerate(carved.tasks):
        held = carved.held_out[task.name]
        assert len(held) == 2 and len(carved.val_sets[index]) == 2  # round(0.25 * 8)
        trained = carved.stream.train_stream[index].dataset
        assert len(trained) == 6
        original = whole.stream.train_stream[index].dataset  # no flips (hflip=0): the raw training samples
        for position, sample_index in enumerate(held):
            assert torch.equal(carved.val_sets[index][position][0], original[sample_index][0])
        rest = [i for i in range(8) if i not in held]
        for position, sample_index in enumerate(rest):
            assert torch.equal(trained[position][0], original[sample_index][0])
    assert build_benchmark(tiny_config("data.holdout=0.25")).held_out == carved.held_out  # fixed by the seed
    assert build_benchmark(tiny_config("data.holdout=0.25", "seed=1")).held_out != carved.held_out
    assert whole.held_out == {}


def test_holdout_that_leaves_a_side_empty_is_refused():
    with pytest.raises(Exception, match="data.holdout=0.05 holds out 0 of the task's 8 training samples"):
        build_benchmark(tiny_config("data.holdout=0.05"))


def test_every_declared_search_value_passes_its_own_check():
    from clmtl.settings import make_settings

    spaces = {name: search_space(entry.settings) for name, entry in available().items()}
    assert spaces["ewc"] == {"lambda": (1e2, 1e3, 1e4, 1e5, 1e6)}
    for name, space in spaces.items():
        for key, values in space.items():
            for value in values:
                make_settings(available()[name].settings, {key: value}, f"strategy.{name}")


def test_tunable_components_and_their_candidates():
    from clmtl.studies.tune import candidates, tunable_components

    assert tunable_components(["naive", "ewc+replay", "replay+lwf"]) == ["replay", "ewc", "lwf"]
    assert tunable_components(["naive", "ewc+replay"], ["ewc"]) == ["ewc"]
    with pytest.raises(ValueError, match="--tune lwf: not a component with a search space"):
        tunable_components(["naive", "ewc"], ["lwf"])
    lwf = candidates("lwf")
    assert len(lwf) == 6 and lwf[0].overrides == ["strategy.lwf.alpha=0.5", "strategy.lwf.temperature=1.0"]
    assert candidates("naive") == []


def test_grid_refuses_a_finished_run_trained_with_other_hyperparameters(tmp_path):
    from clmtl.studies.grid import check_reused, run_dir

    folder = run_dir(tmp_path, 0, "ewc+replay")
    folder.mkdir(parents=True)
    trained = tiny_config("strategy.ewc.lambda=100", "strategy.lwf.alpha=3", "train.threads=2").to_dict()
    (folder / "results.json").write_text(json.dumps({"config": trained}))
    path = folder / "results.json"
    check_reused(path, "ewc+replay", tiny_config("strategy.ewc.lambda=100"))  # the same, but for what is unused
    with pytest.raises(ValueError, match="seed0/ewc-replay/results.json: trained with strategy.ewc.lambda=100.0, "
                                         "but this grid asks for 1000.0"):
        check_reused(path, "ewc+replay", tiny_config())
    with pytest.raises(ValueError, match="trained with data.val_size=3, but this grid asks for 200"):
        check_reused(path, "ewc+replay", tiny_config("strategy.ewc.lambda=100", "data.val_size=200"))
    check_reused(folder / "missing.json", "ewc", tiny_config())  # nothing trained: nothing to refuse


@pytest.mark.slow
def test_tune_selects_ewc_lambda_on_held_out_data_and_the_table_uses_it(tmp_path):
    script = load_benchmark("compare_strategies")
    argv = ["--tune", "ewc", "--strategies", "ewc", "--seeds", "0", "--tune-seed", "5", "--recipe", "config",
            "--out", str(tmp_path), "--jobs", "1", *TINY]
    assert script.main(argv) == 0

    record = json.loads((tmp_path / "tune" / "selected.json").read_text())
    assert record["seed"] == 5 and record["holdout"] == 0.25
    scores = {c["values"]["lambda"]: c["score"] for c in record["components"]["ewc"]["candidates"]}
    assert sorted(scores) == [1e2, 1e3, 1e4, 1e5, 1e6]
    for candidate in record["components"]["ewc"]["candidates"]:  # each score is its run's held-out average accuracy
        folder = tmp_path / "tune" / "ewc" / f"lambda_{candidate['values']['lambda']}"
        run = json.loads((folder / "results.json").read_text())
        assert run["average_accuracy"] == candidate["score"] and run["seed"] == 5
        assert run["config"]["data"]["holdout"] == 0.25 and run["held_out"] == record["carved"]
    best = max(scores, key=scores.get)
    assert record["components"]["ewc"]["selected"] == {"lambda": best}
    run = json.loads((tmp_path / "seed0" / "ewc" / "results.json").read_text())  # the reported run: full training
    assert run["config"]["strategy"]["ewc"]["lambda"] == best and run["held_out"] == {}  # data, the selected lambda
    protocol = json.loads((tmp_path / "comparison.json").read_text())
    assert protocol["selected"] == [f"strategy.ewc.lambda={best}"] and protocol["engine"] == "local"
    assert f"`strategy.ewc.lambda={best}`" in (tmp_path / "table.md").read_text()
