"""Where PLOP's pseudo-labels put the pixels of old classes, step by step, in a class-incremental segmentation run.

    python benchmarks/class_incremental.py --kind seg --strategies plop --out runs/ci_seg_plop
    python benchmarks/pseudo_label_audit.py runs/ci_seg_plop/seed0/plop

In the overlapped setting a step's images label the pixels of earlier steps' classes as background. PLOP
relabels a background pixel with the previous model's class where that model is confident (its entropy rule,
``strategies/plop.py``) and ignores it elsewhere, so how well the old classes are kept depends on how well the
previous model finds them. The data knows the truth: this script reads each step's training images with every class
labelled (the source's own masks) and, with the run's checkpoint of the previous step as the previous model, counts
what PLOP's rule makes of the old classes' pixels that the step labels background: their own class, another old
class, background (the model is then taught that the old class is background), or ignored. It also gives how many of
those pixels the previous model's argmax finds at all. MiB's unbiased cross-entropy never labels such a pixel
background (a background pixel scores background or any old class).

Reads ``RUN/checkpoints/exp{k}.pt`` (``output.checkpoints: true``, the default) and the run's config from them;
prints one line per step.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from clmtl.builders import build_model
from clmtl.data.relabel import Relabelled
from clmtl.data.sources import load_task
from clmtl.stream.benchmark import build_benchmark, in_head_labels, load_options, task_entries
from clmtl.stream.tasks import IGNORE_INDEX, SEGMENTATION, kind_name
from clmtl.strategies.plop import entropy_thresholds, pseudo_labelled
from clmtl.training.checkpoint import checkpoint_config, load_model_checkpoint

OUTCOMES = ("own class", "another old class", "background", "ignored")
BATCH = 32


def outcomes(pseudo: torch.Tensor, truth: torch.Tensor, old: int) -> torch.Tensor:
    """Per pixel, the index in ``OUTCOMES`` of what ``pseudo`` labels made of a pixel whose true head label is
    ``truth`` (meaningful where ``truth`` is an old class, 1 to ``old - 1``)."""
    result = torch.full_like(pseudo, OUTCOMES.index("ignored"))
    result[(pseudo > 0) & (pseudo < old) & (pseudo != truth)] = OUTCOMES.index("another old class")
    result[pseudo == truth] = OUTCOMES.index("own class")
    result[pseudo == 0] = OUTCOMES.index("background")
    return result


def source_view(dataset) -> tuple[torch.utils.data.Dataset, list[int]]:
    """The dataset under ``Relabelled`` views, and the index in it of each of ``dataset``'s samples."""
    positions = list(range(len(dataset)))
    while isinstance(dataset, Relabelled):
        positions = [dataset.indices[i] for i in positions]
        dataset = dataset.dataset
    return dataset, positions


def step_pixels(config, tasks, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step ``step``'s training images, their labels as the step gives them (head labels) and every class's true
    head label, read without augmentation."""
    entry = task_entries(config)[step]
    train = in_head_labels(load_task(entry.name, kind_name(entry.kind), entry.data, load_options(config)).train,
                           tasks[step])
    source, positions = source_view(train)
    head_label = torch.zeros(256, dtype=torch.long)  # source label -> head label, by class name over every task
    head_label[IGNORE_INDEX] = IGNORE_INDEX
    for task in tasks:
        for name, label in zip(task.classes[1:], task.labels[1:]):
            head_label[source.classes.index(name)] = label
    images, labels, truth = [], [], []
    for i, position in enumerate(positions):
        image, label = train[i][:2]
        images.append(image)
        labels.append(label)
        truth.append(head_label[torch.as_tensor(source[position][1]).long()])
    labels, truth = torch.stack(labels), torch.stack(truth)
    own = labels > 0
    if not torch.equal(labels[own & (labels != IGNORE_INDEX)], truth[own & (labels != IGNORE_INDEX)]):
        raise RuntimeError(f"step {step}: the source's masks do not match the step's labels")
    return torch.stack(images), labels, truth


@torch.no_grad()
def audit(run: Path) -> list[dict]:
    """One row per step after the first: the shares of ``OUTCOMES`` over the old classes' pixels labelled background,
    the share the previous model's argmax finds, and the pixels counted."""
    checkpoints = sorted(run.glob("checkpoints/exp*.pt"), key=lambda path: int(path.stem[3:]))
    if len(checkpoints) < 2:
        raise SystemExit(f"{run}: needs checkpoints/exp0.pt and exp1.pt at least (a run of two steps or more, "
                         "with output.checkpoints: true)")
    config = checkpoint_config(load_model_checkpoint(checkpoints[0]), checkpoints[0])  # every step's: the run's
    benchmark = build_benchmark(config)
    model = build_model(config, benchmark.tasks, initial_weights=False).eval()
    rows = []
    for step in range(1, len(checkpoints)):
        if benchmark.scenario != "class" or benchmark.tasks[step].kind != SEGMENTATION:
            raise SystemExit(f"{run}: not a class-incremental segmentation run")
        model.load_state_dict(load_model_checkpoint(checkpoints[step - 1]).model)
        old = 1 + sum(len(task.classes) - 1 for task in benchmark.tasks[:step])
        head = benchmark.stream.train_stream[step].task_label
        images, labels, truth = step_pixels(config, benchmark.tasks, step)
        logits = torch.cat([model(images[s:s + BATCH], head)[:, :old].float() for s in range(0, len(images), BATCH)])
        pseudo, _ = pseudo_labelled(labels, logits, entropy_thresholds(logits, labels, 0.001))
        hidden = (labels == 0) & (truth > 0) & (truth < old)  # old classes' pixels the step calls background
        counts = torch.bincount(outcomes(pseudo, truth, old)[hidden], minlength=len(OUTCOMES))
        found = (logits.argmax(1) == truth)[hidden].float().mean()
        rows.append({"step": step + 1, "pixels": int(hidden.sum()), "found": float(found),
                     **{name: float(count) / max(int(hidden.sum()), 1) for name, count in zip(OUTCOMES, counts)}})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a class-incremental segmentation run's folder (with checkpoints/)")
    args = parser.parse_args(argv)
    rows = audit(args.run)
    print("| step | old-class pixels labelled background | previous model finds | " + " | ".join(OUTCOMES) + " |")
    print("|---" * (3 + len(OUTCOMES)) + "|")
    for row in rows:
        print(f"| {row['step']} | {row['pixels']} | {row['found']:.3f} | "
              + " | ".join(f"{row[name]:.3f}" for name in OUTCOMES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
