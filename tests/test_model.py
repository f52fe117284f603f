"""UnifiedModel: backbone taps, output shapes, task dispatch as Avalanche calls it, shared computation, weights."""
from types import SimpleNamespace

import pytest
import torch

from clmtl.models.anchors import AnchorLayout
from clmtl.models.backbone import YoloBackbone
from clmtl.models.unified import UnifiedModel
from clmtl.stream.scenario import output_spaces
from clmtl.stream.tasks import TaskSpec

SIZE = 64
TASKS = [
    TaskSpec("seg", "segmentation", ("background", "a", "b")),
    TaskSpec("det", "detection", ("a", "b", "c", "d")),
    TaskSpec("cls", "classification", ("a", "b", "c", "d", "e")),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UnifiedModel(output_spaces(TASKS), image_size=SIZE).eval()


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_yolov8n_taps_have_strides_8_16_32_and_64_128_256_channels():
    feats = YoloBackbone().eval()(torch.zeros(1, 3, SIZE, SIZE))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 8, 8), (128, 4, 4), (256, 2, 2)]


def test_output_shapes_per_kind(model, x):
    assert model(x, 0).shape == (2, 3, SIZE, SIZE)
    assert [tuple(r.shape) for r in model(x, 1)] == [(2, 3, 8, 8, 9), (2, 3, 4, 4, 9), (2, 3, 2, 2, 9)]
    assert model(x, 2).shape == (2, 5)


def test_forward_all_equals_each_single_task_forward(model, x):
    with torch.no_grad():
        together = model.forward_all(x)
        assert sorted(together) == [0, 1, 2]
        torch.testing.assert_close(together[0], model.forward_single_task(x, 0), atol=1e-5, rtol=1e-4)
        for a, b in zip(together[1], model.forward_single_task(x, 1), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(together[2], model.forward_single_task(x, 2), atol=1e-5, rtol=1e-4)


def test_forward_dispatches_task_label_tensors_like_avalanche_passes_them(model, x):
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor([2, 2])), model(x, 2))
        torch.testing.assert_close(model(x, torch.tensor([0, 0])), model(x, 0))
        assert sorted(model(x, None)) == [0, 1, 2]
        with pytest.raises(ValueError, match="single task"):
            model(x, torch.tensor([0, 2]))
        with pytest.raises(ValueError, match="unknown task label"):
            model(x, 7)


def test_the_head_is_shared_across_tasks_and_levels(model, x):
    """One 3x3 conv for every task; the 1x1 prediction rows per head: 3 anchors x (5 + 4) for detection, 3 for
    segmentation, run as one conv by forward_all; a linear layer for classification."""
    convs = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape[:2]) + c.kernel_size for c in convs] == [(64, 64, 3, 3)]
    shapes = {head: tuple(model.head.rows(head).weight.shape) for head in range(3)}
    assert shapes == {0: (3, 64), 1: (3, 9, 64), 2: (5, 64)}
    calls = []
    original = torch.nn.functional.conv2d

    def counting(input, weight, *args, **kwargs):
        calls.append(tuple(weight.shape))
        return original(input, weight, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "conv2d", counting)
        model.eval()
        with torch.no_grad():
            model.forward_all(x)
    assert (27 + 3, 64, 1, 1) in calls  # the finest level: detection and segmentation rows in one conv


def test_each_task_computes_only_what_it_needs(x):
    """Segmentation never touches the coarse smoothing convs, classification never the fine ones."""
    model = UnifiedModel(output_spaces(TASKS), image_size=SIZE)
    used = {}
    for name in ("smooth.0", "smooth.1", "smooth.2"):
        model.neck.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: used.update({name: True}))
    model(x, 0)
    assert sorted(used) == ["smooth.0"]
    used.clear()
    model(x, 2)
    assert sorted(used) == ["smooth.2"]
    used.clear()
    model(x, 1)
    assert sorted(used) == ["smooth.0", "smooth.1", "smooth.2"]


def test_parameter_count_and_groups(model):
    total = sum(p.numel() for p in model.parameters())
    print(f"UnifiedModel parameters (seg 3, det 4, cls 5 classes): {total:,}")
    assert total < 8_000_000
    groups = model.parameter_groups()
    assert sorted(groups) == ["backbone", "head", "neck"]
    grouped = [id(p) for params in groups.values() for p in params]
    assert len(grouped) == len(set(grouped)) and set(grouped) == {id(p) for p in model.parameters()}


def test_tasks_of_one_kind_get_a_head_each_in_the_task_scenario(x):
    model = UnifiedModel(output_spaces([TASKS[1], TaskSpec("det2", "detection", ("x",))]), image_size=SIZE)
    assert model.head_kinds == {0: "detection", 1: "detection"}
    assert [level.shape[-1] for level in model(x, 1)] == [5 + 1] * 3


def test_task_kinds_and_default_anchors_scale_with_image_size(model):
    assert model.head_kinds == {0: "segmentation", 1: "detection", 2: "classification"}
    assert model.anchor_layout.anchors[0][0] == (6.0, 6.0)  # 12 px at 128 -> 6 px at 64
    assert AnchorLayout.for_image_size(256).anchors[2][1] == (120.0, 80.0)


def test_adaptation_records_task_labels_without_classes_in_this_experience():
    from avalanche.models.dynamic_modules import avalanche_model_adaptation

    model = UnifiedModel(output_spaces(TASKS), image_size=SIZE)
    experience = SimpleNamespace(task_labels=[1])  # what a benchmark_from_datasets experience offers
    avalanche_model_adaptation(model, experience)
    assert model.known_train_tasks_labels == {1}
    model.eval()
    avalanche_model_adaptation(model, SimpleNamespace(task_labels=[2]))
    assert model.known_train_tasks_labels == {1}  # evaluation does not count as training on a task
    with pytest.raises(ValueError, match="task labels"):
        avalanche_model_adaptation(model, SimpleNamespace(task_labels=[5]))


def test_weights_round_trip(model, tmp_path, x):
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    loaded = UnifiedModel(output_spaces(TASKS), image_size=SIZE, weights=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 0), model(x, 0))


def test_ultralytics_detection_model_weights_fill_the_backbone(tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(3)
    yolo = DetectionModel("yolov8n.yaml", nc=80, verbose=False)
    path = tmp_path / "yolov8n_state.pt"
    torch.save(yolo.state_dict(), path)
    model = UnifiedModel(output_spaces(TASKS), image_size=SIZE, weights=path)
    for i in (0, 4, 9):
        torch.testing.assert_close(model.backbone.layers[i].state_dict(), yolo.model[i].state_dict())


def test_a_wrong_weights_file_is_a_clear_error(tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pt.*conv\.weight"):
        UnifiedModel(output_spaces(TASKS), image_size=SIZE, weights=wrong)

    other_classes = tmp_path / "other_classes.pt"
    cls_only = UnifiedModel(output_spaces([TaskSpec("cls", "classification", ("a", "b"))]), image_size=SIZE)
    torch.save(cls_only.state_dict(), other_classes)
    with pytest.raises(ValueError, match=r"other_classes\.pt.*missing"):
        UnifiedModel(output_spaces(TASKS), image_size=SIZE, weights=other_classes)

    pickled = tmp_path / "pickled.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole module, not a state dict: refused by weights_only
    with pytest.raises(ValueError, match=r"pickled\.pt"):
        UnifiedModel(output_spaces(TASKS), image_size=SIZE, weights=pickled)


def test_without_fpn_smoothing_the_neck_loses_exactly_its_3x3_convs(model, x):
    torch.manual_seed(0)
    lean = UnifiedModel(output_spaces(TASKS), image_size=SIZE, fpn_smooth=False).eval()
    channels = model.neck.channels
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in lean.parameters())
    assert removed == 3 * (channels * channels * 9 + channels)  # one 3x3 conv with bias per level
    with torch.no_grad():  # the pyramid is the top-down sum itself, and forward_all still equals the single forwards
        feats = lean.backbone(x)
        top = lean.neck.lateral[2](feats[2])
        torch.testing.assert_close(lean.neck(feats, levels=(2,))[2], top)
        together = lean.forward_all(x)
        torch.testing.assert_close(together[0], lean.forward_single_task(x, 0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(together[2], lean.forward_single_task(x, 2), atol=1e-5, rtol=1e-4)
