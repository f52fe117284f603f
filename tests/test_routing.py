"""routing: per-task channel gates; a finished task's outputs never change; routes survive checkpoints and export."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import SqueezeExcitation

from clmtl.builders import build_model, make_optimizer
from clmtl.config import load_config
from clmtl.models.unified import UnifiedModel
from clmtl.runner import run
from clmtl.stream.benchmark import build_benchmark
from clmtl.stream.scenario import output_spaces
from clmtl.stream.tasks import TaskSpec
from clmtl.training.registry import build_plugins, strategy_schemas

SIZE = 64
BATCH = 4
TASKS = [TaskSpec("seg", "segmentation", ("background", "a", "b")), TaskSpec("det", "detection", ("a", "b")),
         TaskSpec("cls", "classification", ("a", "b", "c"))]
TINY = ["data.train_size=8", "data.val_size=4", "data.image_size=64", "train.epochs=1", "train.batch_size=4",
        "output.overlays=0", "train.threads=1"]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def routed_model(backbone="yolov8n", seed=0):
    """A model with routes whose embeddings are random (each task a different random half of the channels)."""
    torch.manual_seed(seed)
    model = UnifiedModel(output_spaces(TASKS), image_size=SIZE, backbone=backbone)
    with torch.no_grad():
        for embedding in model.enable_routing().embeddings:
            embedding.normal_()
    return model.eval()


def gated_widths(model: UnifiedModel) -> int:
    """Counted from the modules, not from the gate points: every BatchNorm's channels (all of them sit in conv
    blocks), plus the FPN's convs and squeeze-excitation's fc1 / fc2, which no BatchNorm follows."""
    batch_norms = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    fpn = sum(m.out_channels for m in model.neck.modules() if isinstance(m, nn.Conv2d))
    excitation = sum(m.fc1.out_channels + m.fc2.out_channels for m in model.modules()
                     if isinstance(m, SqueezeExcitation))
    return batch_norms + fpn + excitation


@pytest.mark.parametrize("backbone", ["yolov8n", "mobilenet_v3_small"])
def test_routes_add_one_embedding_per_task_and_gated_channel(backbone):
    model = UnifiedModel(output_spaces(TASKS), image_size=SIZE, backbone=backbone)
    before = sum(p.numel() for p in model.parameters())
    model.enable_routing()
    assert sum(p.numel() for p in model.parameters()) - before == len(TASKS) * gated_widths(model)
    model.enable_routing()  # a second call adds nothing
    assert sum(p.numel() for p in model.parameters()) - before == len(TASKS) * gated_widths(model)


def test_the_default_model_gains_8880_parameters():
    """The number docs/strategies.md states: yolov8n, fpn_channels 64, three tasks."""
    model = UnifiedModel(output_spaces(TASKS))
    assert gated_widths(model) == 2960
    before = sum(p.numel() for p in model.parameters())
    routes = model.enable_routing()
    assert sum(p.numel() for p in model.parameters()) - before == 8880
    assert sum(p.numel() * p.element_size() for p in routes.parameters()) == 35520


def test_a_closed_gate_zeroes_its_channel_and_an_open_one_passes_it():
    model = UnifiedModel(output_spaces(TASKS), image_size=SIZE).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    targets = {"block": model.head.shared, "conv": model.neck.smooth[0]}  # BatchNorm bias / conv bias: never 0
    outputs = {}
    with torch.no_grad():
        model.head.shared[1].bias.fill_(0.5)
        hooks = [m.register_forward_hook(lambda m, a, out, k=k: outputs.__setitem__(k, out))
                 for k, m in targets.items()]
        model(x, 0)
        plain = dict(outputs)
        for hook in hooks:
            hook.remove()
        routes = model.enable_routing()
        for k, m in targets.items():  # registered after the gate, so they see its output
            m.register_forward_hook(lambda m, a, out, k=k: outputs.__setitem__(k, out))
        for k, m in targets.items():
            for embedding in routes.embeddings:
                embedding.fill_(1.0)  # every route open...
            routes.embeddings[[p.module for p in routes.points].index(m)][0, 3] = -1.0  # ...but task 0's channel 3 here
            model(x, 0)
            assert torch.count_nonzero(plain[k][:, 3]) > 0 and torch.count_nonzero(outputs[k][:, 3]) == 0, k
            keep = [c for c in range(plain[k].shape[1]) if c != 3]
            torch.testing.assert_close(outputs[k][:, keep], plain[k][:, keep], atol=0, rtol=0)


def test_only_the_training_tasks_gates_are_soft_and_only_in_train_mode():
    routes = routed_model().routes
    e = routes.embeddings[0]
    routes.training_task, routes.scale = 1, 2.5
    routes.train()
    torch.testing.assert_close(routes.gate(0, 1), torch.sigmoid(2.5 * e[1]))
    assert torch.equal(routes.gate(0, 0), (e[0] > 0).float())
    routes.eval()
    assert torch.equal(routes.gate(0, 1), (e[1] > 0).float())


def test_a_nearly_closed_soft_gate_is_exactly_zero_but_keeps_its_gradient():
    """No denormal floats in the feature maps (5x slower on CPU), and the channel can still reopen."""
    routes = routed_model().routes.train()
    routes.training_task, routes.scale = 0, 400.0
    with torch.no_grad():
        routes.embeddings[0][0, :3] = torch.tensor([-0.05, -0.01, 0.01])  # sigmoid: 2e-9, 0.018, 0.98
    gate = routes.gate(0, 0)[:3]
    assert gate[0] == 0 and 0.01 < gate[1] < 0.02 and gate[2] > 0.98
    gate.sum().backward()
    slope = routes.embeddings[0].grad[0, :3]
    expected = 400 * torch.sigmoid(torch.tensor([-20.0, -4.0, 4.0])) * torch.sigmoid(torch.tensor([20.0, 4.0, -4.0]))
    torch.testing.assert_close(slope, expected)


def test_forward_all_runs_each_tasks_own_route():
    model = routed_model()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        together = model.forward_all(x)
        alone = {label: model(x, label) for label in range(3)}
        torch.testing.assert_close(together[0], alone[0], atol=0, rtol=0)
        torch.testing.assert_close(together[2], alone[2], atol=0, rtol=0)
        for a, b in zip(together[1], alone[1], strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        model.routes.active = 2  # segmentation's head on classification's route: other features, other output
        other = model._upsample(model.head.segmentation(model.head.features(model.neck(
            model.backbone(x), levels=(0,))[0]), 0), x)
    assert (other - together[0]).abs().max() > 1e-3


def test_a_routing_state_dict_loads_into_a_freshly_built_model_and_exports(tmp_path):
    from clmtl.deploy.export import export_checkpoint
    from clmtl.io import atomic_torch_save

    config = load_config(None, [f"data.image_size={SIZE}"])
    model = build_model(config, TASKS)
    with torch.no_grad():
        for embedding in model.enable_routing().embeddings:
            embedding.normal_()
    model.routes.finished[:2] = True
    model.eval()
    fresh = build_model(config, TASKS, initial_weights=False)  # as clmtl eval and clmtl export rebuild it
    assert fresh.routes is None
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert fresh.routes.finished.tolist() == [True, True, False]
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model.forward_all(x)
        torch.testing.assert_close(fresh(x, 0), expected[0], atol=0, rtol=0)
        torch.testing.assert_close(fresh(x, 2), expected[2], atol=0, rtol=0)
        for a, b in zip(fresh(x, 1), expected[1], strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)

    atomic_torch_save({"model": model.state_dict(), "config": config.to_dict(),
                       "tasks": [task.as_dict() for task in TASKS]}, tmp_path / "last.pt")
    exported = torch.jit.load(str(export_checkpoint(tmp_path / "last.pt", tmp_path / "model.pt")))
    with torch.no_grad():
        got = exported(x[:1])
        expected = model.forward_all(x[:1])
    for g, e in zip(got, [expected[0], expected[2], *expected[1]], strict=True):  # export order: seg, cls, det
        torch.testing.assert_close(g, e, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.xdist_group("onnx")  # one worker pays the ONNX exporter's first-call cost once
def test_the_onnx_export_of_a_routed_model_takes_each_tasks_route(tmp_path):
    import onnxruntime

    from clmtl.deploy.export import export_model

    model = routed_model()
    path = export_model(model, tmp_path / "model.onnx", "onnx", tasks=TASKS, image_size=SIZE)
    x = torch.rand(1, 3, SIZE, SIZE)
    got = onnxruntime.InferenceSession(str(path)).run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model.forward_all(x)
    for g, e in zip(got, [expected[0], expected[2], *expected[1]], strict=True):
        torch.testing.assert_close(torch.from_numpy(g), e, atol=1e-4, rtol=0)


# -- protection: driving the plugin through the callbacks the template fires ----------------------------------------

def fake_loss(output, generator):
    """Any loss that moves everything a task's output depends on."""
    if isinstance(output, list):
        return sum(F.mse_loss(level, torch.randn(level.shape, generator=generator)) for level in output)
    return F.mse_loss(output, torch.randn(output.shape, generator=generator))


def train_task(model, task, plugin, steps, lr):
    """One experience of ``steps`` Adam steps, with the plugin's callbacks where the template calls them."""
    optimizer = torch.optim.Adam([{"params": p, "name": n} for n, p in model.parameter_groups().items()], lr=lr)
    strategy = SimpleNamespace(model=model, optimizer=optimizer, experience=SimpleNamespace(task_label=task),
                               planned_iterations=steps, clock=SimpleNamespace(train_exp_iterations=0))
    generator = torch.Generator().manual_seed(task)
    if plugin:
        plugin.before_training(strategy)
        plugin.before_training_exp(strategy)
    model.train()
    for step in range(steps):
        strategy.clock.train_exp_iterations = step
        x = torch.rand(BATCH, 3, SIZE, SIZE, generator=generator) * 3
        if plugin:
            plugin.before_training_iteration(strategy)
        optimizer.zero_grad()
        strategy.loss = fake_loss(model(x, task), generator)
        if plugin:
            plugin.before_backward(strategy)
        strategy.loss.backward()
        optimizer.step()
        if plugin:
            plugin.after_update(strategy)
    if plugin:
        plugin.after_training_exp(strategy)
    return model.eval()


@pytest.mark.parametrize("routing", [True, False])
def test_a_finished_tasks_outputs_do_not_change_while_a_later_task_trains(routing):
    torch.manual_seed(0)
    model = UnifiedModel(output_spaces(TASKS), image_size=SIZE)
    (plugin,) = build_plugins("routing", {"routing": {"lr": 0.05}}) if routing else (None,)  # closes gates in 2 steps
    train_task(model, 0, plugin, steps=4, lr=0.01)
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before = model(x, 0)
    conv = model.backbone.layers[2].cv1.conv.weight.detach().clone()  # a shared layer
    train_task(model, 1, plugin, steps=6, lr=0.1)  # a large rate: everything it may change, it changes
    with torch.no_grad():
        after = model(x, 0)
    assert not torch.equal(conv, model.backbone.layers[2].cv1.conv.weight)  # the later task did learn
    if routing:
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
        assert 0 < plugin.usage[0] < 1 and 0 < plugin.usage[1] < 1
        assert plugin.stats()["channels_free"] == pytest.approx(1 - sum(
            int(m.sum()) for m in model.routes.used()) / sum(e.shape[1] for e in model.routes.embeddings))
    else:  # the negative control: the same training without routes changes task 0's outputs
        assert (after - before).abs().max() > 0.1


def test_a_protected_channel_normalises_with_its_frozen_statistics_in_training():
    """Train-mode BatchNorm would use the new task's batch statistics, which inference (frozen ones) would not."""
    torch.manual_seed(0)
    model = UnifiedModel(output_spaces(TASKS), image_size=SIZE)
    (plugin,) = build_plugins("routing", {"routing": {"lr": 0.05}})
    train_task(model, 0, plugin, steps=3, lr=0.01)
    point = next(p for p, used in zip(model.routes.points, model.routes.used()) if p.bn is not None and
                 0 < used.sum() < used.numel())
    used = model.routes.used()[model.routes.points.index(point)]
    bn = point.bn
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    strategy = SimpleNamespace(model=model, optimizer=make_optimizer(load_config(None, []), model),
                               experience=SimpleNamespace(task_label=1), planned_iterations=1,
                               clock=SimpleNamespace(train_exp_iterations=0))
    plugin.before_training(strategy)
    plugin.before_training_exp(strategy)
    seen = {}
    bn.register_forward_hook(lambda m, args, out: seen.update(z=args[0], out=out))  # after the plugin's hook
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, SIZE, SIZE) * 3, 1)
    frozen = F.batch_norm(seen["z"], mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
    batch = F.batch_norm(seen["z"], None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    torch.testing.assert_close(seen["out"][:, used], frozen[:, used])
    torch.testing.assert_close(seen["out"][:, ~used], batch[:, ~used])


def test_routing_composes_with_replay_and_layerlr_end_to_end(tmp_path):
    from clmtl.io import load_checkpoint

    config = load_config(None, TINY, strategies=strategy_schemas())
    results = run(config, "replay+routing+layerlr", tmp_path, baselines=False)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["strategy"] == "replay+routing+layerlr" and written["matrix"] == results.matrix
    matrix = written["matrix"]
    assert matrix[0][0] == matrix[1][0] == matrix[2][0]  # segmentation, finished first, never changes
    assert matrix[1][1] == matrix[2][1]
    plain = build_model(config, build_benchmark(config).tasks)
    assert written["params"] == sum(p.numel() for p in plain.parameters()) + 8880
    stats = written["strategy_stats"]
    assert set(stats["RoutingPlugin"]["channels_used"]) == {"0", "1", "2"}
    assert stats["MultiTaskReplayPlugin"]["replayed"]
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    fresh = build_model(config, build_benchmark(config).tasks, initial_weights=False)
    fresh.load_state_dict(saved["model"])  # strict: every routes.* key has its place
    assert fresh.routes.finished.all()
