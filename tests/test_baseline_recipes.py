"""benchmarks/baseline_recipes.py: baselines per recipe and seed, the same numbers `clmtl run` gets, in one table."""
import argparse
import json

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

from clmtl.config import load_config
from clmtl.runner import run

TINY = ["data.train_size=4", "data.val_size=2", "data.image_size=64", "train.epochs=2", "train.batch_size=2",
        "output.overlays=0", "output.checkpoints=false", "train.threads=1"]


@pytest.mark.slow
def test_recipes_table_holds_the_baselines_clmtl_run_trains(tmp_path):
    recipes = load_benchmark("baseline_recipes")
    argv = ["--tasks", "seg,cls", "--seeds", "0,1", "--jobs", "1", "--out", str(tmp_path / "study"),
            "--recipe", "plain=", "--recipe", "warm=train.warmup=0.5 train.lr=0.004", *TINY]
    assert recipes.main(argv) == 0

    rows = {row["recipe"]: row for row in json.loads((tmp_path / "study" / "recipes.json").read_text())}
    stored = json.loads((tmp_path / "study" / "warm" / "seed1.json").read_text())
    assert set(stored["scores"]) == {"seg", "cls"}  # only the asked tasks are trained
    assert stored["config"]["train"]["warmup"] == 0.5 and stored["config"]["train"]["lr"] == 0.004
    for name, overrides in [("plain", []), ("warm", ["train.warmup=0.5", "train.lr=0.004"])]:
        results = run(load_config(None, [*TINY, *overrides, "seed=1"]), "naive", tmp_path / f"run_{name}")
        assert rows[name]["values"]["seg"][1] == results.baseline["seg"]
        assert rows[name]["values"]["cls"][1] == results.baseline["cls"]
    values = rows["warm"]["values"]["seg"]
    table = (tmp_path / "study" / "recipes.md").read_text()
    assert f"| warm | `train.warmup=0.5` `train.lr=0.004` | {np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} " \
           f"({values[0]:.3f} / {values[1]:.3f}) |" in table
    assert "python benchmarks/baseline_recipes.py --tasks seg,cls" in table


def test_finished_runs_are_reused(tmp_path, monkeypatch):
    recipes = load_benchmark("baseline_recipes")
    path = tmp_path / "only" / "seed0.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"scores": {"cls": {"top1": 0.5}}, "seconds": {"cls": 3.0},
                                "metrics": {"cls": "top1"}}))
    monkeypatch.setattr(recipes, "train_recipe", lambda *args: pytest.fail("a finished run was retrained"))
    assert recipes.main(["--seeds", "0", "--recipe", "only=", "--out", str(tmp_path)]) == 0
    assert "| only | – | 0.500 ± 0.000 (0.500) | 3 |" in (tmp_path / "recipes.md").read_text()


def test_bad_recipes_and_tasks_are_clear_errors(capsys):
    recipes = load_benchmark("baseline_recipes")
    with pytest.raises(argparse.ArgumentTypeError, match="expected NAME=KEY=VALUE"):
        recipes.parse_recipe("train.warmup")
    assert recipes.parse_recipe("w=train.warmup=3 train.lr=0.001") == ("w", ("train.warmup=3", "train.lr=0.001"))
    with pytest.raises(SystemExit):
        recipes.main(["--tasks", "cls,depth"])
    assert "unknown task(s) ['depth']" in capsys.readouterr().err
    with pytest.raises(Exception, match="train.warmpu"):
        recipes.main(["--recipe", "typo=train.warmpu=3"])
