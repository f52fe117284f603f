"""benchmarks/padded_input.py: the first layer drawn for the padded input's fan-in, and a run of the script."""
import json

import pytest
import torch
from benchmark_scripts import load_benchmark
from tiny_mnist import ten_digit_mnist

script = load_benchmark("padded_input")


def test_the_first_layer_is_the_same_draw_scaled_to_the_padded_layers_bound():
    ours, padded = script.padded_mlp(784, seed=3), script.padded_mlp(1024, seed=3)
    assert float(ours[1].weight.abs().max()) <= 1 / 28 and float(padded[1].weight.abs().max()) <= 1 / 32
    assert float(padded[1].weight.abs().max()) > 0.99 / 32  # drawn over the whole range
    assert torch.allclose(padded[1].weight, ours[1].weight * 28 / 32)
    assert torch.allclose(padded[1].bias, ours[1].bias * 28 / 32)
    assert torch.equal(padded[3].weight, ours[3].weight)  # the other layers as drawn


@pytest.mark.slow
def test_the_script_trains_the_protocols_ewc_cell_with_that_model(tmp_path, capsys):
    root = ten_digit_mnist(tmp_path / "mnist", 10)
    out = tmp_path / "run"
    assert script.main(["--root", str(root), "--fan-in", "1024", "--iterations", "2", "--fisher-samples", "4",
                        "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["matrix"]) == 10 and results["scenario"] == "domain"
    assert results["config"]["strategy"]["ewc"]["lambda"] == 250.0  # the paper's 500 in clmtl's convention
    assert "first layer drawn for 1024 inputs" in capsys.readouterr().out
