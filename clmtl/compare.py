"""Strategy comparison across seeds: from many runs' results.json to one paper-ready table.

Every number is the mean ± sample standard deviation (ddof 1) over the seeds a strategy ran with; a value that is
undefined in a run (null, e.g. a drop without baseline) is left out of that mean. Columns: the final primary metric
of every task, the average forgetting (Avalanche's definition, over all tasks but the last), BWT, the relative drop
vs the single-task baseline of every task, training seconds of the stream, and the strategy's extra memory.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from clmtl.io import atomic_write_text


@dataclass(frozen=True)
class Stat:
    """Mean and standard deviation over seeds (std is 0.0 for one seed, None when nothing is defined)."""

    mean: float | None
    std: float | None
    count: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        defined = [float(v) for v in values if v is not None and math.isfinite(v)]
        if not defined:
            return cls(None, None, 0)
        std = float(np.std(defined, ddof=1)) if len(defined) > 1 else 0.0
        return cls(float(np.mean(defined)), std, len(defined))

    def text(self, digits: int = 3, scale: float = 1.0, plus_minus: str = "±") -> str:
        if self.mean is None:
            return "–"
        return f"{self.mean * scale:.{digits}f} {plus_minus} {self.std * scale:.{digits}f}"


@dataclass(frozen=True)
class Column:
    """One table column: its header and how to read its value from a results dict."""

    header: str
    key: tuple[str, ...]
    digits: int = 3
    scale: float = 1.0


def average_forgetting(results: Mapping[str, Any]) -> float | None:
    """Mean forgetting over the tasks that have one (all but the last)."""
    values = [v for v in results["forgetting"].values() if v is not None]
    return float(np.mean(values)) if values else None


def columns_for(tasks: Sequence[Mapping[str, Any]]) -> list[Column]:
    names = [t["name"] for t in tasks]
    return (
        [Column(f"{t['name']} {t['metric']}", ("final", t["name"])) for t in tasks]
        + [Column("avg forgetting", ("avg_forgetting",)), Column("BWT", ("bwt",))]
        + [Column(f"{name} drop %", ("drop_vs_baseline", name), digits=1, scale=100.0) for name in names]
        + [Column("train s", ("train_total_seconds",), digits=0), Column("memory MB", ("memory_mb",), digits=2)]
    )


def _read(results: Mapping[str, Any], key: tuple[str, ...]) -> float | None:
    value: Any = results
    for part in key:
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def derived(results: Mapping[str, Any]) -> dict[str, Any]:
    """A run's results plus the values the table shows that results.json does not hold directly."""
    return {**results, "avg_forgetting": average_forgetting(results),
            "train_total_seconds": sum(results["train_seconds"].values()),
            "memory_mb": results.get("memory_bytes", 0) / 2**20}


@dataclass
class Comparison:
    """Runs grouped by strategy (in the order given), plus the single-task baselines of each seed."""

    tasks: list[Mapping[str, Any]]
    runs: dict[str, list[dict[str, Any]]]
    baselines: list[Mapping[str, float]]

    @classmethod
    def from_results(cls, strategies: Sequence[str], results: Sequence[Mapping[str, Any]]) -> Comparison:
        if not results:
            raise ValueError("no finished runs to compare")
        runs = {name: [derived(r) for r in results if r["strategy"] == name] for name in strategies}
        missing = [name for name, found in runs.items() if not found]
        if missing:
            raise ValueError(f"no finished run of {missing}")
        baselines = {r["seed"]: r["baseline"] for r in results if r.get("baseline")}
        return cls(list(results[0]["tasks"]), runs, [baselines[seed] for seed in sorted(baselines)])

    @property
    def columns(self) -> list[Column]:
        return columns_for(self.tasks)

    def stats(self, strategy: str) -> list[Stat]:
        return [Stat.of([_read(r, column.key) for r in self.runs[strategy]]) for column in self.columns]

    def baseline_stats(self) -> list[Stat | None]:
        """The single-task baseline under each final-metric column (None elsewhere)."""
        by_task = {t["name"]: Stat.of([b.get(t["name"]) for b in self.baselines]) for t in self.tasks}
        return [by_task[c.key[1]] if c.key[0] == "final" else None for c in self.columns]

    def seeds(self, strategy: str) -> list[int]:
        return sorted(r["seed"] for r in self.runs[strategy])

    def mean_matrix(self, strategy: str) -> np.ndarray:
        matrices = [np.array(r["matrix"], dtype=float) for r in self.runs[strategy]]  # null -> nan
        return np.nanmean(np.stack(matrices), axis=0)

    # -- tables -------------------------------------------------------------------------------
    def markdown(self) -> str:
        headers = ["strategy", "seeds", *[c.header for c in self.columns]]
        lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
        if self.baselines:
            cells = [s.text(c.digits, c.scale) if s else "" for s, c in zip(self.baseline_stats(), self.columns)]
            lines.append(f"| single-task baseline | {len(self.baselines)} | " + " | ".join(cells) + " |")
        for name in self.runs:
            cells = [s.text(c.digits, c.scale) for s, c in zip(self.stats(name), self.columns)]
            lines.append(f"| {name} | {len(self.runs[name])} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        headers = [f"{c.header} {part}" for c in self.columns for part in ("mean", "std")]
        writer.writerow(["strategy", "seeds", *headers])
        for name in self.runs:
            values = [None if v is None else v * c.scale
                      for s, c in zip(self.stats(name), self.columns) for v in (s.mean, s.std)]
            writer.writerow([name, len(self.runs[name]), *["" if v is None else repr(v) for v in values]])
        return out.getvalue()

    def latex(self) -> str:
        spec = "l" + "c" * len(self.columns)
        headers = " & ".join(["Strategy", *[_latex_escape(c.header) for c in self.columns]])
        lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", headers + " \\\\", "\\midrule"]
        if self.baselines:
            cells = [_latex_stat(s, c) if s else "" for s, c in zip(self.baseline_stats(), self.columns)]
            lines += [" & ".join(["Single-task baseline", *cells]) + " \\\\", "\\midrule"]
        for name in self.runs:
            cells = [_latex_stat(s, c) for s, c in zip(self.stats(name), self.columns)]
            lines.append(" & ".join([_latex_escape(name), *cells]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"

    # -- plots --------------------------------------------------------------------------------
    def plot_final_scores(self, path: str | Path) -> None:
        """Grouped bars: each task's final metric per strategy, error bars one std over seeds."""
        names = list(self.runs)
        finals = [i for i, c in enumerate(self.columns) if c.key[0] == "final"]
        figure = Figure(figsize=(max(6.0, 0.9 * len(names) + 2), 3.8), layout="constrained")
        ax = figure.add_subplot()
        width = 0.8 / len(finals)
        for offset, index in enumerate(finals):
            stats = [self.stats(name)[index] for name in names]
            x = np.arange(len(names)) + (offset - (len(finals) - 1) / 2) * width
            ax.bar(x, [s.mean or 0.0 for s in stats], width, yerr=[s.std or 0.0 for s in stats], capsize=2,
                   label=self.columns[index].header)
            baseline = self.baseline_stats()[index]
            if baseline is not None and baseline.mean is not None:
                ax.axhline(baseline.mean, color=ax.patches[-1].get_facecolor(), linestyle="--", linewidth=0.8)
        ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("final score")
        ax.set_title("final score per task, mean ± std over seeds (dashed: single-task baselines)", fontsize=10)
        ax.legend(fontsize="small", ncols=len(finals))
        _save(figure, path)

    def plot_matrices(self, path: str | Path) -> None:
        """The mean accuracy matrix of every strategy, side by side on one colour scale."""
        names = list(self.runs)
        cols = min(5, len(names))
        rows = math.ceil(len(names) / cols)
        figure = Figure(figsize=(2.6 * cols, 2.5 * rows + 0.4), layout="constrained")
        task_names = [t["name"] for t in self.tasks]
        for index, name in enumerate(names):
            ax = figure.add_subplot(rows, cols, index + 1)
            matrix = self.mean_matrix(name)
            image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
            for (i, j), value in np.ndenumerate(matrix):
                if np.isfinite(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 0.5 else "black")
            ax.set_title(name, fontsize=9)
            ax.set_xticks(range(len(task_names)), task_names, fontsize=7)
            ax.set_yticks(range(len(task_names)), [f"after {n}" for n in task_names], fontsize=7)
        figure.colorbar(image, ax=figure.axes, shrink=0.8, label="mean R[i][j] over seeds")
        _save(figure, path)

    def write(self, out_dir: str | Path, command: str) -> None:
        """table.md (with the command that reproduces it), table.csv, table.tex and plots/."""
        out_dir = Path(out_dir)
        seeds = sorted({r["seed"] for runs in self.runs.values() for r in runs})
        header = (f"Strategies on the `{self.runs[next(iter(self.runs))][0]['benchmark']}` benchmark, mean ± std over "
                  f"seeds {seeds}. Final primary metric per task, average forgetting (Avalanche's definition), BWT, "
                  "relative drop vs the single-task baseline (positive = worse), stream training seconds, "
                  "strategy memory.\n\nReproduce with:\n\n```\n" + command + "\n```\n\n")
        atomic_write_text(out_dir / "table.md", header + self.markdown())
        atomic_write_text(out_dir / "table.csv", self.csv())
        atomic_write_text(out_dir / "table.tex", self.latex())
        atomic_write_text(out_dir / "command.txt", command + "\n")
        self.plot_final_scores(out_dir / "plots" / "final_scores.png")
        self.plot_matrices(out_dir / "plots" / "matrices.png")


def _latex_stat(stat: Stat, column: Column) -> str:
    return "--" if stat.mean is None else "$" + stat.text(column.digits, column.scale, r"\pm") + "$"


def _latex_escape(text: str) -> str:
    return text.replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")


def _save(figure: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
