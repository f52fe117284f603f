"""The papers' classifiers (``mlp``, ``reduced_resnet18``) and a user's own module as clmtl models: their forward
passes against the layers computed by hand, heads that grow, and the refusals of streams and strategies they cannot
serve."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from avalanche.models import MTSimpleMLP
from tiny_mnist import banded_mnist
from torch import nn

import clmtl
from clmtl.errors import ConfigError
from clmtl.models.classifier import build_classifier
from clmtl.models.user import SingleHeadModule, user_model
from clmtl.stream.scenario import output_spaces
from clmtl.stream.tasks import CLASSIFICATION, SEGMENTATION, TaskSpec


def two_tasks() -> list[TaskSpec]:
    return [TaskSpec("a", CLASSIFICATION, ("0", "1")), TaskSpec("b", CLASSIFICATION, ("2", "3"))]


def test_the_mlp_reads_28x28_grey_images_as_784_inputs_through_its_layers():
    torch.manual_seed(0)
    model = build_classifier(output_spaces(two_tasks()), "mlp", channels=1, image_size=28, hidden=[400, 400]).eval()
    first, second = model.body[1], model.body[3]
    assert (first.in_features, first.out_features, second.out_features) == (784, 400, 400)
    x = torch.rand(5, 1, 28, 28)
    by_hand = F.relu(F.linear(F.relu(F.linear(x.reshape(5, 784), first.weight, first.bias)), second.weight,
                              second.bias))
    head = model.rows(1)
    expected = F.linear(by_hand, head.weight, head.bias)
    assert torch.allclose(model(x, 1), expected, atol=1e-6)
    assert model(x, 0).shape == (5, 2)
    assert set(model.forward_all(x)) == {0, 1} and torch.equal(model.forward_all(x)[1], model(x, 1))


def test_the_reduced_resnet18_has_20_base_filters_and_pools_any_size():
    spaces = output_spaces(two_tasks())
    model = build_classifier(spaces, "reduced_resnet18", channels=3, image_size=32, hidden=[]).eval()
    convs = [m for m in model.body.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == 20
    assert sorted({c.out_channels for c in convs}) == [20, 40, 80, 160]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.body.modules()) == 20  # stem + 16 in blocks + 3 shortcuts
    assert model(torch.rand(2, 3, 32, 32), 0).shape == (2, 2)
    assert model(torch.rand(2, 3, 20, 20), 1).shape == (2, 2)


def test_a_classifier_head_grows_keeping_its_rows_and_loads_a_grown_state():
    tasks = [TaskSpec("a", CLASSIFICATION, ("0", "1"), head=0, labels=(0, 1)),
             TaskSpec("b", CLASSIFICATION, ("2", "3"), head=0, labels=(2, 3))]
    model = build_classifier(output_spaces(tasks), "mlp", channels=1, image_size=8, hidden=[16])
    before = model.rows(0).weight.detach().clone()
    model.grow(0, 4)
    assert model.num_classes(0) == 4 and torch.equal(model.rows(0).weight[:2], before)
    fresh = build_classifier(output_spaces(tasks), "mlp", channels=1, image_size=8, hidden=[16])
    fresh.load_state_dict(model.state_dict())
    assert fresh.num_classes(0) == 4 and torch.equal(fresh.rows(0).weight, model.rows(0).weight)


def test_a_classifier_refuses_a_segmentation_task():
    tasks = [TaskSpec("seg", SEGMENTATION, ("background", "disc")), *two_tasks()]
    with pytest.raises(ValueError, match="model.backbone mlp serves classification tasks only; head 'seg' is "
                                         "segmentation"):
        build_classifier(output_spaces(tasks), "mlp", channels=3, image_size=64, hidden=[8])


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    return banded_mnist(tmp_path_factory.mktemp("mnist"), 40, 10)


def mnist_config(root, scenario: str, **model) -> dict:
    return {"split": {"kind": "classification", "experiences": 2,
                      "data": {"format": "torchvision", "dataset": "MNIST", "root": str(root),
                               "classes": ["0", "1", "2", "3"]}},
            "scenario": scenario, "data": {"image_size": 28, "channels": 1, "hflip": 0.0},
            "model": {"backbone": "mlp", "hidden": [32], **model},
            "train": {"optimizer": "adam", "lr": 0.01, "batch_size": 32, "iterations": 15, "warmup": 0, "ema": 0,
                      "precision": "fp32", "channels_last": False},
            "output": {"overlays": 0, "checkpoints": False}}


@pytest.mark.parametrize("strategy, message", [
    ("routing", "strategy routing needs a model with per-task channel gates on its shared layers"),
    ("bnfreeze", "strategy bnfreeze needs a model with BatchNorm layers; this model (mlp) has none"),
])
def test_a_strategy_is_refused_on_a_model_it_cannot_act_on(mnist_root, strategy, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        clmtl.run(mnist_config(mnist_root, "task"), strategy)


def test_a_module_defined_here_trains_through_clmtl_run_as_the_class_scenarios_head(mnist_root):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 4))
    before = [p.detach().clone() for p in module.parameters()]
    results = clmtl.run(mnist_config(mnist_root, "class"), "ewc+replay", model=module)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))  # the caller's module is untouched
    assert results.config["model"]["backbone"] == "mlp" and results.params == sum(p.numel() for p in before)
    assert results.matrix[0][0] == 1.0  # the bands are learnt at once
    assert results.matrix[1][1] == 1.0
    assert results.average_accuracy > 0.5  # replay keeps part of the first task


def test_an_avalanche_multitask_module_trains_in_the_task_scenario(mnist_root):
    torch.manual_seed(0)
    module = MTSimpleMLP(input_size=784, hidden_size=32)
    module.features[2].p = 0.0  # its dropout under LwF at this rate can empty the old head (chance on seed 0 of 5)
    results = clmtl.run(mnist_config(mnist_root, "task"), "lwf", model=module)
    assert results.matrix[1] == [1.0, 1.0]


def test_a_single_head_module_serves_only_its_active_outputs_and_refuses_the_task_scenario():
    tasks = [TaskSpec("a", CLASSIFICATION, ("0", "1"), head=0, labels=(0, 1)),
             TaskSpec("b", CLASSIFICATION, ("2", "3"), head=0, labels=(2, 3))]
    model = user_model(nn.Linear(3, 4), output_spaces(tasks))
    assert isinstance(model, SingleHeadModule)
    assert model(torch.rand(2, 3), 0).shape == (2, 2)
    model.grow(0, 4)
    assert model(torch.rand(2, 3), 0).shape == (2, 4)
    with pytest.raises(ValueError, match="one output space"):
        user_model(nn.Linear(3, 4), output_spaces(two_tasks()))
    with pytest.raises(ValueError, match=r"needs \[batch, >= 4\]"):
        user_model(nn.Linear(3, 3), output_spaces(tasks))(torch.rand(2, 3), 0)


def test_a_classifier_exports_to_torchscript_at_its_own_input_size(tmp_path):
    from clmtl.deploy.export import export_model, load_metadata

    model = build_classifier(output_spaces(two_tasks()), "mlp", channels=1, image_size=28, hidden=[16]).eval()
    path = export_model(model, tmp_path / "mlp.ts", tasks=two_tasks(), image_size=28, channels=1)
    x = torch.rand(3, 1, 28, 28)
    exported = torch.jit.load(str(path))(x)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(exported, (model(x, 0), model(x, 1))))
    metadata = load_metadata(path)
    assert metadata["input"]["shape"] == [1, 1, 28, 28] and metadata["anchor_layout"] is None


@pytest.mark.slow
def test_the_docs_own_model_example_runs_as_pasted_and_replay_keeps_more(tmp_path, monkeypatch, capsys):
    from clmtl.data.digits import write_mnist_files

    api_doc = Path(__file__).resolve().parents[1] / "docs" / "api.md"
    blocks = re.findall(r"```python\n(.*?)```", api_doc.read_text().split("## A model of your own", 1)[1], re.S)
    code = next(block for block in blocks if "model=mlp" in block)
    monkeypatch.chdir(tmp_path)
    write_mnist_files(tmp_path / "data" / "digits")
    exec(compile(code, "docs/api.md", "exec"), {})  # noqa: S102 - the documented example, as a user pastes it
    scores = dict(line.split() for line in capsys.readouterr().out.splitlines() if line.split()[0] in ("naive",
                                                                                                    "replay"))
    assert float(scores["naive"]) < 0.25 < 0.6 < float(scores["replay"])  # class-incremental: replay remembers
