"""Single-task baselines under several training recipes, over seeds: which recipe lets a task learn from scratch.

    python benchmarks/baseline_recipes.py              # cls, seeds 0,1,2, the recipes of RECIPES
    python benchmarks/baseline_recipes.py --tasks seg,cls --recipe "lr 1e-3=train.lr=0.001" --seeds 0,1

A recipe is ``NAME=OVERRIDES``: space-separated KEY=VALUE applied on top of `clmtl run`'s default budget and the
common overrides given after the options. Each (recipe, seed) trains the asked tasks' baselines exactly as
`clmtl run` does and writes OUT/<recipe>/seed<N>.json; an existing file is reused, so an interrupted study resumes.
OUT gets recipes.md (with the command that reproduces it) and recipes.json.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from clmtl.studies.engines import Engine, Job, add_engine_arguments, run_jobs
from clmtl.studies.grid import FP32_NCHW_SEQUENTIAL

FP32_NO_EMA = (*FP32_NCHW_SEQUENTIAL, "train.ema=0")
"""Float32, NCHW, without weight averaging: the base of the rows that vary the rest of the recipe."""
RECIPES = {
    "constant, 30 epochs": (*FP32_NO_EMA, "train.warmup=0", "train.epochs.cls=30"),
    "lr 1e-3, 30 epochs": (*FP32_NO_EMA, "train.warmup=0", "train.lr=0.001", "train.epochs.cls=30"),
    "warmup 3, 30 epochs": (*FP32_NO_EMA, "train.epochs.cls=30"),
    "warmup 3, 50 epochs": (*FP32_NO_EMA, "train.epochs.cls=50"),
    "warmup 3 + cosine, 50 epochs": (*FP32_NO_EMA, "train.schedule=cosine", "train.epochs.cls=50"),
    "warmup 3, 60 epochs": FP32_NO_EMA,
    "warmup 3 + cosine, 60 epochs": (*FP32_NO_EMA, "train.schedule=cosine"),
    "warmup 3, 60 epochs, hue 0.1": (*FP32_NO_EMA, "data.hue.cls=0.1"),
    "warmup 3, 60 epochs, any hue": (*FP32_NO_EMA, "data.hue.cls=0.5"),
    "warmup 3, 60 epochs, EMA 0.999": FP32_NCHW_SEQUENTIAL,
    "warmup 3, 60 epochs, EMA 0.999, bf16 + channels_last (default)": (),
}
"""The recipes of table 1 of docs/studies.md (Training recipe), which gives each row's scores: the learning rate,
warmup, schedule, budget, hue and weight averaging of classification from scratch, one change at a time."""


def parse_recipe(text: str) -> tuple[str, tuple[str, ...]]:
    """``"warmup=train.warmup=3 train.lr=0.001"`` -> ("warmup", ("train.warmup=3", "train.lr=0.001"))."""
    name, separator, overrides = text.partition("=")
    if not separator or not name.strip():
        raise argparse.ArgumentTypeError(f"recipe {text!r}: expected NAME=KEY=VALUE [KEY=VALUE ...]")
    return name.strip(), tuple(shlex.split(overrides))


def recipe_dir(out: Path, name: str) -> Path:
    return out / "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def train_recipe(overrides: Sequence[str], seed: int, threads: int | None, tasks: Sequence[str], path: Path) -> None:
    """The baselines of ``tasks`` for one recipe and seed, stored as JSON."""
    from clmtl.baselines import baselines_alone
    from clmtl.config import load_config
    from clmtl.io import atomic_write_json

    config = load_config(None, [*overrides, f"seed={seed}", *([f"train.threads={threads}"] if threads else [])])
    with open(path.with_suffix(".log"), "w") as log:
        baselines, task_specs = baselines_alone(config, log, only=tasks)
    atomic_write_json(path, {"scores": baselines.scores, "seconds": baselines.seconds, "config": config.to_dict(),
                             "metrics": {t.name: t.metric for t in task_specs}})


def recipes_markdown(rows: list[dict], tasks: Sequence[str]) -> str:
    """One row per recipe: each task's primary metric, mean ± std over seeds, with the per-seed values."""
    from clmtl.studies.compare import Stat

    headers = ["recipe", "overrides", *[f"{t} {rows[0]['metrics'][t]}" for t in tasks], "train s"]
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    for row in rows:
        cells = [row["recipe"], " ".join(f"`{o}`" for o in row["overrides"]) or "–"]
        for task in tasks:
            values = row["values"][task]
            cells.append(f"{Stat.of(values).text()} ({' / '.join(f'{v:.3f}' for v in values)})")
        cells.append(f"{Stat.of(row['seconds']).mean:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="cls", help="comma-separated task names (default cls)")
    parser.add_argument("--recipe", action="append", type=parse_recipe, metavar="NAME=OVERRIDES",
                        help="a recipe to try (repeatable); default: " + ", ".join(RECIPES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("runs/recipes"))
    add_engine_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every recipe, before it")
    args = parser.parse_args(argv)

    from clmtl.config import load_config
    from clmtl.io import atomic_write_json, atomic_write_text
    from clmtl.stream.tasks import TASK_KINDS as TASK_NAMES

    tasks = [t.strip() for t in args.tasks.split(",")]
    unknown = sorted(set(tasks) - set(TASK_NAMES))
    if unknown:
        parser.error(f"unknown task(s) {unknown}; expected names from {list(TASK_NAMES)}")
    recipes = dict(args.recipe or RECIPES.items())
    seeds = [int(s) for s in args.seeds.split(",")]
    for overrides in recipes.values():
        load_config(None, [*args.overrides, *overrides])  # a bad key fails now, not in a worker an hour later
    engine = Engine.from_arguments(args)
    threads = engine.job_threads
    paths = {(name, seed): recipe_dir(args.out, name) / f"seed{seed}.json" for name in recipes for seed in seeds}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    failures = run_jobs([Job(f"{name} seed {seed}", train_recipe, ([*args.overrides, *recipes[name]], seed, threads,
                                                                   tasks, path))
                         for (name, seed), path in paths.items() if not path.exists()], engine)
    if failures:
        raise SystemExit(f"baseline_recipes: failed: {'; '.join(f'{f.label}: {f.error}' for f in failures)}")

    rows = []
    for name, overrides in recipes.items():
        stored = [json.loads(paths[name, seed].read_text()) for seed in seeds]
        metrics = {t: stored[0]["metrics"][t] for t in tasks}
        rows.append({"recipe": name, "overrides": list(overrides), "metrics": metrics, "seeds": seeds,
                     "values": {t: [s["scores"][t][metrics[t]] for s in stored] for t in tasks},
                     "seconds": [sum(s["seconds"].values()) for s in stored]})
    text = (f"Single-task baselines from scratch, seeds {seeds}: primary metric, mean ± std (per seed).\n\n"
            "Reproduce with:\n\n```\npython benchmarks/baseline_recipes.py " + shlex.join(argv) + "\n```\n\n"
            + recipes_markdown(rows, tasks))
    atomic_write_text(args.out / "recipes.md", text)
    atomic_write_json(args.out / "recipes.json", rows)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
