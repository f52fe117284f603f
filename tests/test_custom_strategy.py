"""examples/custom_strategy.py: a strategy in one short file, registered from a path and run by name."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

EXAMPLE = Path(__file__).parents[1] / "examples" / "custom_strategy.py"
KILLER = Path(__file__).with_name("stopping_strategies.py")  # registers "killer" (tests/test_checkpoint.py)


class OneHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x, task_label):
        return self.linear(x)


def test_mas_importance_is_the_mean_absolute_gradient_of_the_output_norm(isolated_registry):
    from avalanche.benchmarks.utils import AvalancheDataset
    from avalanche.benchmarks.utils.data_attribute import TaskLabels
    from avalanche.benchmarks.utils.flat_data import ConstantSequence
    from torch.utils.data import TensorDataset

    from clmtl.training.registry import build_plugins, load_strategy_file

    load_strategy_file(EXAMPLE)
    (plugin,) = build_plugins("mas", {"mas": {"batch_size": 4}})
    torch.manual_seed(0)
    model = OneHead()
    linear = model.linear
    x = torch.randn(8, 3)
    data = AvalancheDataset([TensorDataset(x, torch.zeros(8, dtype=torch.long))],
                            data_attributes=[TaskLabels(ConstantSequence(0, 8))])
    plugin.after_training_exp(SimpleNamespace(model=model, experience=SimpleNamespace(dataset=data), device="cpu"))

    expected = torch.zeros_like(linear.weight)
    for batch in (x[:4], x[4:]):  # d/dW of sum ||W x + b||^2 / B is 2 (W x + b) x^T / B
        expected += (2 * (batch @ linear.weight.T + linear.bias).T @ batch / 4).abs().detach() / 2
    saved, importance = plugin.anchors[0]
    torch.testing.assert_close(importance["linear.weight"], expected)
    torch.testing.assert_close(saved["linear.weight"], linear.weight.detach())


@pytest.mark.slow
def test_the_cli_lists_and_runs_a_strategy_from_a_file(tmp_path, isolated_registry, clmtl_cli):
    listed = clmtl_cli("strategies", "--plugin-file", str(EXAMPLE))
    assert listed.returncode == 0 and "strategy.mas.lambda = 1.0 (float, must be >= 0)" in listed.stdout
    assert "strategy.mas.batch_size = 16 (int, must be >= 1)" in listed.stdout

    result = clmtl_cli("run", "--plugin-file", str(EXAMPLE), "--strategy", "mas+bnfreeze", "--no-baselines",
                   "--out", str(tmp_path), "data.train_size=6", "data.val_size=3", "data.image_size=64",
                   "train.epochs=1", "train.batch_size=3", "output.overlays=0", "train.threads=1",
                   "strategy.mas.lambda=5.0")
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["strategy"] == "mas+bnfreeze" and written["config"]["strategy"]["mas"]["lambda"] == 5.0


@pytest.mark.slow
def test_the_example_stopped_inside_its_second_experience_resumes_to_the_uninterrupted_run(
        tmp_path, isolated_registry, clmtl_cli, monkeypatch):
    """SIGTERM inside the second experience checkpoints the iteration it interrupts; the resumed run keeps the MAS
    anchors of the first experience (declared state) and ends bit for bit like an uninterrupted run."""
    from bitwise import same

    from clmtl.io import load_checkpoint

    files = ["--plugin-file", str(EXAMPLE), "--plugin-file", str(KILLER)]
    common = [*files, "--strategy", "mas+killer", "--no-baselines", "data.train_size=16", "data.val_size=4",
              "data.image_size=64", "train.epochs=2", "train.batch_size=4", "output.overlays=0", "train.threads=1",
              "strategy.mas.lambda=1000.0"]  # a penalty that moves the weights: without it the run ends elsewhere
    reference = clmtl_cli("run", *common, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    for name, value in {"KILL_FOR_TEST": "1", "KILL_AT": "4", "KILL_SIGNAL": "SIGTERM"}.items():
        monkeypatch.setenv(name, value)
    stopped = clmtl_cli("run", *common, "--out", str(tmp_path / "run"))
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    monkeypatch.delenv("KILL_FOR_TEST")
    resumed = clmtl_cli("run", *files, "--resume", str(tmp_path / "run"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed inside experience 1" in (tmp_path / "run" / "log.txt").read_text()
    expected = json.loads((tmp_path / "reference" / "results.json").read_text())
    assert json.loads((tmp_path / "run" / "results.json").read_text())["matrix"] == expected["matrix"]
    expected, got = (load_checkpoint(tmp_path / folder / "checkpoints" / "last.pt") for folder in ("reference", "run"))
    assert same(got["model"], expected["model"]) and same(got["plugins"], expected["plugins"])  # the anchors too


def test_a_missing_plugin_file_is_a_clear_error(clmtl_cli):
    result = clmtl_cli("strategies", "--plugin-file", "nowhere.py")
    assert result.returncode == 2 and "nowhere.py" in result.stderr and "Traceback" not in result.stderr
