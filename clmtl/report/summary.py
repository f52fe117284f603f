"""Turn a run's results into what people read: results.json, summary.md tables and plots.

Everything here works from the results dict of ``clmtl.report.results`` (or from tensors for the overlays),
so a report can be rebuilt from an old results.json without the model. Plots use matplotlib's object API
with the Agg canvas (no pyplot state, no GUI backend, bundled DejaVu font).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from clmtl.io import atomic_write_json, atomic_write_text
from clmtl.metrics.forgetting import absolute_drop, relative_drop
from clmtl.stream.tasks import CLASSIFICATION, DETECTION, SEGMENTATION

NONE_MARK = "–"
"""How a missing value (null in results.json) appears in tables and plots."""

FORGETTING_TITLE = "forgetting (Avalanche: R[j][j] − R[T−1][j])"
FORGETTING_MAX_TITLE = "forgetting_max (Mammoth: max_i R[i][j] − R[T−1][j])"

AVERAGE_ACCURACY_DEFINITION = "mean over all tasks j of R[T−1][j]: each task's primary metric after the last experience"
BWT_DEFINITION = "mean over j < T−1 of R[T−1][j] − R[j][j]; negative = earlier tasks got worse"
FWT_DEFINITION = ("mean over j ≥ 1 of R[j−1][j] − b[j] (GEM, Lopez-Paz & Ranzato 2017), b[j] = task j's score at "
                  "random initialisation; positive = earlier experiences help task j before it is trained")

SCENARIOS = {"task": "task-incremental", "class": "class-incremental", "domain": "domain-incremental"}

SMALL_STREAM = 6
"""Up to this many tasks the matrix plot writes values in its cells and the Markdown matrix names metrics in headers."""

MAX_PLOT_WIDTH = 12.0
"""Inches: the accuracy-matrix plot and the task-curve grid grow with the stream up to this width."""

CURVE_COLUMNS = 5
"""The task-curve grid has at most this many panels per row."""


def summary_markdown(results: Mapping[str, Any]) -> str:
    """The run's tables as Markdown: stream summary, final vs baseline, accuracy matrix, forgetting, cost.

    Works for any number of tasks (rows and columns named by task) and for results.json files written before
    ``scenario``, ``average_accuracy``, ``fwt`` and ``random_init`` existed (shown as not recorded / –).
    """
    tasks = results["tasks"]
    names = " → ".join(t["name"] for t in tasks)
    scenario = results.get("scenario")
    scenario_text = "not recorded" if scenario is None else f"{SCENARIOS.get(scenario, scenario)} (`{scenario}`)"
    lines = [f"# clmtl results: strategy `{results.get('strategy', '?')}`, "
             f"benchmark `{results.get('benchmark', '?')}`, seed {results.get('seed', '?')}", "",
             f"clmtl {results.get('clmtl_version', '?')}. Scenario: {scenario_text}. "
             f"Stream order ({len(tasks)} task{'' if len(tasks) == 1 else 's'}): {names}."]
    lines += _lineage_lines(results.get("parent"))
    for section in (_stream_section, _final_section, _matrix_section, _forgetting_section, _cost_section):
        lines += [""] + section(results)
    return "\n".join(lines) + "\n"


def _lineage_lines(parent: Mapping[str, Any] | None) -> list[str]:
    """A continued run: where its first tasks were trained, and what its strategy did not take over."""
    if not parent:
        return []
    lines = ["", f"Continued from `{parent['run']}` (strategy `{parent['strategy']}`; its results.json has SHA-256 "
                 f"`{parent['results_sha256'][:12]}…`): the first {parent['tasks']} tasks and their matrix rows are "
                 "that run's."]
    return lines + [f"- {note}." for note in parent.get("not_taken_over", [])]


def _stream_section(results: Mapping[str, Any]) -> list[str]:
    """Average accuracy, BWT and FWT with their definitions; each task's forward-transfer term if b[j] is known."""
    lines = ["## Stream summary", "", "| Measure | Value | Definition |", "|---|---|---|",
             f"| Average accuracy | {format_value(results.get('average_accuracy'), 3)} | "
             f"{AVERAGE_ACCURACY_DEFINITION} |",
             f"| BWT | {format_value(results.get('bwt'), 3)} | {BWT_DEFINITION} |",
             f"| FWT | {format_value(results.get('fwt'), 3)} | {FWT_DEFINITION} |"]
    random_init = results.get("random_init") or {}
    if random_init:
        matrix = results["matrix"]
        lines += ["", "Forward transfer per task: score at random initialisation b[j], score just before task j is "
                  "trained R[j−1][j], and their difference (the terms FWT averages).", "",
                  "| Task | Metric | b[j] (random init) | R[j−1][j] | R[j−1][j] − b[j] |", "|---|---|---|---|---|"]
        for j, task in enumerate(results["tasks"]):
            before = _cell(matrix, j - 1, j) if j >= 1 else None
            b = random_init.get(task["name"])
            transfer = None if before is None or b is None else before - b
            lines.append(f"| {task['name']} | {task['metric']} | {format_value(b, 3)} | {format_value(before, 3)} "
                         f"| {format_value(transfer, 3)} |")
    return lines


def _final_section(results: Mapping[str, Any]) -> list[str]:
    """Each task's final score against its single-task baseline, and the drop (relative and absolute)."""
    tasks = results["tasks"]
    baseline, final = results.get("baseline") or {}, results.get("final") or {}
    drops = results.get("drop_vs_baseline") or {}
    rows = [(t["name"], t["metric"], baseline.get(t["name"]), final.get(t["name"]), drops.get(t["name"]))
            for t in tasks]
    lines = ["## Final vs single-task baseline", ""] + _drop_table(rows)
    lines += ["", "Drop: relative = (baseline − final) / baseline, absolute = baseline − final; positive = worse."]
    if not baseline:
        lines.append("Baselines were not trained in this run (`--no-baselines`).")

    extra = results.get("extra") or {}
    extra_base, extra_final = extra.get("baseline") or {}, extra.get("final") or {}
    extra_rows = []
    for t in tasks:
        for metric in t.get("extra", []):
            base = extra_base.get(t["name"], {}).get(metric)
            fin = extra_final.get(t["name"], {}).get(metric)
            extra_rows.append((t["name"], metric, base, fin, relative_drop(base, fin)))
    if extra_rows:
        lines += ["", "### Secondary metrics", ""] + _drop_table(extra_rows)
    return lines


def _matrix_section(results: Mapping[str, Any]) -> list[str]:
    """R as a table: a row per experience ("after <task>"), a column per task; metric names under the table if T > 6."""
    tasks = results["tasks"]
    many = len(tasks) > SMALL_STREAM
    headers = [t["name"] if many else f"{t['name']} ({t['metric']})" for t in tasks]
    lines = ["## Accuracy matrix R[i][j]", "",
             "Primary metric of task j (column) after training experience i (row).", "",
             "| | " + " | ".join(headers) + " |",
             "|---" * (len(tasks) + 1) + "|"]
    for task, row in zip(tasks, results["matrix"]):
        lines.append(f"| after {task['name']} | " + " | ".join(format_value(v, 3) for v in row) + " |")
    if many:
        metrics = {t["metric"] for t in tasks}
        lines += ["", f"Metric of every task: {tasks[0]['metric']}." if len(metrics) == 1 else
                  "Metrics: " + ", ".join(f"{t['name']} {t['metric']}" for t in tasks) + "."]
    return lines


def _forgetting_section(results: Mapping[str, Any]) -> list[str]:
    forgetting, forgetting_max = results.get("forgetting") or {}, results.get("forgetting_max") or {}
    lines = ["## Forgetting", "",
             "The headline forgetting is the Avalanche definition (`forgetting`); the Mammoth definition "
             "(`forgetting_max`) starts from the task's best score since its own experience instead of its score "
             "right after it. The last task cannot be forgotten yet (–); BWT (stream summary) is minus the mean "
             "`forgetting`.", "",
             f"| Task | {FORGETTING_TITLE} | {FORGETTING_MAX_TITLE} |", "|---|---|---|"]
    for task in results["tasks"]:
        name = task["name"]
        lines.append(f"| {name} | {format_value(forgetting.get(name), 3)} | "
                     f"{format_value(forgetting_max.get(name), 3)} |")
    lines.append(f"| mean | {format_value(_mean(forgetting.values()), 3)} | "
                 f"{format_value(_mean(forgetting_max.values()), 3)} |")
    return lines


def _cost_section(results: Mapping[str, Any]) -> list[str]:
    lines = ["## Cost", ""]
    if results.get("params") is not None:
        lines += [f"Parameters: {results['params']:,}", ""]
    seconds = results.get("train_seconds") or {}
    if seconds:
        lines += ["| Stage | Train seconds |", "|---|---|"]
        lines += [f"| {stage} | {format_value(s, 1)} |" for stage, s in seconds.items()]
        lines.append(f"| total | {format_value(sum(s for s in seconds.values() if s is not None), 1)} |")
    return lines


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> None:
    """Write ``results.json``, ``summary.md`` and ``plots/{accuracy_matrix,task_curves}.png`` under ``out_dir``.

    Non-finite numbers (NaN, inf) are written as null so results.json stays strict JSON.
    """
    out_dir = Path(out_dir)
    results = _finite_or_none(results)
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "summary.md", summary_markdown(results))
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    plot_accuracy_matrix(results, out_dir / "plots" / "accuracy_matrix.png")
    plot_task_curves(results, out_dir / "plots" / "task_curves.png")


def plot_accuracy_matrix(results: Mapping[str, Any], path: str | Path) -> None:
    """Save :func:`accuracy_matrix_figure` as a PNG."""
    accuracy_matrix_figure(results).savefig(path, dpi=110)


def accuracy_matrix_figure(results: Mapping[str, Any]) -> Figure:
    """Heat map of R[i][j]; null cells light grey.

    Up to ``SMALL_STREAM`` tasks: values written in the cells, colours scaled per column (metrics differ in range).
    Longer streams: cell texts would be unreadable, so no numbers (summary.md has them) but a colour bar; colours
    are the raw scores when every task has the same metric, else each column is scaled by its maximum. The figure
    grows with T up to ``MAX_PLOT_WIDTH`` inches wide.
    """
    tasks = results["tasks"]
    values = _matrix_array(results)
    rows, columns = values.shape
    column_max = np.max(np.where(np.isnan(values), -np.inf, values), axis=0)
    scaled = values / np.where(column_max > 0, column_max, 1.0)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    row_labels = [f"after {tasks[i]['name']}" for i in range(rows)]

    if columns <= SMALL_STREAM:
        fig = Figure(figsize=(1.6 * columns + 2.2, 1.1 * rows + 1.5), layout="constrained")
        ax = fig.add_subplot()
        ax.imshow(np.ma.masked_invalid(scaled), cmap=cmap, vmin=0.0, vmax=1.0)
        for i in range(rows):
            for j in range(columns):
                if np.isnan(values[i, j]):
                    ax.text(j, i, NONE_MARK, ha="center", va="center", color="black")
                else:
                    ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center",
                            color="white" if scaled[i, j] < 0.6 else "black")
        ax.set_xticks(range(columns), [f"{t['name']}\n({t['metric']})" for t in tasks])
        ax.set_yticks(range(rows), row_labels)
        ax.set_title("Accuracy matrix R[i][j]" + ("\n" if columns <= 2 else " ") + "(colour scaled per column)",
                     fontsize=10)
    else:
        metrics = {t["metric"] for t in tasks}
        if len(metrics) == 1:
            shown, label = values, next(iter(metrics))
            low = min(0.0, float(np.nanmin(values))) if not np.all(np.isnan(values)) else 0.0
            high = float(np.nanmax(values)) if not np.all(np.isnan(values)) else 1.0
            vmin, vmax, scale_text = low, high if high > low else low + 1.0, ""
        else:
            shown, label, vmin, vmax = scaled, "score / column max", 0.0, 1.0
            scale_text = ", colour scaled per column"
        longest = max(len(name) for name in [t["name"] for t in tasks] + row_labels)
        margin = 1.0 + 0.07 * longest  # room for the tick labels, which grow with the task names
        cell = max(0.3, min(0.55, (MAX_PLOT_WIDTH - margin - 1.3) / columns))
        fig = Figure(figsize=(min(MAX_PLOT_WIDTH, cell * columns + margin + 1.3),
                              min(0.85 * MAX_PLOT_WIDTH, cell * rows + margin + 0.6)), layout="constrained")
        ax = fig.add_subplot()
        image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=vmin, vmax=vmax)
        colour_bar = fig.colorbar(image, ax=ax, shrink=0.8, pad=0.02)
        colour_bar.set_label(label)
        ticks = 8 if columns <= 12 else 7
        ax.set_xticks(range(columns), [t["name"] for t in tasks], rotation=45, ha="right",
                      rotation_mode="anchor", fontsize=ticks)
        ax.set_yticks(range(rows), row_labels, fontsize=ticks)
        missing = "; grey = not evaluated" if np.isnan(values).any() else ""
        ax.set_title(f"Accuracy matrix R[i][j], {columns} tasks{scale_text}{missing}", fontsize=10)
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("trained up to experience i")
    return fig


def plot_task_curves(results: Mapping[str, Any], path: str | Path) -> None:
    """Save :func:`task_curves_figure` as a PNG."""
    task_curves_figure(results).savefig(path, dpi=110)


def task_curves_figure(results: Mapping[str, Any]) -> Figure:
    """Each task's metric after each experience, in a panel of its own, with its single-task baseline dashed.

    Small multiples rather than one axes with a line per task, for any T: each task keeps its own metric and y
    range (mIoU, mAP and top-1 live on different scales) and its own baseline, whereas 10-20 overlapping lines,
    plus as many baselines, in a shared axes cannot be told apart by colour; the accuracy-matrix heat map already
    gives the one-glance overview. Up to four tasks sit in one row (x ticks named "after <task>"); longer streams
    use a grid of at most ``CURVE_COLUMNS`` columns with panels titled "#j name (metric)" and x = experience
    index, one legend for the figure, and a size bounded by ``MAX_PLOT_WIDTH``.
    """
    tasks = results["tasks"]
    matrix = results["matrix"]
    baseline = results.get("baseline") or {}
    strategy = results.get("strategy", "sequential")
    count, steps = len(tasks), list(range(len(matrix)))
    grid_rows = max(1, math.ceil(count / CURVE_COLUMNS))
    grid_columns = max(1, math.ceil(count / grid_rows))
    named_ticks = count <= 4
    if named_ticks:
        size = (3.6 * grid_columns, 3.2)
    else:
        size = (min(MAX_PLOT_WIDTH, 2.9 * grid_columns), min(14.0, 2.5 * grid_rows + 0.8))
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(grid_rows, grid_columns, squeeze=False).flat
    for j, (task, ax) in enumerate(zip(tasks, axes)):
        points = [(i, row[j]) for i, row in enumerate(matrix) if j < len(row) and row[j] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=4 if not named_ticks else 6, label=strategy)
        if baseline.get(task["name"]) is not None:
            ax.axhline(baseline[task["name"]], linestyle="--", color="grey",
                       label="baseline" if named_ticks else "single-task baseline")
        if j < len(matrix):  # where the task itself is learned
            ax.axvline(j, linestyle=":", color="lightgrey" if named_ticks else "darkgrey",
                       label="_" if named_ticks else "the task's own experience")
        ax.set_xlim(-0.3, count - 0.7)
        if named_ticks:
            ax.set_xticks(steps, [f"after {tasks[i]['name']}" for i in steps])
            ax.set_title(f"{task['name']} ({task['metric']})", fontsize=10)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            ax.tick_params(labelsize=7)
            ax.set_title(f"#{j} {task['name']} ({task['metric']})", fontsize=9)
    for ax in list(axes):  # the grid's unused panels
        ax.set_visible(False)
    if not named_ticks:
        fig.supxlabel("after training experience # (panel titles give each task's #)", fontsize=9)
        handles: dict[str, Any] = {}
        for ax in fig.axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        if handles:
            fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncols=len(handles),
                       fontsize=8, frameon=False)
    return fig


def plot_against_published(panels: Sequence[tuple[str, Sequence[str], Sequence[float], Any,
                                                   Sequence[float | None]]],
                           path: str | Path, ours: str = "ours", published: str = "paper") -> None:
    """One bar panel per ``(title, labels, means, errors, published means)``: our means with their error bars
    (``errors`` as ``ax.bar``'s ``yerr`` takes them), the published means as black ticks (None: not published)."""
    figure = Figure(figsize=(4 * len(panels), 4), layout="constrained")
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, labels, means, errors, papers) in zip(axes, panels):
        ax.bar(range(len(labels)), means, yerr=errors, capsize=3, color="tab:blue", label=ours)
        marks = [(i, value) for i, value in enumerate(papers) if value is not None]
        if marks:
            ax.scatter(*zip(*marks), marker="_", s=400, color="black", label=published)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_title(title)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("average accuracy")
    axes[0].legend(loc="lower left")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def prediction_overlays(images: Any, predictions: Sequence[Any], kind: str, classes: Sequence[str],
                        path: str | Path, targets: Sequence[Any] | None = None, min_score: float = 0.3) -> None:
    """Draw a few images with their predictions (and ground truth below, if given) to see what the model does.

    ``images``: tensor [B,3,H,W] or a sequence of [3,H,W] in [0, 1]; ``predictions``/``targets``: one per image in
    the shared formats (seg label map, det dict, cls int). Detections below ``min_score`` are not drawn.
    """
    images = list(images)
    rows = 2 if targets is not None and kind != CLASSIFICATION else 1
    fig = Figure(figsize=(3.0 * len(images), 3.2 * rows + 0.3), layout="constrained")
    axes = fig.subplots(rows, len(images), squeeze=False)
    colours = _class_colours(len(classes))
    for col, (image, prediction) in enumerate(zip(images, predictions)):
        picture = image.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy()
        truth = None if targets is None else targets[col]
        top = axes[0][col]
        top.imshow(picture)
        if kind == SEGMENTATION:
            _draw_mask(top, prediction, colours, classes)
            top.set_title("prediction", fontsize=9)
        elif kind == DETECTION:
            kept = _draw_boxes(top, prediction, colours, classes, min_score)
            top.set_title(f"prediction ({kept} with score ≥ {min_score:g})", fontsize=9)
        elif kind == CLASSIFICATION:
            label = int(prediction)
            title = f"pred: {classes[label]}"
            if truth is not None:
                title += f"\ntrue: {classes[int(truth)]}"
            top.set_title(title, fontsize=9, color="black" if truth is None else
                          ("green" if int(truth) == label else "red"))
        else:
            raise ValueError(f"unknown task kind {kind!r}")
        if rows == 2:
            bottom = axes[1][col]
            bottom.imshow(picture)
            if kind == SEGMENTATION:
                _draw_mask(bottom, truth, colours, classes)
            else:
                _draw_boxes(bottom, truth, colours, classes, min_score)
            bottom.set_title("ground truth", fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _draw_mask(ax: Any, label_map: Any, colours: Any, classes: Sequence[str]) -> None:
    """Blend each non-background class in its colour; 255 (ignore) in white; legend of the classes present."""
    labels = label_map.detach().cpu().numpy() if hasattr(label_map, "detach") else np.asarray(label_map)
    overlay = np.zeros((*labels.shape, 4))
    present = []
    for c in np.unique(labels):
        if c == 0:  # background (classes[0] by convention) stays see-through
            continue
        if c == 255:
            overlay[labels == c] = (1.0, 1.0, 1.0, 0.6)
        else:
            overlay[labels == c] = (*colours[c][:3], 0.55)
            present.append(int(c))
    ax.imshow(overlay)
    if present:
        ax.legend(handles=[Patch(color=colours[c], label=classes[c]) for c in present], fontsize=7, loc="lower right")


def _draw_boxes(ax: Any, detections: Mapping[str, Any], colours: Any, classes: Sequence[str],
                min_score: float) -> int:
    """Draw boxes with class name and score (ground truth has none: all drawn); returns how many were drawn."""
    boxes = detections["boxes"].detach().cpu().tolist()
    labels = detections["labels"].detach().cpu().tolist()
    scores = detections["scores"].detach().cpu().tolist() if "scores" in detections else [None] * len(boxes)
    drawn = 0
    for (x1, y1, x2, y2), label, score in zip(boxes, labels, scores):
        if score is not None and score < min_score:
            continue
        colour = colours[label]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5))
        text = classes[label] if score is None else f"{classes[label]} {score:.2f}"
        ax.text(x1, y1, text, fontsize=7, color="white", va="bottom",
                bbox={"facecolor": colour, "edgecolor": "none", "pad": 1, "alpha": 0.8})
        drawn += 1
    return drawn


def _class_colours(count: int) -> list[tuple[float, float, float, float]]:
    palette = matplotlib.colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(count)]


def _drop_table(rows: Sequence[tuple[str, str, Any, Any, Any]]) -> list[str]:
    lines = ["| Task | Metric | Baseline | Final | Drop (relative) | Drop (absolute) |", "|---|---|---|---|---|---|"]
    for name, metric, base, fin, relative in rows:
        absolute = absolute_drop(base, fin)
        relative_text = NONE_MARK if relative is None else f"{100 * relative:.2f}%"
        lines.append(f"| {name} | {metric} | {format_value(base, 4)} | {format_value(fin, 4)} | {relative_text} "
                     f"| {format_value(absolute, 4)} |")
    return lines


def _matrix_array(results: Mapping[str, Any]) -> np.ndarray:
    """R as floats, null as NaN, shape (experiences, tasks); short rows (a task not evaluated) padded with NaN."""
    columns = len(results["tasks"])
    rows = [[np.nan if v is None else v for v in row][:columns] for row in results["matrix"]]
    return np.array([row + [np.nan] * (columns - len(row)) for row in rows], dtype=float).reshape(len(rows), columns)


def _cell(matrix: Sequence[Sequence[Any]], i: int, j: int) -> float | None:
    """R[i][j], or None where that row or entry does not exist."""
    return matrix[i][j] if 0 <= i < len(matrix) and 0 <= j < len(matrix[i]) else None


def _mean(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def format_value(value: float | None, digits: int) -> str:
    """A number as the tables show it, with ``digits`` decimals; a missing one as ``NONE_MARK``."""
    return NONE_MARK if value is None else f"{value:.{digits}f}"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value
