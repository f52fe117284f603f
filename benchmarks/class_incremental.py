"""Class-incremental methods of one task kind over seeds: old, new and all classes after the last step, and the score
of every step.

    python benchmarks/class_incremental.py --kind cls --out runs/ci_cls     # Split digits, 5 x 2 classes
    python benchmarks/class_incremental.py --kind seg --out runs/ci_seg     # shapes segmentation, 2 + 1 + 1, overlapped
    python benchmarks/class_incremental.py --kind det --out runs/ci_det     # shapes detection, 3 + 1 classes
    python benchmarks/class_incremental.py --setting shapes-seg-1-1-1-1 --strategies mib,plop   # the longest stream
    python benchmarks/class_incremental.py --setting voc-15-1 --root VOCdevkit/VOC2012 --out runs/voc_15_1
    python benchmarks/class_incremental.py --kind cls --strategies naive,replay,derpp --seeds 0,1,2 --engine ray

Each setting's stream is split as its literature splits a dataset, many classes first, then fewer (VOC 15-1, 19-1;
shapes segmentation's four classes one per step is its longest stream, as VOC 10-1 is VOC's):
the class scenario, one head per kind that grows with the stream, scored per task inside it. ``old`` is the first
task's score after the last step (its classes are the base classes), ``new`` the mean of the later tasks', ``all``
the mean over every task (the average accuracy), each in the metric the kind's literature reports (top-1, mIoU of the
foreground classes, mAP50), and the table gives the mean and 95 % interval over seeds. The digits setting reads
scikit-learn's digits as class folders (written under ``--out`` when ``--root`` is not given), the shapes settings
the shapes data, the VOC ones Pascal VOC at ``--root`` (``SETTINGS``).

``--out`` receives ``table.md`` (with the command and the wall time), ``table.csv`` with the columns
``kind,setting,strategy,seeds,old,new,all`` (means over seeds), ``plots/steps.png`` (``all`` after each step) and
every run's report under ``seed<N>/<strategy>/``; finished runs are reused, so an interrupted benchmark resumes.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from clmtl.studies.engines import Engine, add_engine_arguments

SEG_METHODS = ("naive", "joint", "ewc", "lwf", "replay", "derpp", "mib", "plop")
DET_METHODS = ("naive", "joint", "ewc", "lwf", "replay", "derpp", "det_distill", "pseudo_labels")
"""What a segmentation and a detection setting run by default: the generic strategies, then the kind's own."""
SETTINGS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "split-digits-5x2": ("cls", (
        "scenario=class", "split={kind: classification, data: {format: folder, root: ROOT}, experiences: 5}",
        "data.image_size=64", "train.optimizer=sgd", "train.lr=0.01", "train.clip_grad_norm=1.0", "train.epochs=10",
        "train.warmup=0"), ("naive", "joint", "ewc", "lwf", "replay", "der", "derpp", "er_ace", "icarl")),
    **{f"shapes-seg-{name}": ("seg", (
        "scenario=class", f"split={{kind: segmentation, data: {{format: shapes}}, experiences: {steps}, "
        "setting: overlapped}", "data.image_size=64"), SEG_METHODS)
       for name, steps in (("2-1-1", [2, 1, 1]), ("1-1-1-1", [1, 1, 1, 1]))},
    "shapes-det-3-1": ("det", (
        "scenario=class", "split={kind: detection, data: {format: shapes}, experiences: [3, 1]}", "data.image_size=64"),
        DET_METHODS),
    **{f"voc-{name}": ("seg", (
        "scenario=class", f"split={{kind: segmentation, data: {{format: voc, root: ROOT}}, experiences: {steps}, "
        "setting: overlapped}", "data.image_size=512"), SEG_METHODS)
       for name, steps in (("15-5", [15, 5]), ("15-1", [15, 1, 1, 1, 1, 1]), ("10-1", [10] + [1] * 10))},
    **{f"voc-det-{name}": ("det", (
        "scenario=class", "split={kind: detection, data: {format: coco, train_images: ROOT/train, "
        "train_ann: ROOT/annotations/instances_train.json, val_images: ROOT/val, "
        f"val_ann: ROOT/annotations/instances_val.json}}, experiences: {steps}}}", "data.image_size=512"),
        DET_METHODS)
       for name, steps in (("19-1", [19, 1]), ("10-10", [10, 10]), ("15-5", [15, 5]))},
}
"""Per setting: its task kind, the config overrides that make its stream and recipe (``ROOT``: ``--root``), and the
strategies run by default. The shapes and digits settings run without data; the VOC ones read Pascal VOC at
``--root``: segmentation in its own layout (the literature's 15-5, 15-1 and 10-1, overlapped), detection as COCO
files (``ROOT/{train,val}/`` images, ``ROOT/annotations/instances_{train,val}.json``: 19-1, 10-10, 15-5)."""
TABLE_METRIC = {"cls": "top1", "seg": "mIoU_fg", "det": "mAP50"}
"""The metric of each kind's table, the one its literature reports: segmentation's old and new classes are scored
without background (``mIoU_fg``); the per-step plot shows the primary metric."""
DEFAULT_SETTING = {"cls": "split-digits-5x2", "seg": "shapes-seg-2-1-1", "det": "shapes-det-3-1"}
"""The setting ``--kind`` runs when no ``--setting`` is given."""


def final_scores(run: dict, kind: str) -> list[float]:
    """Each task's score after the last step in the table's metric (``TABLE_METRIC``): detection's mAP50 and
    segmentation's mIoU over foreground classes are secondary metrics of results.json, top-1 its matrix's last row."""
    metric = TABLE_METRIC[kind]
    if metric != "top1":
        return [float(run["extra"]["final"][task["name"]][metric]) for task in run["tasks"]]
    return [float(value) for value in run["matrix"][-1]]


def old_new_all(final: Sequence[float]) -> tuple[float, float, float]:
    """The first task's score, the mean of the later tasks' scores, the mean of all."""
    return final[0], statistics.fmean(final[1:]), statistics.fmean(final)


def all_per_step(matrix: Sequence[Sequence[float | None]]) -> list[float]:
    """After each step i: the mean score of the tasks trained so far, 0..i."""
    return [statistics.fmean(float(value) for value in row[: step + 1]) for step, row in enumerate(matrix)]


def summary_rows(kind: str, setting: str, strategies: Sequence[str], results: Sequence[dict]) -> list[dict]:
    """One row per strategy: its seeds, and old / new / all as ``Stat``s over them."""
    from clmtl.studies.compare import Stat

    rows = []
    for strategy in strategies:
        runs = [run for run in results if run["strategy"] == strategy]
        scores = [old_new_all(final_scores(run, kind)) for run in runs]
        rows.append({"kind": kind, "setting": setting, "strategy": strategy, "seeds": len(runs),
                     **{name: Stat.of([score[i] for score in scores]) for i, name in enumerate(("old", "new", "all"))}})
    return rows


def table_csv(rows: Sequence[dict]) -> str:
    lines = ["kind,setting,strategy,seeds,old,new,all"]
    for row in rows:
        means = ["" if row[name].mean is None else f"{row[name].mean:.4f}" for name in ("old", "new", "all")]
        lines.append(",".join([row["kind"], row["setting"], row["strategy"], str(row["seeds"]), *means]))
    return "\n".join(lines) + "\n"


def table_markdown(rows: Sequence[dict], metric: str, command: str, minutes: float) -> str:
    lines = [f"# Class-incremental {rows[0]['kind']}: {rows[0]['setting']}", "",
             f"`{command}` ({minutes:.1f} min wall time). {metric} after the last step, mean [95 % interval] over "
             "seeds: old = the first task's classes, new = the later tasks', all = every task.", "",
             "| strategy | seeds | old | new | all |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [_interval(row[name]) for name in ("old", "new", "all")]
        lines.append(f"| {row['strategy']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _interval(stat) -> str:
    if stat.mean is None:
        return "–"
    if stat.half_width is None:
        return f"{stat.mean:.3f}"
    return f"{stat.mean:.3f} [{stat.mean - stat.half_width:.3f}, {stat.mean + stat.half_width:.3f}]"


def plot_steps(strategies: Sequence[str], results: Sequence[dict], metric: str, path: Path) -> None:
    """``all`` after each step, mean over seeds, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for strategy in strategies:
        curves = [all_per_step(run["matrix"]) for run in results if run["strategy"] == strategy]
        if curves:
            axis.plot(range(1, len(curves[0]) + 1), [statistics.fmean(step) for step in zip(*curves)], marker="o",
                      label=strategy)
    axis.set(xlabel="step (experiences trained)", ylabel=f"{metric}, tasks so far", ylim=(0, 1))
    axis.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=tuple(DEFAULT_SETTING), help="run this kind's default setting")
    parser.add_argument("--setting", choices=tuple(SETTINGS), help="the stream, split as the literature splits its "
                                                                   "datasets (see SETTINGS)")
    parser.add_argument("--strategies", help="comma-separated strategy specs (default: the kind's, see SETTINGS)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--root", type=Path, help="the data: class folders ROOT/{train,val}/<class>/ for digits "
                                                  "(default: scikit-learn's digits, written under --out); Pascal VOC "
                                                  "for the voc settings")
    parser.add_argument("--out", type=Path, help="output folder (default runs/class_incremental_<kind>)")
    add_engine_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    args = parser.parse_args(argv)

    from clmtl.data.digits import write_digit_folders
    from clmtl.io import atomic_write_text
    from clmtl.stream.tasks import PRIMARY_METRIC, kind_name
    from clmtl.studies.grid import run_grid
    from clmtl.training.registry import parse_strategy

    if (args.kind is None) == (args.setting is None):
        parser.error("give --kind (its default setting) or --setting")
    setting = args.setting or DEFAULT_SETTING[args.kind]
    kind, stream, defaults = SETTINGS[setting]
    strategies = [s.strip() for s in args.strategies.split(",")] if args.strategies else list(defaults)
    for spec in strategies:
        parse_strategy(spec)  # unknown names fail before anything trains
    seeds = [int(seed) for seed in args.seeds.split(",")]
    out = args.out or Path("runs") / f"class_incremental_{setting}"
    root = args.root
    if setting == "split-digits-5x2" and root is None:
        root = out / "data" / "digits"
        if not root.exists():
            write_digit_folders(root)
    if any("ROOT" in item for item in stream) and root is None:
        parser.error(f"setting {setting} reads its data at --root")
    overrides = [item.replace("ROOT", str(root)) for item in stream]
    started = time.perf_counter()
    results = run_grid(None, [*overrides, *args.overrides], strategies, seeds, out, Engine.from_arguments(args))
    rows = summary_rows(kind, setting, strategies, results)
    command = "python benchmarks/class_incremental.py " + shlex.join(argv)
    atomic_write_text(out / "table.csv", table_csv(rows))
    markdown = table_markdown(rows, TABLE_METRIC[kind], command, (time.perf_counter() - started) / 60)
    atomic_write_text(out / "table.md", markdown)
    plot_steps(strategies, results, PRIMARY_METRIC[kind_name(kind)], out / "plots" / "steps.png")
    print(markdown)
    print(f"wrote {out}/table.md, table.csv, plots/steps.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
