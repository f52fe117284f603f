"""Learning without Forgetting (Li & Hoiem 2016) on a stream of heterogeneous tasks.

After each experience a frozen copy of the model becomes the teacher. While a later task trains, every head trained
before is run on the *current* inputs by teacher and student, and the student is pulled toward the teacher's outputs
— no old data is stored. In the task scenario those are the old tasks' heads; in the class and domain scenarios the
current task's head is among them (its kind's shared head), distilled on the classes the teacher knew (the old
classes' logits, as LwF is run class-incrementally). The distillation depends on the output kind:

- segmentation ``[B, C, H, W]`` and classification ``[B, C]`` logits: KL(teacher ‖ student) of the softmaxes
  at temperature T over classes, averaged over pixels / images, times T² (Hinton et al.: keeps the gradient
  scale independent of T). Avalanche's ``LearningWithoutForgetting`` computes the same KL without the T² (and
  only on the classes seen in the targets, all of ours): ours = T² × its ``_distillation_loss``. It also sums
  over old heads where we average, so α does not grow with the number of tasks.
- detection (3 raw ``[B, A, H, W, 5 + C]`` levels, anchors of all levels pooled): objectness and class logits
  are independent Bernoullis, so each gets the Bernoulli KL of the sigmoids (BCE against the teacher's
  probability minus the teacher's entropy: 0 when the student equals the teacher), averaged over anchors
  (and classes). The temperature is a softmax notion and is not applied here. The raw box channels get a
  smooth-L1 term on the anchors the teacher is confident about (objectness probability > ``det_conf``):
  elsewhere the teacher's boxes are noise.

The penalty is ``alpha × mean over old tasks of the per-task loss``, plus ``feature_weight ×`` the MSE between
teacher and student FPN features (averaged over levels), read from the same forward pass by a hook.

BatchNorm: the teacher runs in eval mode, and the student as it trains. The head being trained (the shared head of
the class and domain scenarios) is distilled on the student's output of the training pass itself, the one its
cross-entropy sees, as LwF does; the other heads (the earlier tasks' own heads in the task scenario) get one more
pass over the mini-batch with the modules in their training modes, which leaves the running statistics as they are
(``clmtl.training.plugin.kept_statistics``; Avalanche's LwF updates them a second time with the same batch). A student
pass in eval mode instead let the weights meet both terms through the gap between batch and running statistics, with the
new task learnt in train mode only: at chance in eval mode (Split digits, seed 100: LwF 0.50 in the domain scenario,
0.81 from the training pass).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clmtl.settings import FRACTION, NON_NEGATIVE, PER_EXPERIENCE, POSITIVE, setting
from clmtl.stream.tasks import CLASSIFICATION, DETECTION, SEGMENTATION
from clmtl.training.losses import output_kind
from clmtl.training.plugin import Plugin, copy_bytes, frozen_copy, kept_statistics
from clmtl.training.registry import register

Output = torch.Tensor | list[torch.Tensor]


def softmax_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of softmaxes at ``temperature`` over dim 1, mean over every other position, × T²."""
    log_student = F.log_softmax(student / temperature, dim=1)
    log_teacher = F.log_softmax(teacher / temperature, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)
    return kl.mean() * temperature**2


def bernoulli_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Element-wise KL(Bernoulli(σ(teacher)) ‖ Bernoulli(σ(student))): BCE to the soft target minus its entropy."""
    target = teacher_logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(student_logits, target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher_logits, target, reduction="none")
    return cross_entropy - entropy


def detection_distillation(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                           det_conf: float) -> torch.Tensor:
    """Objectness KL + class KL (means over all anchors) + smooth-L1 on raw boxes of teacher-confident anchors."""
    s = torch.cat([level.flatten(0, -2) for level in student])  # [anchors of all levels, 5 + C]
    t = torch.cat([level.flatten(0, -2) for level in teacher])
    objectness = bernoulli_kl(s[:, 4], t[:, 4]).mean()
    classes = bernoulli_kl(s[:, 5:], t[:, 5:]).mean()
    confident = t[:, 4].sigmoid() > det_conf
    box = F.smooth_l1_loss(s[confident, :4], t[confident, :4]) if confident.any() else s.sum() * 0.0
    return objectness + classes + box


def distillation_loss(student_out: Output, teacher_out: Output, kind: str, temperature: float = 2.0,
                      det_conf: float = 0.5) -> torch.Tensor:
    """The distillation loss of one task's output (see the module docstring for each kind)."""
    if kind == DETECTION:
        return detection_distillation(student_out, teacher_out, det_conf)
    if kind in (SEGMENTATION, CLASSIFICATION):
        return softmax_kl(student_out, teacher_out, temperature)
    raise ValueError(f"lwf: unknown task kind {kind!r}")


def old_classes(student: Output, teacher: Output) -> Output:
    """The student's output on the classes the teacher knew: a head that grew since (class scenario) has new
    classes last, which distillation leaves out (the teacher has no opinion on them)."""
    if isinstance(student, (list, tuple)):
        return [s[..., : t.shape[-1]] for s, t in zip(student, teacher)]
    return student[:, : teacher.shape[1]]


def feature_distillation(student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor]) -> torch.Tensor:
    """MSE between student and teacher features, averaged over pyramid levels."""
    return torch.stack([F.mse_loss(student[level], teacher[level]) for level in teacher]).mean()


def outputs_and_features(model: nn.Module, x: torch.Tensor, labels: Sequence[int],
                         with_features: bool) -> tuple[dict[int, Output], dict[int, torch.Tensor] | None]:
    """Each label's output, from one backbone pass when the model has ``forward_all``, and its FPN features."""
    if not hasattr(model, "forward_all"):
        if with_features:
            raise ValueError("strategy.lwf.feature_weight > 0 needs a model with forward_all and a neck")
        return {label: model(x, label) for label in labels}, None
    features: dict[int, torch.Tensor] = {}
    hook = model.neck.register_forward_hook(lambda module, args, out: features.update(out)) if with_features else None
    try:
        outputs = model.forward_all(x)
    finally:
        if hook is not None:
            hook.remove()
    return {label: outputs[label] for label in labels}, (features if with_features else None)


class LwFPlugin(Plugin, supports_distributed=True):
    """LwF: distil every old task's outputs on the current inputs from the previous model (any task kind).

    Distils every head trained before, from the model as it was after the previous experience, on current inputs."""

    state = ("old_labels",)
    model_copies = ("teacher",)
    """The teacher: a frozen copy of the model as the previous experience left it."""

    def __init__(self, alpha: float | Sequence[float] = 1.0, temperature: float = 2.0, det_conf: float = 0.5,
                 feature_weight: float = 0.0) -> None:
        super().__init__()
        self.alphas = list(alpha) if isinstance(alpha, Sequence) else [alpha]
        """The distillation weight per experience, the last one for the rest."""
        self.alpha = self.alphas[0]
        self.temperature, self.det_conf, self.feature_weight = temperature, det_conf, feature_weight
        self.teacher: nn.Module | None = None
        self.old_labels: list[int] = []

    @property
    def memory_bytes(self) -> int:
        """Bytes of the teacher's parameters and buffers."""
        return copy_bytes(self.teacher)

    def after_training_exp(self, strategy, **kwargs) -> None:
        label = strategy.experience.task_label
        if label not in self.old_labels:
            self.old_labels.append(label)
        self.teacher = frozen_copy(strategy.model)

    def before_training_exp(self, strategy, **kwargs) -> None:
        self.alpha = self.alphas[min(strategy.clock.train_exp_counter, len(self.alphas) - 1)]

    def before_backward(self, strategy, **kwargs) -> None:
        if self.teacher is None or not self.old_labels:
            return
        trained = {strategy.experience.task_label: strategy.mb_output}
        strategy.loss = strategy.loss + self.penalty(strategy.model, strategy.mb_x, self.old_labels, trained)

    def penalty(self, model: nn.Module, x: torch.Tensor, labels: Sequence[int],
                trained: Mapping[int, Output] | None = None) -> torch.Tensor:
        """alpha × mean over ``labels`` of the distillation loss (+ feature_weight × feature MSE); ``trained``: the
        training pass's outputs of the heads it ran, used as the student's for those heads (module docstring)."""
        with_features = self.feature_weight > 0
        trained = {label: output for label, output in (trained or {}).items() if label in labels}
        with torch.no_grad():
            teacher_out, teacher_features = outputs_and_features(self.teacher, x, labels, with_features)
        student_out, student_features = dict(trained), None
        others = [label for label in labels if label not in trained]
        if others or with_features:
            with kept_statistics(model):
                passed, student_features = outputs_and_features(model, x, others, with_features)
            student_out.update(passed)
        per_task = [
            distillation_loss(old_classes(student_out[label], teacher_out[label]), teacher_out[label],
                              output_kind(teacher_out[label]), self.temperature, self.det_conf)
            for label in labels
        ]
        loss = self.alpha * torch.stack(per_task).mean()
        if with_features:
            loss = loss + self.feature_weight * feature_distillation(student_features, teacher_features)
        return loss


@dataclass(frozen=True)
class LwFSettings:
    """LwF's hyperparameters, ``strategy.lwf.<key>``."""

    alpha: float | list[float] = setting(1.0, PER_EXPERIENCE, search=(0.5, 1.0, 2.0),
                                         help="weight of the distillation term; a list: one per experience, the last "
                                              "for the rest")
    temperature: float = setting(2.0, POSITIVE, help="softmax temperature T (segmentation, classification)",
                                 search=(1.0, 2.0))
    det_conf: float = setting(0.5, FRACTION, help="detection: teacher objectness above which boxes are distilled")
    feature_weight: float = setting(0.0, NON_NEGATIVE, help="weight of the FPN feature MSE (0: none)")


register("lwf", settings=LwFSettings, acts_on=("loss",))(LwFPlugin)
