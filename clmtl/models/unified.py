"""The one model every task shares: backbone (YOLOv8n by default) -> FPN -> unified head, as an Avalanche multi-task
module.

A task's label is its index in ``tasks``; the label picks which part of the head runs.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from avalanche.models import MultiTaskModule
from torch import nn

from clmtl.models.anchors import AnchorLayout
from clmtl.models.backbone import TappedBackbone, build_backbone
from clmtl.models.fpn import FPN
from clmtl.models.routing import TaskRoutes, gate_points
from clmtl.models.unified_head import UnifiedHead
from clmtl.tasks import CLASSIFICATION, DETECTION, SEGMENTATION, TaskSpec

Output = torch.Tensor | list[torch.Tensor]


class UnifiedModel(MultiTaskModule):
    """Backbone + FPN + one shared head; ``forward(x, task_label)`` returns that task's output.

    ``backbone`` names an entry of ``clmtl.models.backbone.BACKBONES``.

    Outputs: segmentation ``[B, C, S, S]`` logits; classification ``[B, C]`` logits; detection a list
    (strides 8/16/32) of raw ``[B, A, H, W, 5 + C]`` tensors (see ``clmtl.decode``).
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        fpn_channels: int = 64,
        anchor_layout: AnchorLayout | None = None,
        image_size: int = 128,
        weights: str | Path | None = None,
        backbone: str = "yolov8n",
        fpn_smooth: bool = True,
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        kinds = [t.kind for t in self.tasks]
        repeated = sorted({k for k in kinds if kinds.count(k) > 1})
        if repeated:
            raise ValueError(f"the model holds at most one task of each kind; repeated: {repeated}")
        self.task_kinds = {label: task.kind for label, task in enumerate(self.tasks)}
        classes = {task.kind: task.num_classes for task in self.tasks}

        self.anchor_layout = anchor_layout or AnchorLayout.for_image_size(image_size)
        self.backbone_name = backbone
        self.backbone = build_backbone(backbone)
        if self.backbone.strides != self.anchor_layout.strides:
            raise ValueError(
                f"anchor layout strides {self.anchor_layout.strides} differ from the backbone's {self.backbone.strides}"
            )
        self.neck = FPN(self.backbone.out_channels, fpn_channels, smooth=fpn_smooth)
        self.head = UnifiedHead(
            fpn_channels,
            self.anchor_layout.num_anchors,
            det_classes=classes.get(DETECTION, 0),
            seg_classes=classes.get(SEGMENTATION, 0),
            cls_classes=classes.get(CLASSIFICATION, 0),
        )
        self.routes: TaskRoutes | None = None
        """Per-task channel gates on the shared layers, once ``enable_routing`` added them (``routing`` strategy)."""
        if weights is not None:
            self.load_weights(weights)

    # -- Avalanche multi-task API -------------------------------------------------------------
    def forward(self, x: torch.Tensor, task_labels: int | torch.Tensor | None) -> Output | dict[int, Output]:
        """Dispatch on the task label: an int, a tensor of one repeated label, or None for all tasks."""
        if task_labels is None:
            return self.forward_all(x)
        if isinstance(task_labels, torch.Tensor):
            labels = torch.unique(task_labels)
            if labels.numel() != 1:
                raise ValueError(
                    f"a mini-batch must hold a single task; got task labels {labels.tolist()} "
                    "(each task has its own output format, so batches cannot mix tasks)"
                )
            task_labels = int(labels.item())
        return self.forward_single_task(x, int(task_labels))

    def forward_all_tasks(self, x: torch.Tensor) -> dict[int, Output]:
        """Avalanche's name for ``forward_all``."""
        return self.forward_all(x)

    def adaptation(self, experience) -> None:
        """Record the experience's task labels; the architecture is fixed, so nothing else changes.

        Avalanche's default reads ``classes_in_this_experience``, which our experiences do not have.
        """
        labels = set(getattr(experience, "task_labels", ()))
        unknown = sorted(labels - set(self.task_kinds))
        if unknown:
            raise ValueError(f"experience has task labels {unknown}; the model knows {sorted(self.task_kinds)}")
        if self.training:
            self.known_train_tasks_labels = self.known_train_tasks_labels | labels

    # -- forward passes ---------------------------------------------------------------------------
    def forward_single_task(self, x: torch.Tensor, task_label: int) -> Output:
        """The task's output, computing only the pyramid levels and head channels it needs."""
        kind = self._kind(task_label)
        if self.routes is not None:
            self.routes.active = task_label
        feats = self.backbone(x)
        finest, coarsest = 0, len(feats) - 1
        if kind == SEGMENTATION:
            h = self.head.features(self.neck(feats, levels=(finest,))[finest])
            return self._upsample(self.head.segmentation(h), x)
        if kind == CLASSIFICATION:
            h = self.head.features(self.neck(feats, levels=(coarsest,))[coarsest])
            return self.head.classification(h)
        pyramid = self.neck(feats)
        return [self.head.detection(self.head.features(pyramid[i])) for i in sorted(pyramid)]

    def forward_all(self, x: torch.Tensor) -> dict[int, Output]:
        """Every task's output, keyed by task label: from one backbone + FPN pass, or with task routes one pass per
        task (each route gates the features from the first layer on, so the tasks share no computation)."""
        if self.routes is not None:
            return {label: self.forward_single_task(x, label) for label in self.task_kinds}
        pyramid = self.neck(self.backbone(x))
        shared = {i: self.head.features(p) for i, p in pyramid.items()}
        finest, coarsest = min(shared), max(shared)
        outputs: dict[str, Output] = {}
        if self.head.det_channels and self.head.seg_channels:
            det_finest, seg = self.head.detection_and_segmentation(shared[finest])
            outputs[SEGMENTATION] = self._upsample(seg, x)
            outputs[DETECTION] = [det_finest] + [self.head.detection(shared[i]) for i in sorted(shared)[1:]]
        elif self.head.det_channels:
            outputs[DETECTION] = [self.head.detection(shared[i]) for i in sorted(shared)]
        elif self.head.seg_channels:
            outputs[SEGMENTATION] = self._upsample(self.head.segmentation(shared[finest]), x)
        if self.head.classifier is not None:
            outputs[CLASSIFICATION] = self.head.classification(shared[coarsest])
        return {label: outputs[kind] for label, kind in self.task_kinds.items()}

    @staticmethod
    def _upsample(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # NCHW first: a channels_last model's convs return NHWC maps, and bilinear upsampling of a few-channel NHWC map
        # is ~3x slower on CPU (6.2 vs 2.1 ms for [1, 5, 64, 64] -> 512 px); the low-resolution copy is tiny
        return F.interpolate(logits.contiguous(), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def _kind(self, task_label: int) -> str:
        if task_label not in self.task_kinds:
            raise ValueError(f"unknown task label {task_label}; the model's tasks are {self.task_kinds}")
        return self.task_kinds[task_label]

    # -- task routes --------------------------------------------------------------------------------
    def enable_routing(self) -> TaskRoutes:
        """Gate the channels of the shared layers per task (``clmtl.models.routing``); does nothing the second time.

        The routes are part of the model: ``routes.*`` in its state dict, counted in its parameters.
        """
        if self.routes is None:
            parts = {"backbone": self.backbone, "neck": self.neck, "head.shared": self.head.shared}
            self.routes = TaskRoutes(len(self.tasks), gate_points(parts))
        return self.routes

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; a state dict with task routes first adds routes to a model without them, so
        a ``routing`` run's checkpoint loads into the model ``clmtl eval`` and ``clmtl export`` rebuild from its config.
        """
        if self.routes is None and any(key.startswith("routes.") for key in state_dict):
            self.enable_routing()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- parameters and weights -------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part, so each part can get its own learning rate (task routes are in no part: the ``routing``
        strategy gives them a group of their own)."""
        return {
            "backbone": list(self.backbone.parameters()),
            "neck": list(self.neck.parameters()),
            "head": list(self.head.parameters()),
        }

    def load_weights(self, path: str | Path) -> None:
        """Load a local state dict: of this model, or of the backbone's source library (an ultralytics
        ``DetectionModel`` for yolov8n, a torchvision classifier for the others), of which only the layers the
        backbone has are used.

        Never downloads. A file that does not fit raises ``ValueError`` naming it and the mismatched keys.
        """
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for unreadable / pickled-object files
            raise ValueError(
                f"cannot read weights file {path} as a state dict ({type(err).__name__}: {err}). "
                "Save one with torch.save(model.state_dict(), path); for an ultralytics checkpoint use "
                "torch.save(YOLO('yolov8n.pt').model.float().state_dict(), path), for torchvision "
                "torch.save(torchvision.models.mobilenet_v3_small(weights=...).state_dict(), path)."
            ) from err
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"weights file {path} does not hold a state dict (name -> tensor)")

        target: nn.Module = self
        if any(k.startswith(self.backbone.checkpoint_prefix) for k in state):  # the source library's own model
            target = self.backbone
            state = _backbone_state(state, self.backbone)
        own = target.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        mismatch = f"weights file {path} does not match the model (backbone '{self.backbone_name}')"
        if missing or unexpected:
            raise ValueError(f"{mismatch}: {len(missing)} missing keys {missing[:5]}, "
                             f"{len(unexpected)} unexpected keys {unexpected[:5]}")
        reshaped = [f"{k} {list(state[k].shape)} (model {list(v.shape)})" for k, v in own.items()
                    if state[k].shape != v.shape]  # e.g. another number of classes, another width
        if reshaped:
            raise ValueError(f"{mismatch}: {len(reshaped)} tensors of another shape: {', '.join(reshaped[:3])}")
        target.load_state_dict(state)


def _backbone_state(state: Mapping[str, torch.Tensor], backbone: TappedBackbone) -> dict[str, torch.Tensor]:
    """Rename ``<prefix><n>.<rest>`` to the backbone's ``layers.<n>.<rest>``, dropping layers the backbone cut off
    (the ultralytics neck and Detect head, torchvision's last 1x1 conv) and the keys it declares unused (torchvision's
    classifier); other keys stay as they are, to be reported as unexpected."""
    prefix, num_layers = backbone.checkpoint_prefix, len(backbone.layers)
    renamed = {}
    for key, value in state.items():
        if key.startswith(backbone.checkpoint_ignored):
            continue
        index, _, rest = key.removeprefix(prefix).partition(".")
        if key.startswith(prefix) and index.isdigit() and rest:
            if int(index) < num_layers:
                renamed[f"layers.{index}.{rest}"] = value
        else:
            renamed[key] = value
    return renamed
