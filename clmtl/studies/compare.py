"""Strategy comparison across seeds: from many runs' results.json to one paper-ready table.

Every number is the mean ± the half-width of its 95 % confidence interval over the seeds a strategy ran with
(``clmtl.studies.significance``; table.csv also holds the sample standard deviation); a value that is undefined in a run
(null, e.g. a drop without baseline) is left out of that mean. Columns: the average accuracy (mean of the last row of
the accuracy matrix), the final primary metric of every task, the average forgetting (Avalanche's definition, over
all tasks but the last), BWT, the relative drop vs the single-task baseline of every task, training seconds of the
stream, and the strategy's extra memory.

With a reference strategy (EWC by default) every other strategy's scores (average accuracy and final metrics) are
compared with it seed by seed (exact Wilcoxon signed-rank test); a ``*`` marks a difference significant at 5 %, and
the lines under the table give each score's minimum detectable difference at the seeds run.
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
from clmtl.studies.significance import (ALPHA, MIN_SEEDS, POWER, PairedDifference, minimum_detectable_difference,
                                        paired_test, seeds_to_resolve, t_half_width)

RESOLVE = 0.05
"""The difference of a score (0-1 scale) a comparison should resolve; the table says how many seeds that needs."""


@dataclass(frozen=True)
class Stat:
    """Mean, standard deviation and 95 % confidence half-width over seeds (std 0.0 and half-width None for one
    seed; all None when nothing is defined)."""

    mean: float | None
    std: float | None
    count: int
    half_width: float | None = None

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        defined = [float(v) for v in values if v is not None and math.isfinite(v)]
        if not defined:
            return cls(None, None, 0)
        std = float(np.std(defined, ddof=1)) if len(defined) > 1 else 0.0
        return cls(float(np.mean(defined)), std, len(defined), t_half_width(defined))

    def text(self, digits: int = 3, scale: float = 1.0, plus_minus: str = "±", spread: str = "std") -> str:
        """``mean ± std``, or ``mean ± 95 % half-width`` with ``spread="ci"`` (``mean`` alone for one seed)."""
        if self.mean is None:
            return "–"
        width = self.std if spread == "std" else self.half_width
        if width is None:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} {plus_minus} {width * scale:.{digits}f}"


@dataclass(frozen=True)
class Column:
    """One table column: its header and how to read its value from a results dict."""

    header: str
    key: tuple[str, ...]
    digits: int = 3
    scale: float = 1.0

    @property
    def is_score(self) -> bool:
        """A score tested against the reference strategy: the average accuracy and each task's final metric."""
        return self.key[0] in ("final", "average_accuracy")


def average_forgetting(results: Mapping[str, Any]) -> float | None:
    """Mean forgetting over the tasks that have one (all but the last)."""
    values = [v for v in results["forgetting"].values() if v is not None]
    return float(np.mean(values)) if values else None


def columns_for(tasks: Sequence[Mapping[str, Any]]) -> list[Column]:
    names = [t["name"] for t in tasks]
    return (
        [Column("avg accuracy", ("average_accuracy",))]
        + [Column(f"{t['name']} {t['metric']}", ("final", t["name"])) for t in tasks]
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
    """Runs grouped by strategy (in the order given), plus the single-task baselines of each seed, and the strategy
    the others are tested against (None: no test)."""

    tasks: list[Mapping[str, Any]]
    runs: dict[str, list[dict[str, Any]]]
    baselines: list[Mapping[str, float]]
    reference: str | None = None

    @classmethod
    def from_results(cls, strategies: Sequence[str], results: Sequence[Mapping[str, Any]],
                     reference: str | None = "ewc") -> Comparison:
        if not results:
            raise ValueError("no finished runs to compare")
        runs = {name: [derived(r) for r in results if r["strategy"] == name] for name in strategies}
        missing = [name for name, found in runs.items() if not found]
        if missing:
            raise ValueError(f"no finished run of {missing}")
        baselines = {r["seed"]: r["baseline"] for r in results if r.get("baseline")}
        return cls(list(results[0]["tasks"]), runs, [baselines[seed] for seed in sorted(baselines)],
                   reference if reference in runs else None)

    @property
    def columns(self) -> list[Column]:
        return columns_for(self.tasks)

    def stats(self, strategy: str) -> list[Stat]:
        return [Stat.of([_read(r, column.key) for r in self.runs[strategy]]) for column in self.columns]

    def baseline_stats(self) -> list[Stat | None]:
        """The single-task baseline under each final-metric column (None elsewhere)."""
        by_task = {t["name"]: Stat.of([b.get(t["name"]) for b in self.baselines]) for t in self.tasks}
        return [by_task[c.key[1]] if c.key[0] == "final" else None for c in self.columns]

    def paired(self, strategy: str) -> list[PairedDifference | None]:
        """Per column, ``strategy`` minus the reference over the seeds both ran (None: not a score, no reference,
        or no common seed)."""
        if self.reference is None or strategy == self.reference:
            return [None] * len(self.columns)
        differences = []
        for column in self.columns:
            own, theirs = self._pairs(strategy, column)
            differences.append(paired_test(own, theirs) if column.is_score and own else None)
        return differences

    def resolution(self) -> list[str]:
        """Lines under the table: the test, and per score the minimum detectable difference at the seeds run (from
        the spread of the paired differences vs the reference, pooled over strategies) and the seeds that would
        resolve ``RESOLVE``."""
        if self.reference is None:
            return []
        lines = [f"`*`: differs from {self.reference} at the 5 % level (two-sided Wilcoxon signed-rank test, exact, "
                 f"paired by seed; {len(self.runs) - 1} comparison{'s' if len(self.runs) != 2 else ''}, not "
                 "corrected for multiplicity)."]
        others = [name for name in self.runs if name != self.reference]
        parts = []
        for column in self.columns:
            if not column.is_score:
                continue
            spreads, counts = [], []
            for name in others:
                own, theirs = self._pairs(name, column)
                if len(own) > 1:
                    spreads.append(np.var(np.subtract(own, theirs), ddof=1))
                    counts.append(len(own))
            if not spreads:
                continue
            sd = math.sqrt(float(np.mean(spreads)))
            seeds = min(counts)
            needed = seeds_to_resolve(sd, RESOLVE)
            detectable = minimum_detectable_difference(sd, seeds)
            shown = "none" if math.isinf(detectable) else f"{detectable:.3f}"
            parts.append(f"{column.header} {shown} at {seeds} seeds (s_d {sd:.3f}; {needed or 'more than 50'} seeds "
                         f"resolve {RESOLVE})")
        if parts:
            lines.append(f"Minimum detectable difference vs {self.reference} (the test at α = {ALPHA} with power "
                         f"{POWER}, for normal paired differences of the observed spread s_d; none below "
                         f"{MIN_SEEDS} seeds): " + "; ".join(parts) + ".")
        return lines

    def _pairs(self, strategy: str, column: Column) -> tuple[list[float], list[float]]:
        """``column``'s values of ``strategy`` and of the reference over the seeds where both are defined."""
        theirs = {r["seed"]: _read(r, column.key) for r in self.runs[self.reference]}
        pairs = [(value, theirs[r["seed"]]) for r in self.runs[strategy]
                 if (value := _read(r, column.key)) is not None and theirs.get(r["seed"]) is not None]
        return [a for a, _ in pairs], [b for _, b in pairs]

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
            cells = [s.text(c.digits, c.scale, spread="ci") if s else ""
                     for s, c in zip(self.baseline_stats(), self.columns)]
            lines.append(f"| single-task baseline | {len(self.baselines)} | " + " | ".join(cells) + " |")
        for name in self.runs:
            cells = [s.text(c.digits, c.scale, spread="ci") + (" *" if d is not None and d.significant else "")
                     for s, c, d in zip(self.stats(name), self.columns, self.paired(name))]
            lines.append(f"| {name} | {len(self.runs[name])} | " + " | ".join(cells) + " |")
        notes = self.resolution()
        return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        parts = ("mean", "std", "ci95")
        headers = [f"{c.header} {part}" for c in self.columns for part in parts]
        tested = [c for c in self.columns if c.is_score] if self.reference else []
        headers += [f"{c.header} p vs {self.reference}" for c in tested]
        writer.writerow(["strategy", "seeds", *headers])
        for name in self.runs:
            values = [None if v is None else v * c.scale
                      for s, c in zip(self.stats(name), self.columns) for v in (s.mean, s.std, s.half_width)]
            values += [d.p_value if d else None for d, c in zip(self.paired(name), self.columns) if c in tested]
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
            cells = [_latex_stat(s, c) + ("$^*$" if d is not None and d.significant else "")
                     for s, c, d in zip(self.stats(name), self.columns, self.paired(name))]
            lines.append(" & ".join([_latex_escape(name), *cells]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"

    # -- plots --------------------------------------------------------------------------------
    def plot_final_scores(self, path: str | Path) -> None:
        """Grouped bars: each task's final metric per strategy, error bars the 95 % confidence interval."""
        names = list(self.runs)
        finals = [i for i, c in enumerate(self.columns) if c.key[0] == "final"]
        figure = Figure(figsize=(max(7.0, 0.9 * len(names) + 3), 3.8), layout="constrained")
        ax = figure.add_subplot()
        width = 0.8 / len(finals)
        for offset, index in enumerate(finals):
            stats = [self.stats(name)[index] for name in names]
            x = np.arange(len(names)) + (offset - (len(finals) - 1) / 2) * width
            ax.bar(x, [s.mean or 0.0 for s in stats], width, yerr=[s.half_width or 0.0 for s in stats], capsize=2,
                   label=self.columns[index].header)
            baseline = self.baseline_stats()[index]
            if baseline is not None and baseline.mean is not None:
                ax.axhline(baseline.mean, color=ax.patches[-1].get_facecolor(), linestyle="--", linewidth=0.8)
        ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("final score")
        ax.set_title("final score per task: mean and 95 % CI over seeds (dashed: single-task baselines)", fontsize=9)
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
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

    def write(self, out_dir: str | Path, command: str, notes: Sequence[str] = ()) -> None:
        """table.md (with the command that reproduces it and ``notes``), table.csv, table.tex and plots/."""
        out_dir = Path(out_dir)
        seeds = sorted({r["seed"] for runs in self.runs.values() for r in runs})
        header = (f"Strategies on the `{self.runs[next(iter(self.runs))][0]['benchmark']}` benchmark, mean ± 95 % "
                  f"confidence half-width over seeds {seeds}. Average accuracy, final primary metric per task, "
                  "average forgetting (Avalanche's definition), BWT, relative drop vs the single-task baseline "
                  "(positive = worse), stream training seconds, strategy memory.\n\nReproduce with:\n\n```\n"
                  + command + "\n```\n\n" + "".join(note + "\n\n" for note in notes))
        atomic_write_text(out_dir / "table.md", header + self.markdown())
        atomic_write_text(out_dir / "table.csv", self.csv())
        atomic_write_text(out_dir / "table.tex", self.latex())
        atomic_write_text(out_dir / "command.txt", command + "\n")
        self.plot_final_scores(out_dir / "plots" / "final_scores.png")
        self.plot_matrices(out_dir / "plots" / "matrices.png")


def _latex_stat(stat: Stat, column: Column) -> str:
    return "--" if stat.mean is None else "$" + stat.text(column.digits, column.scale, r"\pm", spread="ci") + "$"


def _latex_escape(text: str) -> str:
    return text.replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")


def _save(figure: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
