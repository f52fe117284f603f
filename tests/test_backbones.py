"""Backbone registry: strides and channels per backbone, size budget, local weights, and swapping by one config key."""
import math

import pytest
import torch
import torchvision
from avalanche.training.plugins import SupervisedPlugin
from torchvision.models.feature_extraction import create_feature_extractor

from clmtl.models.backbone import BACKBONES, build_backbone
from clmtl.models.unified import UnifiedModel
from clmtl.stream.scenario import output_spaces
from clmtl.stream.tasks import TaskSpec

SIZE = 64
CHANNELS = {"yolov8n": (64, 128, 256), "mobilenet_v3_small": (24, 48, 96), "efficientnet_b0": (40, 112, 320)}
"""Per backbone, the channels of its stride 8/16/32 taps: the yaml's layers 4/6/9; torchvision's last block at each
stride (features 3/8/11 and 3/5/7, as listed in the architectures' tables)."""
TORCHVISION_TAPS = {"mobilenet_v3_small": ("features.3", "features.8", "features.11"),
                    "efficientnet_b0": ("features.3", "features.5", "features.7")}
NEW = list(TORCHVISION_TAPS)


def tasks(seg: int, det: int, cls: int) -> list[TaskSpec]:
    names = [f"c{i}" for i in range(max(seg, det, cls))]
    return [TaskSpec("seg", "segmentation", tuple(names[:seg])), TaskSpec("det", "detection", tuple(names[:det])),
            TaskSpec("cls", "classification", tuple(names[:cls]))]


SHAPES_TASKS = tasks(5, 4, 5)


def test_the_registry_holds_the_three_backbones():
    assert list(BACKBONES) == list(CHANNELS)


@pytest.mark.parametrize("name", list(CHANNELS))
def test_taps_have_strides_8_16_32_and_the_declared_channels(name):
    backbone = build_backbone(name).eval()
    with torch.no_grad():
        feats = backbone(torch.zeros(1, 3, 128, 128))
    c = CHANNELS[name]
    assert [tuple(f.shape[1:]) for f in feats] == [(c[0], 16, 16), (c[1], 8, 8), (c[2], 4, 4)]
    assert backbone.out_channels == c and backbone.strides == (8, 16, 32)


def test_an_unknown_backbone_names_the_choices_and_the_closest():
    with pytest.raises(ValueError, match="did you mean 'mobilenet_v3_small'.*yolov8n, mobilenet_v3_small, effici"):
        build_backbone("mobilenetv3_small")
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'; choices: yolov8n"):
        UnifiedModel(output_spaces(SHAPES_TASKS), image_size=SIZE, backbone="resnet50")


@pytest.mark.parametrize("name", list(CHANNELS))
@pytest.mark.parametrize("classes", [(5, 4, 5), (21, 10, 10)], ids=["shapes", "real"])
def test_every_configuration_has_fewer_than_8m_parameters(name, classes):
    model = UnifiedModel(output_spaces(tasks(*classes)), image_size=SIZE, backbone=name)
    groups = {part: sum(p.numel() for p in params) for part, params in model.parameter_groups().items()}
    total = sum(p.numel() for p in model.parameters())
    print(f"{name} {classes}: {groups} total {total:,}")
    assert sum(groups.values()) == total < 8_000_000


@pytest.mark.parametrize("name", NEW)
def test_bn_momentum_is_01_and_train_mode_is_deterministic(name):
    """The same BN momentum as yolov8n (not torchvision's 0.01), and no stochastic depth in training."""
    torch.manual_seed(0)
    model = UnifiedModel(output_spaces(SHAPES_TASKS), image_size=SIZE, backbone=name).train()
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        first, second = model.backbone(x), model.backbone(x)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NEW)
def test_forward_all_equals_each_single_task_forward(name):
    model = UnifiedModel(output_spaces(SHAPES_TASKS), image_size=SIZE, backbone=name).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        together = model.forward_all(x)
        torch.testing.assert_close(together[0], model(x, 0), atol=1e-5, rtol=1e-4)
        for a, b in zip(together[1], model(x, 1), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(together[2], model(x, 2), atol=1e-5, rtol=1e-4)
    assert [tuple(r.shape) for r in together[1]] == [(2, 3, 8, 8, 9), (2, 3, 4, 4, 9), (2, 3, 2, 2, 9)]


@pytest.mark.parametrize("name", NEW)
def test_a_torchvision_state_dict_fills_the_backbone(name, tmp_path):
    torch.manual_seed(7)
    source = getattr(torchvision.models, name)(weights=None).eval()
    path = tmp_path / f"{name}.pt"
    torch.save(source.state_dict(), path)  # features.*, classifier.*: what torchvision's weight files hold
    torch.manual_seed(0)
    model = UnifiedModel(output_spaces(SHAPES_TASKS), image_size=SIZE, backbone=name, weights=path).eval()
    loaded, saved = model.backbone.state_dict(), source.state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, saved[key.replace("layers.", "features.", 1)], rtol=0, atol=0)
    # the same function as torchvision's own network, read at the taps by torchvision's feature extractor
    reference = create_feature_extractor(source, list(TORCHVISION_TAPS[name]))
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        for ours, theirs in zip(model.backbone(x), reference(x).values(), strict=True):
            torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("name", list(CHANNELS))
def test_a_full_model_state_dict_round_trips(name, tmp_path):
    torch.manual_seed(1)
    model = UnifiedModel(output_spaces(SHAPES_TASKS), image_size=SIZE, backbone=name)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(2)
    loaded = UnifiedModel(output_spaces(SHAPES_TASKS), image_size=SIZE, backbone=name, weights=path)
    for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def test_a_mismatched_weights_file_names_the_file_and_the_keys(tmp_path):
    mobilenet = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    path = tmp_path / "mobilenet.pt"
    torch.save(mobilenet, path)
    with pytest.raises(ValueError, match=r"mobilenet\.pt does not match the model \(backbone 'efficientnet_b0'\): "
                                         r"346 missing keys \['layers\.1\.0\.block.*"
                                         r"140 unexpected keys \['layers\.1\.block"):
        UnifiedModel(output_spaces(SHAPES_TASKS), image_size=SIZE, backbone="efficientnet_b0", weights=path)
    with pytest.raises(ValueError, match=r"mobilenet\.pt .*backbone 'yolov8n'.*unexpected keys \['classifier\.0"):
        UnifiedModel(output_spaces(SHAPES_TASKS), image_size=SIZE, weights=path)

    incomplete = tmp_path / "incomplete.pt"
    torch.save({k: v for k, v in mobilenet.items() if k != "features.3.block.0.0.weight"}, incomplete)
    with pytest.raises(ValueError, match=r"incomplete\.pt.*1 missing keys \['layers\.3\.block\.0\.0\.weight'\], "
                                         r"0 unexpected"):
        UnifiedModel(output_spaces(SHAPES_TASKS), image_size=SIZE, backbone="mobilenet_v3_small", weights=incomplete)

    narrow = tmp_path / "narrow.pt"  # the same keys, other shapes
    torch.save(torchvision.models.mobilenet_v3_small(weights=None, width_mult=0.5).state_dict(), narrow)
    with pytest.raises(ValueError, match=r"narrow\.pt .*: 200 tensors of another shape: "
                                         r"layers\.0\.0\.weight \[8, 3, 3, 3\] \(model \[16, 3, 3, 3\]\), "):
        UnifiedModel(output_spaces(SHAPES_TASKS), image_size=SIZE, backbone="mobilenet_v3_small", weights=narrow)


class LossRecorder(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.losses: dict[int, list[float]] = {}

    def after_backward(self, strategy, **kwargs):
        self.losses.setdefault(int(strategy.mb_task_id[0]), []).append(strategy.loss.item())


@pytest.mark.parametrize("name", NEW)
def test_swapping_the_backbone_is_one_config_key(name, tmp_path, isolated_registry):
    from clmtl.config import load_config
    from clmtl.runner import run
    from clmtl.training.registry import register

    recorder = LossRecorder()
    register("loss_recorder")(lambda: recorder)
    config = load_config(None, ["data.train_size=4", "data.val_size=4", "data.image_size=64", "train.epochs=1",
                                "train.batch_size=4", "train.threads=1", "output.overlays=0",
                                "output.checkpoints=false", f"model.backbone={name}"])
    results = run(config, "naive+loss_recorder", tmp_path, baselines=False)
    model = UnifiedModel(output_spaces(SHAPES_TASKS), backbone=name)
    assert results.params == sum(p.numel() for p in model.parameters())
    assert sorted(recorder.losses) == [0, 1, 2]
    assert all(math.isfinite(loss) for losses in recorder.losses.values() for loss in losses)
    assert all(0.0 <= value <= 1.0 for row in results.matrix for value in row)  # evaluated, boxes decoded
