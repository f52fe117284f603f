"""Report (tables, files, plots, overlays), the metrics CSV logger, and the crash-safe io helpers it writes with."""
from __future__ import annotations

import copy
import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from clmtl.io import CheckpointError, atomic_torch_save, atomic_write_json, atomic_write_text, load_checkpoint
from clmtl.metrics.forgetting import bwt, forgetting, forgetting_max
from clmtl.report.summary import (MAX_PLOT_WIDTH, accuracy_matrix_figure, prediction_overlays, summary_markdown,
                                  task_curves_figure, write_report)

TASKS = [{"name": "seg", "kind": "segmentation", "metric": "mIoU"},
         {"name": "det", "kind": "detection", "metric": "mAP50_95", "extra": ["mAP50"]},
         {"name": "cls", "kind": "classification", "metric": "top1"}]


def make_results() -> dict:
    """A hand-made run: seg 0.5 -> 0.4 (baseline 0.5), det 0.3 -> 0.24 (baseline 0.32), cls 0.8 (baseline 0.75)."""
    return {
        "clmtl_version": "0.0.test", "config": {"seed": 3}, "seed": 3, "benchmark": "shapes", "strategy": "ewc",
        "tasks": copy.deepcopy(TASKS),
        "matrix": [[0.5, None, None], [0.45, 0.3, None], [0.4, 0.24, 0.8]],
        "baseline": {"seg": 0.5, "det": 0.32, "cls": 0.75},
        "final": {"seg": 0.4, "det": 0.24, "cls": 0.8},
        "extra": {"baseline": {"det": {"mAP50": 0.6}}, "final": {"det": {"mAP50": 0.45}}},
        "forgetting": {"seg": 0.1, "det": 0.06, "cls": None},
        "forgetting_max": {"seg": 0.12, "det": 0.06, "cls": None},
        "bwt": -0.08,
        "drop_vs_baseline": {"seg": 0.2, "det": 0.25, "cls": -0.0666667},
        "params": 1012345, "train_seconds": {"seg": 12.25, "det": 40.0, "cls": 8.0}, "versions": {"torch": "x"},
    }


# ---------------------------------------------------------------------------------------------------- summary

def test_summary_final_vs_baseline_rows():
    text = summary_markdown(make_results())
    assert "| Task | Metric | Baseline | Final | Drop (relative) | Drop (absolute) |" in text
    assert "| seg | mIoU | 0.5000 | 0.4000 | 20.00% | 0.1000 |" in text  # (0.5 - 0.4) / 0.5
    assert "| det | mAP50_95 | 0.3200 | 0.2400 | 25.00% | 0.0800 |" in text
    assert "| cls | top1 | 0.7500 | 0.8000 | -6.67% | -0.0500 |" in text  # better than baseline: negative drop
    assert "| det | mAP50 | 0.6000 | 0.4500 | 25.00% | 0.1500 |" in text  # secondary metric, drop computed here


def test_summary_matrix_with_missing_entries():
    text = summary_markdown(make_results())
    assert "| | seg (mIoU) | det (mAP50_95) | cls (top1) |" in text
    assert "| after seg | 0.500 | – | – |" in text
    assert "| after det | 0.450 | 0.300 | – |" in text
    assert "| after cls | 0.400 | 0.240 | 0.800 |" in text
    assert "Metrics:" not in text  # three tasks: the metrics are in the column headers


def test_summary_forgetting_both_definitions_bwt_and_cost():
    text = summary_markdown(make_results())
    assert ("| Task | forgetting (Avalanche: R[j][j] − R[T−1][j]) | "
            "forgetting_max (Mammoth: max_i R[i][j] − R[T−1][j]) |") in text
    assert "headline forgetting is the Avalanche definition" in text
    assert "| seg | 0.100 | 0.120 |" in text
    assert "| cls | – | – |" in text  # the last task cannot be forgotten yet
    assert "| mean | 0.080 | 0.090 |" in text
    assert "| BWT | -0.080 | mean over j < T−1 of R[T−1][j] − R[j][j]" in text
    assert "Parameters: 1,012,345" in text
    assert "| det | 40.0 |" in text and "| total | 60.2 |" in text


def test_summary_without_baselines():
    results = make_results()
    results["baseline"], results["drop_vs_baseline"] = {}, {}
    results["extra"]["baseline"] = {}
    text = summary_markdown(results)
    assert "| seg | mIoU | – | 0.4000 | – | – |" in text
    assert "| det | mAP50 | – | 0.4500 | – | – |" in text
    assert "--no-baselines" in text


# ------------------------------------------------------------------------------------------------ write_report

def test_write_report_files_and_json_round_trip(tmp_path):
    results = make_results()
    write_report(results, tmp_path / "out")
    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "summary.md").read_text() == summary_markdown(results)
    for name, min_size in [("accuracy_matrix.png", (300, 300)), ("task_curves.png", (300, 900))]:
        pixels = imread(out / "plots" / name)
        assert pixels.shape[0] >= min_size[0] and pixels.shape[1] >= min_size[1]
        assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_write_report_turns_nan_into_null(tmp_path):
    results = make_results()
    results["final"]["det"] = float("nan")
    results["matrix"][2][1] = float("nan")
    write_report(results, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["final"]["det"] is None and written["matrix"][2][1] is None
    assert math.isnan(results["final"]["det"])  # the caller's dict is left alone


def test_accuracy_matrix_marks_missing_cells_grey(tmp_path):
    """The (seg row, cls column) cell is None: its centre is light grey, while a present cell is not."""
    results = make_results()
    write_report(results, tmp_path)
    pixels = imread(tmp_path / "plots" / "accuracy_matrix.png")[..., :3]
    grey = np.all(np.abs(pixels - 211 / 255) < 0.01, axis=-1)  # matplotlib "lightgrey" = (211, 211, 211)
    assert grey.sum() > 20_000  # three cells of about 140 x 140 pixels
    results["matrix"][0] = [0.5, 0.2, 0.2]
    results["matrix"][1][2] = 0.2
    write_report(results, tmp_path)
    pixels = imread(tmp_path / "plots" / "accuracy_matrix.png")[..., :3]
    assert np.all(np.abs(pixels - 211 / 255) < 0.01, axis=-1).sum() < 500  # anti-aliased text edges only


# ------------------------------------------------------------------------------------------- streams of any length

KIND_METRIC = {"segmentation": "mIoU", "detection": "mAP50_95", "classification": "top1"}


def stream_results(tasks: list[tuple[str, str]], matrix: list, scenario: str = "task", **fields) -> dict:
    """A results dict of the current format for the stream ``tasks`` = [(name, kind)], matrix ``R``."""
    names = [name for name, _ in tasks]
    return {
        "clmtl_version": "0.0.test", "seed": 0, "benchmark": "toy", "strategy": "naive", "scenario": scenario,
        "tasks": [{"name": name, "kind": kind, "metric": KIND_METRIC[kind]} for name, kind in tasks],
        "matrix": matrix, "baseline": {}, "final": dict(zip(names, matrix[-1])), "drop_vs_baseline": {},
        "forgetting": dict(zip(names, forgetting(matrix))), "forgetting_max": dict(zip(names, forgetting_max(matrix))),
        "bwt": bwt(matrix), **fields,
    }


def class_stream(count: int) -> dict:
    """``count`` classification tasks, class scenario: untrained tasks score 0, a task scores 0.9 when learned."""
    matrix = [[0.9 - 0.02 * (i - j) if j <= i else 0.0 for j in range(count)] for i in range(count)]
    return stream_results([(f"cls_{j}", "classification") for j in range(count)], matrix, scenario="class",
                          random_init={f"cls_{j}": 0.1 for j in range(count)})


MIXED_MATRIX = [[0.60, 0.10, 0.05, 0.20],
                [0.50, 0.80, 0.06, 0.30],
                [0.40, 0.70, 0.50, 0.25],
                [0.30, 0.60, 0.45, 0.85]]
MIXED_RANDOM_INIT = {"seg": 0.02, "cls_a": 0.10, "det": 0.00, "cls_b": 0.20}


def mixed_results() -> dict:
    """seg → cls_a → det → cls_b, with the stream measures worked out by hand:

    average accuracy = (0.30 + 0.60 + 0.45 + 0.85) / 4 = 0.55
    BWT = ((0.30 − 0.60) + (0.60 − 0.80) + (0.45 − 0.50)) / 3 = −0.55 / 3 = −0.18333
    FWT = ((0.10 − 0.10) + (0.06 − 0.00) + (0.25 − 0.20)) / 3 = 0.11 / 3 = 0.03667
    """
    tasks = [("seg", "segmentation"), ("cls_a", "classification"), ("det", "detection"), ("cls_b", "classification")]
    return stream_results(tasks, copy.deepcopy(MIXED_MATRIX), average_accuracy=0.55, fwt=0.11 / 3,
                          random_init=dict(MIXED_RANDOM_INIT))


def test_summary_of_a_mixed_stream_with_repeated_kinds():
    results = mixed_results()
    assert results["bwt"] == pytest.approx(-0.55 / 3)  # the hand value above is the metrics module's too
    text = summary_markdown(results)
    assert "Scenario: task-incremental (`task`). Stream order (4 tasks): seg → cls_a → det → cls_b." in text
    assert "| Average accuracy | 0.550 | mean over all tasks j of R[T−1][j]" in text
    assert "| BWT | -0.183 | mean over j < T−1 of R[T−1][j] − R[j][j]" in text
    assert "| FWT | 0.037 | mean over j ≥ 1 of R[j−1][j] − b[j] (GEM" in text
    # each FWT term, R[j−1][j] − b[j], computed by the report from the matrix and random_init
    assert "| Task | Metric | b[j] (random init) | R[j−1][j] | R[j−1][j] − b[j] |" in text
    assert "| seg | mIoU | 0.020 | – | – |" in text  # no experience before the first task
    assert "| cls_a | top1 | 0.100 | 0.100 | 0.000 |" in text
    assert "| det | mAP50_95 | 0.000 | 0.060 | 0.060 |" in text
    assert "| cls_b | top1 | 0.200 | 0.250 | 0.050 |" in text
    # the matrix: every task in a column, every experience in a row, in stream order
    assert "| | seg (mIoU) | cls_a (top1) | det (mAP50_95) | cls_b (top1) |\n|---|---|---|---|---|" in text
    rows = ["| after seg | 0.600 | 0.100 | 0.050 | 0.200 |", "| after cls_a | 0.500 | 0.800 | 0.060 | 0.300 |",
            "| after det | 0.400 | 0.700 | 0.500 | 0.250 |", "| after cls_b | 0.300 | 0.600 | 0.450 | 0.850 |"]
    assert "\n".join(rows) in text
    assert "| cls_a | 0.200 | 0.200 |" in text and "| cls_b | – | – |" in text and "| mean | 0.183 | 0.183 |" in text
    assert text.index("## Stream summary") < text.index("## Final vs single-task baseline")


def test_single_task_stream(tmp_path):
    results = stream_results([("seg", "segmentation")], [[0.5]], scenario="domain", average_accuracy=0.5,
                             fwt=None, random_init={"seg": 0.01})
    assert results["bwt"] is None and results["forgetting"] == {"seg": None}
    text = summary_markdown(results)
    assert "Scenario: domain-incremental (`domain`). Stream order (1 task): seg." in text
    assert "| Average accuracy | 0.500 |" in text
    assert "| BWT | – |" in text and "| FWT | – |" in text  # no earlier task to transfer to or from
    assert "| seg | mIoU | 0.010 | – | – |" in text
    assert "| | seg (mIoU) |\n|---|---|\n| after seg | 0.500 |" in text
    assert "| seg | – | – |" in text and "| mean | – | – |" in text
    write_report(results, tmp_path)
    for name in ("accuracy_matrix.png", "task_curves.png"):
        assert imread(tmp_path / "plots" / name)[..., :3].std() > 0.05
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_old_results_without_the_stream_fields_still_render(tmp_path):
    """A results.json from before scenario / average_accuracy / fwt / random_init (make_results has none)."""
    results = make_results()
    assert not {"scenario", "average_accuracy", "fwt", "random_init"} & set(results)
    text = summary_markdown(results)
    assert "Scenario: not recorded. Stream order (3 tasks): seg → det → cls." in text
    assert "| Average accuracy | – |" in text and "| FWT | – |" in text and "| BWT | -0.080 |" in text
    assert "b[j] (random init)" not in text  # no random-init table without random_init
    write_report(results, tmp_path)
    assert (tmp_path / "summary.md").read_text() == text


def test_ten_task_class_stream_summary_names_tasks_and_metrics_once():
    text = summary_markdown(class_stream(10))
    assert "Scenario: class-incremental (`class`)." in text
    assert "| | " + " | ".join(f"cls_{j}" for j in range(10)) + " |" in text  # no metric in every header
    assert "| after cls_9 | " + " | ".join(f"{0.9 - 0.02 * (9 - j):.3f}" for j in range(10)) + " |" in text
    assert "| after cls_0 | 0.900 | " + " | ".join(["0.000"] * 9) + " |" in text
    assert "Metric of every task: top1." in text
    mixed = class_stream(7)
    mixed["tasks"][3] = {"name": "cls_3", "kind": "detection", "metric": "mAP50_95"}
    assert "Metrics: cls_0 top1, cls_1 top1, cls_2 top1, cls_3 mAP50_95, cls_4 top1" in summary_markdown(mixed)


def test_accuracy_matrix_of_ten_tasks_is_a_bounded_heat_map_with_a_colour_bar(tmp_path):
    results = class_stream(10)
    results["matrix"][9][4] = None  # one task not evaluated after the last experience
    write_report(results, tmp_path)
    assert imread(tmp_path / "plots" / "accuracy_matrix.png").shape[1] <= MAX_PLOT_WIDTH * 110
    fig = accuracy_matrix_figure(results)
    width, height = fig.get_size_inches()
    assert 6 < width <= MAX_PLOT_WIDTH and height <= MAX_PLOT_WIDTH
    ax, bar = fig.axes  # the matrix and its colour bar
    assert bar.get_ylabel() == "top1"  # one metric for every task: colours are the scores themselves
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"cls_{j}" for j in range(10)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"after cls_{i}" for i in range(10)]
    assert len(ax.texts) == 0  # no numbers in 100 small cells
    image = ax.images[0]
    assert image.get_array().mask[9, 4] and not image.get_array().mask[9, 3]
    assert np.allclose(image.cmap.get_bad(), (211 / 255, 211 / 255, 211 / 255, 1.0))  # null cells light grey
    assert image.get_clim() == (0.0, pytest.approx(0.9))


def test_accuracy_matrix_size_stays_bounded_and_mixed_metrics_are_scaled_per_column():
    results = class_stream(40)  # beyond the 20 tasks planned for: cells shrink, the figure does not grow
    results["tasks"][5] = {"name": "det_x", "kind": "detection", "metric": "mAP50_95"}
    fig = accuracy_matrix_figure(results)
    assert fig.get_size_inches()[0] <= MAX_PLOT_WIDTH and fig.get_size_inches()[1] <= MAX_PLOT_WIDTH
    ax, bar = fig.axes
    assert bar.get_ylabel() == "score / column max" and ax.images[0].get_clim() == (0.0, 1.0)
    assert ax.get_xticklabels()[5].get_text() == "det_x" and ax.get_xticklabels()[0].get_rotation() == 45


def test_accuracy_matrix_of_three_tasks_keeps_values_in_cells():
    fig = accuracy_matrix_figure(make_results())
    assert len(fig.axes) == 1  # no colour bar: the values are written in
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["0.500", "–", "–", "0.450", "0.300", "–", "0.400", "0.240", "0.800"]


def test_task_curves_of_many_tasks_are_a_bounded_grid_with_baselines():
    results = class_stream(12)
    results["baseline"] = {f"cls_{j}": 0.95 for j in range(12)}
    fig = task_curves_figure(results)
    width, height = fig.get_size_inches()
    assert width <= MAX_PLOT_WIDTH and height <= 14
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 12 and len(fig.axes) == 12  # 3 rows of 4
    assert {ax.get_subplotspec().colspan.start for ax in panels} == {0, 1, 2, 3}
    for j, ax in enumerate(panels):
        assert ax.get_title() == f"#{j} cls_{j} (top1)"
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(dashed) == 1 and dashed[0].get_ydata()[0] == 0.95  # the task's own baseline
        curve = ax.get_lines()[0]
        assert list(curve.get_xdata()) == list(range(12))
    assert len(fig.legends) == 1  # one legend for the figure, not one per panel
    seven = task_curves_figure(class_stream(7))  # 2 rows of 4: the eighth slot stays empty
    assert sum(ax.get_visible() for ax in seven.axes) == 7 and len(seven.axes) == 8
    for count in (20, 40):  # 4 and 8 rows of 5
        width, height = task_curves_figure(class_stream(count)).get_size_inches()
        assert width <= MAX_PLOT_WIDTH and height <= 14


def test_task_curves_of_three_tasks_stay_one_row_named_by_experience():
    fig = task_curves_figure(make_results())
    assert len(fig.axes) == 3 and fig.get_size_inches()[0] == pytest.approx(3 * 3.6)
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["after seg", "after det", "after cls"]
    assert fig.axes[0].get_legend() is not None


# ---------------------------------------------------------------------------------------------------- overlays

def shapes_batch(n: int = 2, size: int = 64):
    images = torch.full((n, 3, size, size), 0.8)
    images[:, :, 8:30, 8:30] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    images[:, :, 36:60, 30:60] = torch.tensor([0.1, 0.2, 0.9])[:, None, None]
    return images


def render(tmp_path, name, *args, **kwargs):
    path = tmp_path / name
    prediction_overlays(*args, path=path, **kwargs)
    assert path.stat().st_size > 2000
    return imread(path)


def test_seg_overlay_draws_mask_and_ground_truth_row(tmp_path):
    images = shapes_batch()
    empty = torch.zeros(2, 64, 64, dtype=torch.long)
    mask = empty.clone()
    mask[:, 8:30, 8:30] = 1
    classes = ["background", "square", "circle"]
    plain = render(tmp_path, "a.png", images, empty, "segmentation", classes)
    drawn = render(tmp_path, "b.png", images, mask, "segmentation", classes)
    with_truth = render(tmp_path, "c.png", images, mask, "segmentation", classes, targets=mask)
    assert plain.shape == drawn.shape and not np.array_equal(plain, drawn)  # background alone draws nothing
    assert with_truth.shape[0] > 1.8 * drawn.shape[0]  # a second row for the ground truth


def test_det_overlay_skips_low_scores(tmp_path):
    images = shapes_batch()
    classes = ["square", "circle"]
    none = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    low = [{"boxes": torch.tensor([[8.0, 8, 30, 30]]), "scores": torch.tensor([0.1]), "labels": torch.tensor([0])}] * 2
    high = [{"boxes": torch.tensor([[8.0, 8, 30, 30]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}] * 2
    # the titles state how many boxes passed, so compare the image area only (below the title band)
    body = slice(40, None)
    a = render(tmp_path, "none.png", images, none, "detection", classes)[body]
    b = render(tmp_path, "low.png", images, low, "detection", classes, min_score=0.3)[body]
    c = render(tmp_path, "high.png", images, high, "detection", classes, min_score=0.3)[body]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    truth = [{"boxes": torch.tensor([[36.0, 30, 60, 60]]), "labels": torch.tensor([1])}] * 2
    assert render(tmp_path, "truth.png", images, high, "detection", classes, targets=truth).shape[0] > 1.8 * c.shape[0]


def test_cls_overlay_colours_title_by_correctness(tmp_path):
    images = shapes_batch()
    classes = ["square", "circle"]
    right = render(tmp_path, "right.png", images, torch.tensor([0, 1]), "classification", classes, targets=[0, 1])
    wrong = render(tmp_path, "wrong.png", images, torch.tensor([1, 0]), "classification", classes, targets=[0, 1])

    def reddish(pixels):
        return int(((pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3))[:40].sum())

    assert reddish(wrong) > 20 and reddish(right) == 0  # only the title band is checked: images are red too


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown task kind"):
        prediction_overlays(shapes_batch(), [0, 0], "depth", ["a"], tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------------- CSV logger

def test_csv_logger_records_every_metric_of_a_real_avalanche_run(tmp_path):
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
    from avalanche.models import SimpleMLP
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from clmtl.report.csv_logger import MetricsCSVLogger

    torch.manual_seed(0)
    data = [(torch.randn(32, 6), torch.randint(0, 2, (32,))) for _ in range(2)]
    bm = tensors_benchmark(train_tensors=data, test_tensors=data, task_labels=[0, 0], complete_test_set_only=False)
    logger = MetricsCSVLogger(tmp_path / "metrics.csv")
    evaluator = EvaluationPlugin(accuracy_metrics(minibatch=True, epoch=True, experience=True, stream=True),
                                 loss_metrics(epoch=True, experience=True), loggers=[logger])
    model = SimpleMLP(num_classes=2, input_size=6, hidden_size=8)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_mb_size=16,
                     train_epochs=1, eval_mb_size=32, evaluator=evaluator)
    for experience in bm.train_stream:
        strategy.train(experience)
        strategy.eval(bm.test_stream)
        # flushed per row: readable before the logger is closed
        assert len((tmp_path / "metrics.csv").read_text().splitlines()) > 1
    logger.close()

    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["metric", "x", "value"]
    written = sorted((name, int(x), float(value)) for name, x, value in rows[1:])
    expected = sorted((name, int(x), float(v)) for name, (xs, values) in evaluator.get_all_metrics().items()
                      for x, v in zip(xs, values))
    assert written == expected
    assert any(name.startswith("Loss_Exp/") for name, _, _ in written)


def test_csv_logger_skips_non_numbers_and_appends(tmp_path):
    from clmtl.report.csv_logger import MetricsCSVLogger

    logger = MetricsCSVLogger(tmp_path / "m.csv")
    logger.log_single_metric("a", torch.tensor(0.5), 1)
    logger.log_single_metric("b", np.float32(2.0), 2)
    logger.log_single_metric("image", torch.zeros(3, 4, 4), 3)
    logger.log_single_metric("text", "hello", 4)
    logger.close()
    logger = MetricsCSVLogger(tmp_path / "m.csv")  # a resumed run appends under the same header
    logger.log_single_metric("c", 7, 5)
    logger.close()
    assert (tmp_path / "m.csv").read_text().splitlines() == ["metric,x,value", "a,1,0.5", "b,2,2.0", "c,5,7"]


# ------------------------------------------------------------------------------------------------------------ io

class ExplodingPickle:
    """Fails halfway through torch.save, after part of the file has been written; counts the attempts."""

    attempts = 0

    def __reduce__(self):
        ExplodingPickle.attempts += 1
        raise RuntimeError("boom")


@pytest.mark.slow
def test_atomic_torch_save_failure_keeps_previous_file(tmp_path, monkeypatch):
    import clmtl.ultralytics_shim  # noqa: F401 - as a run imports it: ultralytics' retrying torch.save stays out

    path = tmp_path / "last.pt"
    atomic_torch_save({"step": 1, "w": torch.ones(2)}, path)
    monkeypatch.setattr(ExplodingPickle, "attempts", 0)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"big": torch.zeros(10_000), "bad": ExplodingPickle()}, path)
    assert ExplodingPickle.attempts == 1  # failed once, not written again into the half-written file
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # the temporary file is gone


def test_atomic_json_and_text(tmp_path):
    path = tmp_path / "sub" / "r.json"
    atomic_write_json(path, {"t": torch.tensor([1.5, 2.0]), "n": np.int64(3)})
    assert json.loads(path.read_text()) == {"t": [1.5, 2.0], "n": 3}
    with pytest.raises(ValueError):
        atomic_write_json(path, {"x": float("nan")})  # strict JSON: refuse rather than write NaN
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})
    assert json.loads(path.read_text())["n"] == 3
    atomic_write_text(tmp_path / "s.md", "héllo\n")
    assert (tmp_path / "s.md").read_text(encoding="utf-8") == "héllo\n"
    assert sorted(os.listdir(tmp_path)) == ["s.md", "sub"] and os.listdir(tmp_path / "sub") == ["r.json"]


def write_marker(path):
    with open(path, "w") as f:
        f.write("code ran")


class CodeRunner:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (write_marker, (self.marker,))


def test_load_checkpoint_refuses_code_in_pickles(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"model": {"w": torch.ones(1)}, "evil": CodeRunner(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: refused to load") as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert "\n" not in str(info.value)
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the file really would have run code
    assert marker.read_text() == "code ran"


def test_load_checkpoint_names_a_truncated_file(tmp_path):
    atomic_torch_save({"w": torch.ones(100)}, tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
