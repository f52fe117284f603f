"""The one model every task shares: backbone (YOLOv8n by default) -> FPN -> unified head, as an Avalanche multi-task
module whose heads grow with the stream.

A task label is a head index (``TaskSpec.head``); the label picks which part of the head runs.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clmtl.models.anchors import AnchorLayout
from clmtl.models.backbone import TappedBackbone, build_backbone
from clmtl.models.fpn import FPN
from clmtl.models.heads import HeadedModel, Output
from clmtl.models.routing import TaskRoutes, gate_points
from clmtl.models.unified_head import ClassRows, UnifiedHead
from clmtl.stream.tasks import CLASSIFICATION, DETECTION, SEGMENTATION, OutputSpace


class UnifiedModel(HeadedModel):
    """Backbone + FPN + one shared head; ``forward(x, task_label)`` returns the output of head ``task_label``.

    ``spaces`` are its heads (``clmtl.stream.scenario.output_spaces`` of the stream's tasks): head ``i`` is the
    Avalanche task label of the experiences whose tasks use it.
    ``backbone`` names an entry of ``clmtl.models.backbone.BACKBONES``.

    Outputs: segmentation ``[B, C, S, S]`` logits; classification ``[B, C]`` logits; detection a list
    (strides 8/16/32) of raw ``[B, A, H, W, 5 + C]`` tensors (see ``clmtl.models.decode``). ``C`` is the head's classes
    so far: a class-scenario head grows as experiences bring new classes (``adaptation``).
    """

    def __init__(
        self,
        spaces: Sequence[OutputSpace],
        fpn_channels: int = 64,
        anchor_layout: AnchorLayout | None = None,
        image_size: int = 128,
        weights: str | Path | None = None,
        backbone: str = "yolov8n",
        fpn_smooth: bool = True,
    ) -> None:
        super().__init__(spaces)
        self.anchor_layout = anchor_layout or AnchorLayout.for_image_size(image_size)
        self.backbone_name = backbone
        self.backbone = build_backbone(backbone)
        if self.backbone.strides != self.anchor_layout.strides:
            raise ValueError(
                f"anchor layout strides {self.anchor_layout.strides} differ from the backbone's {self.backbone.strides}"
            )
        self.neck = FPN(self.backbone.out_channels, fpn_channels, smooth=fpn_smooth)
        self.head = UnifiedHead(fpn_channels, self.anchor_layout.num_anchors, [s.kind for s in self.spaces],
                                [s.initial for s in self.spaces], [self.head_generator(h) for h in range(len(spaces))])
        self.routes: TaskRoutes | None = None
        """Per-task channel gates on the shared layers, once ``enable_routing`` added them (``routing`` strategy)."""
        if weights is not None:
            self.load_weights(weights)

    def rows(self, head: int) -> ClassRows:
        return self.head.rows(head)

    # -- forward passes ---------------------------------------------------------------------------
    def forward_single_task(self, x: torch.Tensor, task_label: int) -> Output:
        """The output of head ``task_label``, computing only the pyramid levels and head rows it needs."""
        kind = self.head_kinds[task_label]
        if kind == CLASSIFICATION:
            rows = self.rows(task_label)
            return F.linear(self.embed(x, task_label), rows.weight, rows.bias)
        if self.routes is not None:
            self.routes.active = task_label
        feats = self.backbone(x)
        if kind == SEGMENTATION:
            h = self.head.features(self.neck(feats, levels=(0,))[0])  # the finest level
            return self._upsample(self.head.segmentation(h, task_label), x)
        pyramid = self.neck(feats)
        return [self.head.detection(self.head.features(pyramid[i]), task_label) for i in sorted(pyramid)]

    def embed(self, x: torch.Tensor, head: int) -> torch.Tensor:
        """The features classification head ``head``'s linear layer reads: the shared features of the coarsest level,
        globally averaged ``[B, channels]`` (iCaRL's feature space)."""
        if self.head_kinds[head] != CLASSIFICATION:
            raise ValueError(f"head {head} is {self.head_kinds[head]}; only a classification head reads embeddings")
        if self.routes is not None:
            self.routes.active = head
        feats = self.backbone(x)
        coarsest = len(feats) - 1
        return self.head.features(self.neck(feats, levels=(coarsest,))[coarsest]).mean(dim=(2, 3))

    def forward_all(self, x: torch.Tensor) -> dict[int, Output]:
        """Every head's output, keyed by head index: from one backbone + FPN pass over the levels the heads need
        (all for detection, the finest for segmentation, the coarsest for classification), or with task routes one
        pass per head (each route gates the features from the first layer on, so the heads share no computation)."""
        if self.routes is not None:
            return {head: self.forward_single_task(x, head) for head in self.head_kinds}
        kinds = self.head_kinds
        heads_of = {kind: [h for h, k in kinds.items() if k == kind] for kind in (SEGMENTATION, DETECTION,
                                                                                   CLASSIFICATION)}
        feats = self.backbone(x)
        finest, coarsest = 0, len(feats) - 1
        levels = set(range(len(feats))) if heads_of[DETECTION] else set()
        levels |= {finest} if heads_of[SEGMENTATION] else set()
        levels |= {coarsest} if heads_of[CLASSIFICATION] else set()
        shared = {i: self.head.features(p) for i, p in self.neck(feats, levels=tuple(sorted(levels))).items()}
        outputs: dict[int, Output] = {}
        if heads_of[DETECTION] or heads_of[SEGMENTATION]:
            finest_out = self.head.conv_outputs(shared[finest], heads_of[DETECTION] + heads_of[SEGMENTATION])
            for head in heads_of[SEGMENTATION]:
                outputs[head] = self._upsample(finest_out[head], x)
            coarser = [self.head.conv_outputs(shared[i], heads_of[DETECTION]) for i in sorted(shared)[1:]]
            for head in heads_of[DETECTION]:
                outputs[head] = [finest_out[head]] + [level[head] for level in coarser]
        if heads_of[CLASSIFICATION]:
            outputs.update(self.head.classification(shared[coarsest], heads_of[CLASSIFICATION]))
        return {head: outputs[head] for head in kinds}

    @staticmethod
    def _upsample(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # NCHW first: a channels_last model's convs return NHWC maps, and bilinear upsampling of a few-channel NHWC map
        # is ~3x slower on CPU; the low-resolution copy is tiny
        return F.interpolate(logits.contiguous(), size=x.shape[-2:], mode="bilinear", align_corners=False)

    # -- task routes --------------------------------------------------------------------------------
    def enable_routing(self) -> TaskRoutes:
        """Gate the channels of the shared layers per task (``clmtl.models.routing``); does nothing the second time.

        The routes are part of the model: ``routes.*`` in its state dict, counted in its parameters.
        """
        if self.routes is None:
            parts = {"backbone": self.backbone, "neck": self.neck, "head.shared": self.head.shared}
            self.routes = TaskRoutes(len(self.spaces), gate_points(parts)).to(self.head.shared[0].weight.device)
        return self.routes

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, after giving every head as many classes as the state dict has (a checkpoint
        of a grown model loads into the model its config builds, an earlier state into a grown model) and adding task
        routes if the state dict has them (a ``routing`` run's checkpoint)."""
        if self.routes is None and any(key.startswith("routes.") for key in state_dict):
            self.enable_routing()
        self.resize_heads(state_dict, "head.outputs.")
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
