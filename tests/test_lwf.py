"""LwF: per-kind distillation losses (hand-computed, Avalanche's), the plugin's bookkeeping, and a tiny run."""
import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from avalanche.models import MultiTaskModule
from avalanche.training.regularization import LearningWithoutForgetting
from clmtl.strategies.bnfreeze import batch_norms
from clmtl.strategies.ewc import MultiTaskEWCPlugin
from clmtl.strategies.lwf import LwFPlugin, distillation_loss, frozen_copy

import clmtl.builders
import clmtl.runner
from clmtl.config import load_config
from clmtl.data.shapes import shapes_task
from clmtl.models.unified import UnifiedModel
from clmtl.stream.scenario import output_spaces
from clmtl.stream.tasks import CLASSIFICATION, DETECTION, SEGMENTATION
from clmtl.training.plugin import kept_statistics
from clmtl.training.registry import build_plugins, strategy_schemas


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    tasks = [shapes_task("segmentation", "seg"), shapes_task("detection", "det"), shapes_task("classification", "cls")]
    return UnifiedModel(output_spaces(tasks), fpn_channels=16, image_size=32)


def images(n=2, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def perturbed(model, scale=0.05, seed=2):
    """A copy of ``model`` with noise on every parameter: a student that has moved away from its teacher."""
    moved = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return moved


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model.forward_all(x)


def detached(output):
    return [level.detach() for level in output] if isinstance(output, list) else output.detach()


KIND_OF_LABEL = {0: SEGMENTATION, 1: DETECTION, 2: CLASSIFICATION}


@pytest.mark.parametrize("label", [0, 1, 2])
def test_loss_is_zero_for_equal_outputs_and_positive_for_different_ones(model, label):
    kind = KIND_OF_LABEL[label]
    teacher = outputs(model, images())[label]
    if kind == DETECTION:  # make some anchors confident so the box term is exercised at zero too
        teacher = [level.clone() for level in teacher]
        teacher[0][..., 0, 0, 4] = 3.0
    student = detached(teacher)
    assert abs(float(distillation_loss(student, teacher, kind, 2.0, 0.5))) < 1e-6
    assert float(distillation_loss(outputs(perturbed(model), images())[label], teacher, kind, 2.0, 0.5)) > 1e-4


def test_detection_boxes_count_only_on_anchors_the_teacher_is_confident_about():
    torch.manual_seed(0)
    teacher = [torch.randn(1, 2, 2, 2, 7) for _ in range(3)]
    for level in teacher:
        level[..., 4] = -3.0  # nothing confident
    teacher[1][0, 1, 0, 1, 4] = 3.0  # one confident anchor
    unconfident_moved = [level.clone() for level in teacher]
    unconfident_moved[0][..., :4] += 1.0
    assert abs(float(distillation_loss(unconfident_moved, teacher, DETECTION, det_conf=0.5))) < 1e-6
    confident_moved = [level.clone() for level in teacher]
    confident_moved[1][0, 1, 0, 1, :4] += 1.0
    assert float(distillation_loss(confident_moved, teacher, DETECTION, det_conf=0.5)) > 0.1
    assert abs(float(distillation_loss(confident_moved, teacher, DETECTION, det_conf=0.99))) < 1e-6


def bernoulli_kl_by_hand(teacher_logit, student_logit):
    p, q = 1 / (1 + math.exp(-teacher_logit)), 1 / (1 + math.exp(-student_logit))
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_detection_loss_matches_a_hand_computed_case():
    # two levels of one anchor each, one class; channels (tx, ty, tw, th, objectness, class)
    teacher = [torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, 0.0]).view(1, 1, 1, 1, 6),   # confident: sigmoid(2) = 0.88
               torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0, 1.0]).view(1, 1, 1, 1, 6)]  # not confident: 0.27
    student = [torch.tensor([0.5, 2.0, 0.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 1, 6),
               torch.tensor([3.0, 3.0, 3.0, 3.0, 1.0, -1.0]).view(1, 1, 1, 1, 6)]  # boxes ignored here
    objectness = (bernoulli_kl_by_hand(2.0, 0.0) + bernoulli_kl_by_hand(-1.0, 1.0)) / 2
    classes = (0.0 + bernoulli_kl_by_hand(1.0, -1.0)) / 2
    box = (0.5 * 0.5**2 + (2.0 - 0.5) + 0 + 0) / 4  # smooth L1 (beta 1), mean over the confident anchor's 4 values
    assert float(distillation_loss(student, teacher, DETECTION, det_conf=0.5)) == pytest.approx(
        objectness + classes + box, rel=1e-5)
    assert float(distillation_loss(student, teacher, DETECTION, det_conf=0.9)) == pytest.approx(
        objectness + classes, rel=1e-5)


def test_segmentation_loss_is_the_per_pixel_classification_loss_averaged():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    def pixels(logits):
        return logits.permute(0, 2, 3, 1).reshape(-1, 3)

    as_pixels = distillation_loss(pixels(student), pixels(teacher), CLASSIFICATION, temperature=3.0)
    assert float(distillation_loss(student, teacher, SEGMENTATION, temperature=3.0)) == pytest.approx(
        float(as_pixels), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_classification_loss_is_temperature_squared_times_avalanches(temperature):
    torch.manual_seed(0)
    teacher, student = torch.randn(6, 5) * 3, torch.randn(6, 5) * 3
    theirs = LearningWithoutForgetting(alpha=1.0, temperature=temperature)._distillation_loss(student, teacher,
                                                                                                range(5))
    ours = distillation_loss(student, teacher, CLASSIFICATION, temperature=temperature)
    assert float(ours) == pytest.approx(temperature**2 * float(theirs), rel=1e-5)


class TwoHeads(MultiTaskModule):
    """Two classification heads on a shared layer, no forward_all: exercises the per-label path."""

    def __init__(self):
        super().__init__()
        self.shared, self.heads = torch.nn.Linear(4, 8), torch.nn.ModuleList([torch.nn.Linear(8, 3) for _ in range(2)])
        self.known_train_tasks_labels = {0, 1}

    def forward_single_task(self, x, task_label):
        return self.heads[task_label](torch.relu(self.shared(x)))


def test_penalty_over_old_heads_is_avalanches_times_temperature_squared_over_the_number_of_heads():
    torch.manual_seed(0)
    teacher, student, x = TwoHeads(), TwoHeads(), torch.randn(5, 4)
    avalanche = LearningWithoutForgetting(alpha=0.7, temperature=2.0)
    avalanche.prev_model, avalanche.prev_classes_by_task = teacher, {0: {0, 1, 2}, 1: {0, 1, 2}}
    theirs = avalanche(x, None, student)  # sum over the old heads of the KL at temperature 2
    plugin = LwFPlugin(alpha=0.7, temperature=2.0)
    plugin.teacher = frozen_copy(teacher)
    ours = plugin.penalty(student, x, [0, 1]).detach()
    assert float(ours) == pytest.approx(2.0**2 / 2 * float(theirs), rel=1e-5)


def test_gradients_reach_the_student_only_and_bn_statistics_and_modes_are_untouched(model):
    teacher = frozen_copy(model)
    student = perturbed(model)
    student.train()
    batch_norms(student)[0].eval()  # as bnfreeze leaves it
    plugin = LwFPlugin(feature_weight=1.0)
    plugin.teacher = teacher
    stats = [bn.running_mean.clone() for bn in batch_norms(student)]
    loss = plugin.penalty(student, images(), [0, 1, 2])
    loss.backward()
    assert all(torch.equal(before, bn.running_mean) for before, bn in zip(stats, batch_norms(student)))
    assert student.training and not batch_norms(student)[0].training and batch_norms(student)[1].training
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.head.parameters() if p.requires_grad)
    assert any(float(p.grad.abs().sum()) > 0 for p in student.backbone.parameters())


def test_the_student_runs_as_it_trains_and_leaves_the_running_statistics_alone(model):
    """Equal to its teacher and in eval mode: no penalty. In train mode the old heads' outputs are those of batch
    statistics, as in the training pass (a student evaluated with running statistics instead could learn the new task
    in train mode only), and the running statistics are not updated a second time."""
    plugin = LwFPlugin(feature_weight=1.0)
    plugin.teacher = frozen_copy(model)
    x = images()
    student = copy.deepcopy(model).eval()
    assert abs(float(plugin.penalty(student, x, [0, 1, 2]))) < 1e-6

    student.train()
    stats = {name: b.clone() for name, b in student.named_buffers()}
    moved = float(plugin.penalty(student, x, [2]))
    assert all(torch.equal(stats[name], b) for name, b in student.named_buffers())
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = distillation_loss(reference(x, 2), plugin.teacher(x, 2), CLASSIFICATION, 2.0)
        features = reference.neck(reference.backbone(x)), plugin.teacher.neck(plugin.teacher.backbone(x))
    expected = float(expected) + sum(float(torch.nn.functional.mse_loss(features[0][k], features[1][k]))
                                     for k in features[1]) / len(features[1])
    assert moved == pytest.approx(expected, rel=1e-5) and moved > 1e-4


def test_feature_term_is_the_mse_of_fpn_features_averaged_over_levels(model):
    teacher, student = model, perturbed(model)
    x = images()
    plugin = LwFPlugin(alpha=0.0, feature_weight=3.0)
    plugin.teacher = frozen_copy(teacher)
    student.eval(), teacher.eval()
    with torch.no_grad():
        s, t = student.neck(student.backbone(x)), teacher.neck(teacher.backbone(x))
    expected = 3.0 * sum(float(torch.nn.functional.mse_loss(s[k], t[k])) for k in t) / len(t)
    assert float(plugin.penalty(student, x, [0])) == pytest.approx(expected, rel=1e-5)


def fake_strategy(model, task_label):
    """The template as a plugin sees it: the mini-batch, its training-pass output (train mode) and the loss."""
    x = images()
    return SimpleNamespace(model=model, mb_x=x, mb_output=model(x, task_label),
                           experience=SimpleNamespace(task_label=task_label), loss=torch.tensor(1.5))


def test_plugin_adds_nothing_first_then_distils_only_old_heads(model):
    student = copy.deepcopy(model).train()
    (plugin,) = build_plugins("lwf", {"lwf": {"alpha": 0.5}})

    first = fake_strategy(student, 0)
    plugin.before_backward(first)
    assert float(first.loss) == 1.5 and plugin.teacher is None
    plugin.after_training_exp(first)
    assert plugin.old_labels == [0] and not plugin.teacher.training
    assert all(not p.requires_grad for p in plugin.teacher.parameters())
    assert all(not t.data_ptr() == s.data_ptr() for t, s in zip(plugin.teacher.parameters(), student.parameters()))

    seg_teacher = plugin.teacher
    student.load_state_dict(perturbed(model).state_dict())  # "trained" on detection
    second = fake_strategy(student, 1)
    plugin.before_backward(second)
    with torch.no_grad(), kept_statistics(student):  # references from the single-task forward, not forward_all
        seg = distillation_loss(student(second.mb_x, 0), seg_teacher(second.mb_x, 0), SEGMENTATION, 2.0)
    assert float(second.loss) == pytest.approx(1.5 + 0.5 * float(seg), rel=1e-5)

    plugin.after_training_exp(second)
    assert plugin.old_labels == [0, 1] and plugin.teacher is not seg_teacher
    student.load_state_dict(perturbed(model, seed=3).state_dict())  # "trained" on classification
    third = fake_strategy(student, 2)
    plugin.before_backward(third)
    with torch.no_grad(), kept_statistics(student):
        seg = distillation_loss(student(third.mb_x, 0), plugin.teacher(third.mb_x, 0), SEGMENTATION, 2.0)
        det = distillation_loss(student(third.mb_x, 1), plugin.teacher(third.mb_x, 1), DETECTION, 2.0, 0.5)
    assert float(third.loss) == pytest.approx(1.5 + 0.5 * (float(seg) + float(det)) / 2, rel=1e-5)

    again = fake_strategy(student, 0)  # training a head trained before (a shared head): it is distilled too, on the
    plugin.before_backward(again)  # training pass's own output, not on a pass of its own
    again.mb_output = again.mb_output.detach() * 2.0  # what the training pass gave, now told apart from a new pass
    again.loss = torch.tensor(1.5)
    plugin.before_backward(again)
    with torch.no_grad(), kept_statistics(student):
        seg = distillation_loss(again.mb_output, plugin.teacher(again.mb_x, 0), SEGMENTATION, 2.0)
        det = distillation_loss(student(again.mb_x, 1), plugin.teacher(again.mb_x, 1), DETECTION, 2.0, 0.5)
    assert float(again.loss) == pytest.approx(1.5 + 0.5 * (float(seg) + float(det)) / 2, rel=1e-5)


@pytest.mark.parametrize("key, value", [("alpha", -1.0), ("temperature", 0.0), ("det_conf", 1.5),
                                        ("feature_weight", -0.1)])
def test_bad_parameters_are_clear_errors(key, value):
    with pytest.raises(ValueError, match=f"strategy.lwf.{key}: must be"):
        build_plugins("lwf", {"lwf": {key: value}})


def test_lwf_composes_with_ewc():
    plugins = build_plugins("ewc+lwf", {"lwf": {"temperature": 3.0}})
    assert [type(p) for p in plugins] == [MultiTaskEWCPlugin, LwFPlugin]
    assert plugins[1].temperature == 3.0 and plugins[1].alpha == 1.0


def test_a_tiny_run_with_lwf_writes_results_and_keeps_a_teacher(tmp_path, monkeypatch):
    built = []

    def recording_build_plugins(spec, params):
        built.extend(build_plugins(spec, params))
        return built

    distilled = []

    def recording_penalty(self, model, x, labels, trained=None):
        distilled.append(list(labels))
        return original_penalty(self, model, x, labels, trained)

    original_penalty = LwFPlugin.penalty
    monkeypatch.setattr(clmtl.builders, "build_plugins", recording_build_plugins)
    monkeypatch.setattr(LwFPlugin, "penalty", recording_penalty)
    overrides = ["data.train_size=4", "data.val_size=2", "data.image_size=64", "train.epochs=1",
                 "train.batch_size=2", "output.overlays=0", "output.checkpoints=false", "train.threads=1",
                 "model.fpn_channels=16", "strategy.lwf.alpha=0.5"]
    config = load_config(None, overrides, strategies=strategy_schemas())
    clmtl.runner.run(config, "lwf", tmp_path, baselines=False)
    (plugin,) = built
    assert plugin.alpha == 0.5 and plugin.old_labels == [0, 1, 2]
    assert distilled == [[0], [0], [0, 1], [0, 1]]  # 2 steps per experience; nothing while learning the first
    assert isinstance(plugin.teacher, UnifiedModel) and not plugin.teacher.training
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["strategy"] == "lwf" and len(written["matrix"]) == 3
    assert written["config"]["strategy"]["lwf"]["alpha"] == 0.5


def test_a_list_of_alphas_weighs_each_experience_the_last_for_the_rest():
    plugin = LwFPlugin(alpha=[0.0, 1.0, 2.5])
    weights = []
    for experience in range(5):
        plugin.before_training_exp(SimpleNamespace(clock=SimpleNamespace(train_exp_counter=experience)))
        weights.append(plugin.alpha)
    assert weights == [0.0, 1.0, 2.5, 2.5, 2.5]
    assert build_plugins("lwf", {"lwf": {"alpha": [0.5, 3.0]}})[0].alphas == [0.5, 3.0]
