"""Export the unified model for deployment: every task's output from one pass, as TorchScript or ONNX.

What is exported is ``forward_all`` of the BatchNorm-folded model (``clmtl.models.fuse``) behind a wrapper that returns
a flat tuple, because tracers and ONNX take tensors and tuples, not dicts keyed by task label. The tuple holds, for
the model's heads by kind in ``OUTPUT_ORDER`` (then by head index): segmentation logits ``[B, C, S, S]``,
classification logits ``[B, C]``, then detection's raw levels ``[B, A, H, W, 5 + C]`` (strides 8/16/32, decoded by
``clmtl.models.decode``). A head is named after its task, or after its kind when several tasks share it (the class and
domain scenarios). Post-processing
(NMS, argmax) stays outside the graph: NMS is data-dependent control flow that neither format keeps portable.

A TorchScript file also carries ``clmtl.json`` (``torch.jit.load(path, _extra_files={"clmtl.json": ""})``): the
output names, tasks, image size and anchor layout a consumer needs to decode the outputs.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from clmtl.builders import build_model
from clmtl.models.fuse import fuse_batchnorm
from clmtl.models.heads import HeadedModel
from clmtl.stream.benchmark import build_benchmark
from clmtl.stream.scenario import placed
from clmtl.stream.tasks import CLASSIFICATION, DETECTION, SEGMENTATION, TaskSpec
from clmtl.training.checkpoint import checkpoint_config, load_model_checkpoint

FORMATS = ("torchscript", "onnx")
OUTPUT_ORDER = (SEGMENTATION, CLASSIFICATION, DETECTION)
METADATA_FILE = "clmtl.json"
ONNX_PACKAGES = ("onnx", "onnxscript")
"""What ``torch.onnx.export`` (its default, torch.export-based exporter) imports."""


class AllTasks(nn.Module):
    """``forward_all`` as a flat tuple of tensors: the heads by kind in ``OUTPUT_ORDER``, detection levels last."""

    def __init__(self, model: HeadedModel) -> None:
        super().__init__()
        self.model = model
        kinds = model.head_kinds
        self.labels = [head for kind in OUTPUT_ORDER for head in sorted(kinds) if kinds[head] == kind]
        self.names = {head: space.name for head, space in enumerate(model.spaces)}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model.forward_all(x)
        flat: list[torch.Tensor] = []
        for label in self.labels:
            output = outputs[label]
            flat.extend(output if isinstance(output, list) else [output])
        return tuple(flat)

    def output_names(self) -> list[str]:
        """One name per tensor of ``forward``: the task's name, with ``_stride<s>`` for each detection level."""
        names = []
        for label in self.labels:
            if self.model.head_kinds[label] == DETECTION:
                names.extend(f"{self.names[label]}_stride{stride}" for stride in self.model.anchor_layout.strides)
            else:
                names.append(self.names[label])
        return names


def export_metadata(wrapper: AllTasks, tasks: Sequence[TaskSpec], image_size: int, channels: int = 3) -> dict:
    """What a consumer of the exported file needs to read its outputs (no anchors for a classifier): ``tasks`` say
    which head (and which of its outputs) each task reads."""
    model = wrapper.model
    layout = model.anchor_layout
    return {
        "input": {"name": "images", "shape": [1, channels, image_size, image_size], "range": [0.0, 1.0]},
        "outputs": wrapper.output_names(),
        "tasks": [task.as_dict() for task in placed(tasks)],
        "heads": [{"name": wrapper.names[head], "kind": space.kind, "classes": list(space.classes)}
                  for head, space in enumerate(model.spaces)],
        "anchor_layout": None if layout is None else dataclasses.asdict(layout),
    }


def export_model(model: HeadedModel, path: str | Path, format: str = "torchscript", *, tasks: Sequence[TaskSpec],
                 image_size: int, channels: int = 3) -> Path:
    """Write ``model``'s BatchNorm-folded ``forward_all`` to ``path`` for ``image_size``-pixel square inputs of
    ``channels`` channels, with the stream's ``tasks`` (placed in the model's heads) in its metadata.

    ``format`` is ``torchscript`` (``torch.jit.trace``; load with ``torch.jit.load``) or ``onnx`` (needs the
    ``onnx`` and ``onnxscript`` packages; a clear ``ModuleNotFoundError`` names the missing ones). The graph is
    traced on one ``image_size`` image; TorchScript records shapes symbolically, so other batch sizes and sides
    (multiples of 32 for the unified model) run too. ``model`` itself is not modified. Returns ``path``.
    """
    if format not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got {format!r}")
    if model.anchor_layout is not None and (image_size < 64 or image_size % 32):
        raise ValueError(f"image_size must be a multiple of 32 (the coarsest stride) and at least 64, got {image_size}")
    if format == "onnx":
        missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise ModuleNotFoundError(
                f"ONNX export needs the Python package(s) {', '.join(missing)}, which are not installed "
                f"(pip install {' '.join(missing)}); --format torchscript needs nothing extra"
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = AllTasks(fuse_batchnorm(model)).eval()
    example = torch.rand(1, channels, image_size, image_size)
    metadata = export_metadata(wrapper, tasks, image_size, channels)
    if format == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})
    else:
        _export_onnx(wrapper, example, path, metadata)
    return path


def _export_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
    """ONNX with a dynamic batch dimension and the metadata as the model's ``clmtl.json`` metadata property."""
    import onnx

    # batch 2, not 1: torch.export specialises dimensions of size 1 to constants
    torch.onnx.export(wrapper, (example.expand(2, -1, -1, -1),), str(path), input_names=["images"],
                      output_names=metadata["outputs"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {METADATA_FILE: json.dumps(metadata)})
    onnx.save(graph, str(path))


def export_checkpoint(checkpoint: str | Path, path: str | Path, format: str = "torchscript",
                      image_size: int | None = None) -> Path:
    """Export the model of a ``clmtl run`` checkpoint (``clmtl export``), rebuilt from the checkpoint's own config.

    The tasks come from the checkpoint's ``tasks`` entry when it has one, else from rebuilding its benchmark (as
    ``clmtl eval`` does; for ``files`` that reads the datasets' class lists). ``image_size`` defaults to the
    run's ``data.image_size``; the anchors stay those the model was trained with.
    """
    saved = load_model_checkpoint(checkpoint)
    config = checkpoint_config(saved, checkpoint)
    tasks = saved.tasks if saved.tasks is not None else build_benchmark(config).tasks
    model = build_model(config, tasks, initial_weights=False)  # its backbone, fpn width and anchors
    try:
        model.load_state_dict(saved.model)
    except RuntimeError as error:
        raise ValueError(f"{checkpoint}: its weights do not fit the model its config describes: {error}") from None
    return export_model(model.eval(), path, format, tasks=tasks, image_size=image_size or config.data.image_size,
                        channels=config.data.channels)


def load_metadata(path: str | Path) -> dict:
    """The ``clmtl.json`` metadata of an exported TorchScript file."""
    files = {METADATA_FILE: ""}
    torch.jit.load(str(path), _extra_files=files)
    return json.loads(files[METADATA_FILE])
