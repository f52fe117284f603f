"""Published experiments as data (``clmtl.studies.protocols``, ``benchmarks/protocols/``): the verdict rule on hand-made
cells, the translation of the papers' hyperparameters into clmtl's conventions, and bad protocol files."""
import collections
import json
from pathlib import Path

import pytest

import clmtl
from clmtl.errors import ConfigError
from clmtl.studies.protocols import Cell, Protocol, Published, available_protocols, mnist_source, verdict

PROTOCOLS = Path(__file__).parents[1] / "benchmarks" / "protocols"


@pytest.mark.parametrize("interval, mean, paper, expected", [
    ((0.90, 0.95), 0.925, Published(0.96, 0.02), "reproduced"),          # outside the interval, inside its SEM
    ((0.90, 0.95), 0.925, Published(0.93, 0.0), "reproduced"),
    ((0.90, 0.95), 0.925, Published(0.98, 0.02), "not reproduced (-0.055)"),
    ((0.90, 0.95), 0.925, Published(0.85, 0.04), "not reproduced (+0.075)"),
    ((0.90, 0.95), 0.925, Published(0.955, None), "not reproduced (-0.030)"),  # no SEM: the interval alone
    ((0.90, 0.95), 0.925, None, "no published number"),
])
def test_the_verdict_widens_our_interval_by_the_papers_standard_error(interval, mean, paper, expected):
    assert verdict(interval, mean, paper) == expected


def test_a_cells_interval_is_students_t_over_its_seeds():
    cell = Cell("p", "task", "ewc", (0.90, 0.92, 0.94), Published(0.99, 0.001))
    half = 4.302652729911275 * 0.02 / 3 ** 0.5  # t(0.975, 2 df) x sd / sqrt(n)
    assert cell.mean == pytest.approx(0.92)
    assert cell.interval == pytest.approx((0.92 - half, 0.92 + half))
    assert cell.verdict == "not reproduced (-0.070)"
    assert cell.row()["low"] == f"{0.92 - half:.4f}" and cell.row()["paper"] == "0.9900"


def test_every_shipped_protocol_loads_and_says_where_its_numbers_come_from():
    protocols = available_protocols(PROTOCOLS)
    assert {"split_mnist_2019", "split_mnist_2022", "permuted_mnist"} <= set(protocols)
    for path in protocols.values():
        protocol = Protocol.load(path)
        assert protocol.source["url"] and protocol.source["table"]
        for method in protocol.methods.values():
            assert set(method.published) == set(protocol.scenarios)


def test_the_papers_hyperparameters_are_translated_into_clmtls_conventions():
    protocol = Protocol.load(PROTOCOLS / "split_mnist_2019.yaml")
    assert protocol.strategy_for("ewc", "task") == ("ewc", ["strategy.ewc.lambda=5000000.0",
                                                           "strategy.ewc.fisher=predicted"])
    strategy, overrides = protocol.strategy_for("online_ewc", "domain")  # lambda 1e8, gamma 0.7
    assert strategy == "ewc" and "strategy.ewc.lambda=35000000.0" in overrides and "strategy.ewc.decay=0.7" in overrides
    assert protocol.strategy_for("lwf", "class")[1][-1] == "strategy.lwf.alpha=[0, 1, 2, 3, 4]"
    assert protocol.strategy_for("si", "class") == ("si", ["strategy.si.c=0.5", "strategy.si.damping=0.1"])
    config = clmtl.load_config(protocol.config("task", {"format": "folder", "root": "x"}))
    assert (config.model.backbone, config.model.hidden, config.data.image_size, config.data.channels) == \
        ("mlp", [400, 400], 28, 1)
    assert (config.train.iterations, config.train.batch_size, config.train.lr, config.train.optimizer) == \
        (2000, 128, 0.001, "adam")
    assert not config.train.reset_optimizer and config.train.ema == 0 and config.data.hflip == 0
    # Avalanche's LwF sums its KL (no T^2) over old heads: per-head weight T^2 (task), e * T^2 for the shared head
    assert protocol.avalanche_for("lwf", "task") == ("LwF", {"alpha": [0.0, 4.0, 4.0, 4.0, 4.0], "temperature": 2.0})
    assert protocol.avalanche_for("lwf", "class")[1]["alpha"] == [0.0, 4.0, 8.0, 12.0, 16.0]
    replay = Protocol.load(PROTOCOLS / "split_mnist_2022.yaml").strategy_for("replay", "class")[1]
    assert "strategy.replay.mem_per_class=100" in replay


def test_a_bad_protocol_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntitle: y\nsource: {}\nruns: 1\nscenarios: [task]\nmethods: {}\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: missing key 'protocol'"):
        Protocol.load(path)
    path.write_text("protocol: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML"):
        Protocol.load(path)


def test_mnist_is_read_from_torchvisions_files_or_class_folders(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    assert mnist_source(tmp_path) == {"format": "torchvision", "dataset": "MNIST", "root": str(tmp_path)}
    folders = tmp_path / "folders"
    for split in ("train", "val"):
        (folders / split).mkdir(parents=True)
    assert mnist_source(folders) == {"format": "folder", "root": str(folders)}
    with pytest.raises(ConfigError, match="neither torchvision's MNIST files"):
        mnist_source(tmp_path / "empty")


@pytest.mark.slow
def test_reproduce_writes_a_verdict_per_cell_on_mnist_files_with_avalanches_rows(tmp_path, capsys):
    import csv

    from benchmark_scripts import load_benchmark
    from tiny_mnist import ten_digit_mnist

    root = ten_digit_mnist(tmp_path / "mnist", 10)
    script = load_benchmark("reproduce")
    assert script.main(["--list"]) == 0 and "split_mnist_2019:" in capsys.readouterr().out
    out = tmp_path / "out"
    code = script.main(["--protocol", "split_mnist_2019", "--root", str(root), "--out", str(out), "--seeds", "0,1",
                        "--strategies", "naive,ewc", "--scenarios", "task", "--iterations", "2", "--avalanche",
                        "--set", "strategy.ewc.fisher_max_samples=5"])
    assert code == 0
    recorded = {method: json.loads((out / "task" / "seed0" / method / "results.json").read_text())["config"]
                for method in ("naive", "ewc")}
    assert recorded["ewc"]["strategy"]["ewc"]["fisher_max_samples"] == 5
    assert "ewc" not in recorded["naive"].get("strategy", {})  # a strategy's change reaches its own cells only
    with open(out / "table.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["protocol", "scenario", "strategy", "seeds", "mean", "low", "high", "paper", "verdict"]
    assert [(r["scenario"], r["strategy"], r["seeds"]) for r in rows] == [
        ("task", "naive", "2"), ("task", "avalanche:Naive", "2"), ("task", "ewc", "2"), ("task", "avalanche:EWC", "2")]
    assert rows[0]["paper"] == "0.8719" and rows[1]["paper"] == ""
    assert rows[0]["verdict"] == "reproduced" or rows[0]["verdict"].startswith("not reproduced (")
    assert "2 iterations per task instead of the paper's 2000" in (out / "table.md").read_text()
    assert "changed from the paper: strategy.ewc.fisher_max_samples=5" in (out / "table.md").read_text()
    assert (out / "plots" / "split_mnist_2019.png").exists()


def test_check_compares_each_rerun_cell_with_its_shipped_mean(capsys):
    from benchmark_scripts import load_benchmark

    script = load_benchmark("reproduce")
    shipped = script.read_targets("split_mnist_2019")
    assert {(t["scenario"], t["strategy"]) for t in shipped} >= {("task", "naive"), ("task", "si")}
    target = next(t for t in shipped if t["strategy"] == "si")
    near = Cell("split_mnist_2019", "task", "si", (float(target["mean"]) + 0.01,), None)
    far = Cell("split_mnist_2019", "task", "si", (float(target["mean"]) - 0.05,), None)
    assert script.check([near], [target]) == 0 and capsys.readouterr().out.startswith("ok")
    assert script.check([far], [target]) == 1 and capsys.readouterr().out.startswith("FAIL")


def test_check_reruns_each_cell_on_its_own_seeds_and_a_shared_run_once(tmp_path):
    from benchmark_scripts import load_benchmark

    script = load_benchmark("reproduce")
    protocol = Protocol.load(PROTOCOLS / "split_mnist_2019.yaml")
    targets = [{"scenario": "domain", "strategy": "naive", "seeds": "20"},
               {"scenario": "task", "strategy": "ewc", "seeds": "5"},
               {"scenario": "task", "strategy": "avalanche:EWC", "seeds": "5"}]
    runs = script.check_runs(protocol, targets, {"format": "folder", "root": "DIR"}, None, tmp_path)
    counted = collections.Counter((scenario, row) for scenario, row, *_ in runs)
    assert counted == {("domain", "naive"): 20, ("task", "ewc"): 5, ("task", "avalanche:EWC"): 5}
    assert len({folder for *_, folder, _ in runs}) == len(runs)
