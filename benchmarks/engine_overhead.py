"""What running a grid on Ray costs over the local process pool: the same grid on both engines, side by side.

    python benchmarks/engine_overhead.py                        # naive,ewc x seeds 0,1, a short recipe, 2 rounds
    python benchmarks/engine_overhead.py --rounds 3 data.image_size=128

Each round trains the grid from scratch once per engine (``--jobs`` trainings at once, one thread each), in
alternating order, so a change of the machine's load hits both engines alike. The wall time includes everything a
user waits for: Ray's start and shutdown, the baselines, the trainings. Writes OUT/overhead.md and
OUT/overhead.json.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

SHORT = ("data.image_size=64", "data.train_size=120", "data.val_size=30", "train.epochs.seg=4", "train.epochs.det=6",
         "train.epochs.cls=8", "output.overlays=0", "output.checkpoints=false")
"""A short recipe, about a minute per training on one CPU thread, so that many trainings fit in one comparison."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default="naive,ewc", help="comma-separated strategy specs")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once on either engine (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="times each engine trains the grid (default 2)")
    parser.add_argument("--out", type=Path, default=Path("runs/engine_overhead"), help="output folder")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (after the short recipe)")
    args = parser.parse_args(argv)

    from clmtl.io import atomic_write_json, atomic_write_text
    from clmtl.studies.engines import Engine
    from clmtl.studies.grid import run_grid

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = [*SHORT, *args.overrides]
    walls: dict[str, list[float]] = {"local": [], "ray": []}
    for round_index in range(args.rounds):
        order = ("local", "ray") if round_index % 2 == 0 else ("ray", "local")
        for name in order:
            out = args.out / f"round{round_index}" / name
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            run_grid(None, overrides, strategies, seeds, out, Engine(name, args.jobs))
            walls[name].append(time.perf_counter() - started)
            print(f"round {round_index}: {name} {walls[name][-1]:.1f} s")
    ratios = [ray / local for ray, local in zip(walls["ray"], walls["local"])]
    trainings = len(seeds) * (len(strategies) + 1)
    command = "python benchmarks/engine_overhead.py " + shlex.join(argv)
    lines = [f"Grid: {', '.join(strategies)} x seeds {seeds} ({trainings} trainings with the baselines), "
             f"{args.jobs} at once.", "", f"```\n{command}\n```", "",
             "| round | local s | ray s | ray / local |", "|---|---|---|---|"]
    lines += [f"| {i} | {local:.1f} | {ray:.1f} | {ray / local:.3f} |"
              for i, (local, ray) in enumerate(zip(walls["local"], walls["ray"]))]
    lines += ["", f"Ray / local wall time: {sum(walls['ray']) / sum(walls['local']):.3f} over {args.rounds} rounds."]
    atomic_write_text(args.out / "overhead.md", "\n".join(lines) + "\n")
    atomic_write_json(args.out / "overhead.json", {"command": command, "walls": walls, "ratios": ratios,
                                                   "strategies": strategies, "seeds": seeds, "jobs": args.jobs})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
