"""`clmtl eval`: score a saved model on every task's validation split, and export what it predicted.

The scores come from the same scorers as training-time evaluation (``clmtl.metrics.scores``), so they equal the
run's final numbers. With a predictions folder, every prediction is also written in the format external
evaluators read, one file (or folder) per task, named after it, so anyone can recompute the numbers with their own
tools (for the default stream, whose tasks are named seg, det and cls: ``det.json``, ``seg/``, ``cls.csv``):

- ``<task>.json`` for a detection task: a COCO results list — the annotation file's own image and category ids,
  ``bbox`` xywh in original-image pixels (for the shapes benchmark: image ids 1, 2, ... in validation order, model
  pixels);
- ``<task>/<image stem>.png`` for a segmentation task: class indices as an 8-bit PNG at the image's original size
  (shapes: ``<index>.png``), the resolution its mIoU is scored at;
- ``<task>.csv`` for a classification task: file, true label, predicted label;
- ``metrics.json``: ``{task name: {metric: value}}``.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from clmtl.builders import build_model, make_decoder
from clmtl.config import Config
from clmtl.io import atomic_write_json, atomic_write_text
from clmtl.metrics.scores import scorer_for, update_segmentation
from clmtl.models.unified import UnifiedModel
from clmtl.models.decode import class_indices, predict
from clmtl.stream.benchmark import Benchmark, build_benchmark
from clmtl.stream.experiences import collate_for
from clmtl.stream.tasks import CLASSIFICATION, DETECTION, SEGMENTATION, OutputSpace, TaskSpec
from clmtl.training.checkpoint import checkpoint_config, load_model_checkpoint, load_task_state
from clmtl.training.devices import resolve_device, resolve_threads


class PredictionWriter:
    """Collects one task's predictions in external formats while the evaluation runs; labels are those of the task's
    head ``space`` (in the class scenario a head predicts the classes of every task of its kind seen so far)."""

    def __init__(self, task: TaskSpec, space: OutputSpace, dataset: Any, out_dir: Path) -> None:
        self.task, self.space, self.dataset, self.out_dir = task, space, dataset, out_dir
        self.detections: list[dict] = []
        self.rows: list[tuple[str, str, str]] = []
        if task.kind == SEGMENTATION:
            (out_dir / task.name).mkdir(parents=True, exist_ok=True)

    def _meta(self, index: int):
        return self.dataset.meta(index) if hasattr(self.dataset, "meta") else None

    def add(self, index: int, prediction: Any, target: Any) -> None:
        """Record the prediction for validation sample ``index``: segmentation logits (mapped to the file's size
        before the argmax), detection boxes, a classification class id."""
        meta = self._meta(index)
        if self.task.kind == SEGMENTATION:
            if meta is None:
                labels, name = class_indices(prediction, 0), f"{index:05d}"
            else:
                labels = class_indices(meta.letterbox.logits_to_original(prediction, meta.original_size), 0)
                name = meta.file.stem
            Image.fromarray(labels.to(torch.uint8).cpu().numpy()).save(self.out_dir / self.task.name / f"{name}.png")
        elif self.task.kind == CLASSIFICATION:
            file = str(meta.file) if meta is not None else f"{index:05d}"
            true, predicted = int(target), int(prediction)
            self.rows.append((file, self.space.classes[true], self.space.classes[predicted]))
        else:
            boxes = prediction["boxes"]
            if meta is not None:
                boxes = meta.letterbox.boxes_to_original(boxes, meta.original_size)
            image_id = meta.image_id if meta is not None and meta.image_id is not None else index + 1
            ids = self.space.category_ids
            for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), prediction["scores"].tolist(),
                                                      prediction["labels"].tolist()):
                self.detections.append({"image_id": image_id, "category_id": ids[label] if ids else label,
                                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})

    def close(self) -> None:
        if self.task.kind == DETECTION:
            atomic_write_json(self.out_dir / f"{self.task.name}.json", self.detections)
        elif self.task.kind == CLASSIFICATION:
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(["file", "true_label", "predicted_label"])
            writer.writerows(self.rows)
            atomic_write_text(self.out_dir / f"{self.task.name}.csv", text.getvalue())


@torch.inference_mode()
def evaluate_task(model: UnifiedModel, task: TaskSpec, dataset: Any, config: Config,
                  writer: PredictionWriter | None = None) -> dict[str, float]:
    """Every metric of ``task`` on ``dataset`` (its validation split, in head labels), in dataset order."""
    model.eval()
    scorer = scorer_for(task, model.spaces[task.head])
    decode = make_decoder(config, model)
    loader = DataLoader(dataset, batch_size=config.train.eval_batch_size, collate_fn=_pairs_collate(task.kind))
    index = 0
    device = next(model.parameters()).device
    for images, targets in loader:
        output = model(images.to(device, non_blocking=True), task.head)
        predictions = predict(output, task.kind, decode)
        if task.kind == SEGMENTATION:  # at the files' resolution where they have one, as the exports are
            update_segmentation(scorer, output, targets, dataset, index)
        else:
            scorer.update(predictions, targets)
        if writer is not None:
            written = output if task.kind == SEGMENTATION else predictions  # logits: resized to the file's size
            for offset in range(len(images)):
                writer.add(index + offset, written[offset], targets[offset])
        index += len(images)
    if writer is not None:
        writer.close()
    return scorer.result()


def _pairs_collate(kind: str):
    """The task's own collate for ``(image, target)`` pairs (the stream's adds a task label we do not need)."""
    collate = collate_for(kind)

    def pairs(batch: Sequence[tuple[torch.Tensor, Any]]) -> tuple[Any, Any]:
        images, targets, _ = collate([(image, target, 0) for image, target in batch])
        return images, targets

    return pairs


def evaluate_checkpoint(checkpoint: str | Path, predictions: str | Path | None = None,
                        config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, dict]:
    """Rebuild the checkpoint's benchmark and model, score every task, optionally export the predictions.

    The checkpoint's own config is used; ``config_file`` / ``overrides`` change it (data moved elsewhere, other
    eval thresholds). It computes on ``train.threads`` threads and puts the caller's count back however it ends.
    Returns ``{task name: {metric: value}}``.
    """
    saved = load_model_checkpoint(checkpoint)
    config = checkpoint_config(saved, checkpoint, config_file, overrides)
    callers_threads = torch.get_num_threads()
    torch.set_num_threads(resolve_threads(config.train.threads))
    try:
        benchmark = build_benchmark(config)
        model = build_model(config, benchmark.tasks, initial_weights=False)
        model.load_state_dict(saved.model)
        model.to(resolve_device(config.train.device))
        out_dir = Path(predictions) if predictions is not None else None
        metrics = evaluate_model(model, benchmark, config, out_dir, saved.task_states)
    finally:
        torch.set_num_threads(callers_threads)
    if out_dir is not None:
        atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def evaluate_model(model: UnifiedModel, benchmark: Benchmark, config: Config, predictions: Path | None = None,
                   task_states: dict | None = None) -> dict[str, dict]:
    """Every metric of each task of ``benchmark`` on its validation data: ``{task name: {metric: value}}``.

    ``predictions``: a folder to export each task's predictions into (``PredictionWriter``); ``task_states``: the
    per-task BatchNorm statistics a run kept (``bnfreeze`` per_task), loaded before each task is scored.
    """
    metrics = {}
    for task, dataset in zip(benchmark.tasks, benchmark.val_sets):
        if task_states and task.head in task_states:
            load_task_state(model, task_states[task.head])
        writer = None if predictions is None else PredictionWriter(task, model.spaces[task.head], dataset, predictions)
        metrics[task.name] = evaluate_task(model, task, dataset, config, writer)
    return metrics
