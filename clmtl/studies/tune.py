"""Hyperparameter selection on a validation split carved from the training data (``compare_strategies.py --tune``).

Each strategy declares the values worth trying beside its defaults (``search=`` of its settings, shown by
``clmtl strategies``). For every component of the compared strategies that declares some, every combination of its
values trains the component alone on the stream, with one seed, on the training data minus a held-out fraction
(``data.holdout``, ``clmtl.data.holdout``), and is scored by its average accuracy on that held-out fraction. The
evaluation sets are never seen. The best combination (ties: the first tried) becomes
``strategy.<component>.<key>=<value>`` overrides of every run of the comparison, so a hybrid such as ``ewc+replay``
reuses the values selected for ``ewc`` and ``replay`` alone instead of searching their product.

Tuning runs live in ``OUT/tune/<component>/<values>/`` and resume as the grid's runs do; ``OUT/tune/selected.json``
records the seed, the held-out fraction, the samples carved out of each task, every candidate's score and the
values selected.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clmtl.io import atomic_write_json
from clmtl.settings import search_space
from clmtl.studies.engines import Engine, Job, run_jobs
from clmtl.studies.grid import check_reused, seed_config, train_strategy, write_failures
from clmtl.training.registry import available, parse_strategy

HOLDOUT = 0.25
"""Fraction of each task's training data held out to score the candidates."""


@dataclass(frozen=True)
class Candidate:
    """One combination of a component's search values."""

    component: str
    values: dict[str, Any]

    @property
    def label(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self.values.items())

    @property
    def overrides(self) -> list[str]:
        return [f"strategy.{self.component}.{key}={value}" for key, value in self.values.items()]


def candidates(component: str) -> list[Candidate]:
    """Every combination of ``component``'s search values, in declaration order (none without a search space)."""
    space = search_space(available()[component].settings)
    if not space:
        return []
    return [Candidate(component, dict(zip(space, values))) for values in itertools.product(*space.values())]


def tunable_components(strategies: Sequence[str], only: Sequence[str] | None = None) -> list[str]:
    """The components of ``strategies`` (in order of first appearance) that declare a search space, limited to
    ``only`` where given (a name in ``only`` that no strategy uses, or that has nothing to tune, is an error)."""
    components = list(dict.fromkeys(name for spec in strategies for name in parse_strategy(spec)))
    tunable = [name for name in components if candidates(name)]
    if only is None:
        return tunable
    wrong = [name for name in only if name not in tunable]
    if wrong:
        raise ValueError(f"--tune {','.join(wrong)}: not a component with a search space of the compared strategies "
                         f"(those are: {', '.join(tunable) or 'none'})")
    return [name for name in tunable if name in only]


def tune(config_file: Path | None, overrides: Sequence[str], components: Sequence[str], seed: int, out: Path,
         engine: Engine = Engine(), strategy_files: Sequence[Path] = (), holdout: float = HOLDOUT) -> list[str]:
    """Select each component's values (module docstring); return them as overrides and write
    ``OUT/tune/selected.json``. A candidate whose training failed is left out of the selection (listed in
    ``OUT/tune/failures.log``)."""
    threads = engine.job_threads
    common = [*overrides, f"data.holdout={holdout}"]
    planned = [(candidate, out / "tune" / component / candidate.label.replace("=", "_"))
               for component in components for candidate in candidates(component)]
    for candidate, folder in planned:
        check_reused(folder / "results.json", candidate.component,
                     seed_config(config_file, [*common, *candidate.overrides], seed, None, strategy_files))
    jobs = [Job(f"tune {candidate.component} {candidate.label}", train_strategy,
                (config_file, [*common, *candidate.overrides], seed, threads, list(strategy_files),
                 candidate.component, folder, None))
            for candidate, folder in planned if not (folder / "results.json").exists()]
    (out / "tune").mkdir(parents=True, exist_ok=True)
    write_failures(out / "tune" / "failures.log", run_jobs(jobs, engine, threads or 1))

    record: dict[str, Any] = {"seed": seed, "holdout": holdout, "score": "average accuracy on the held-out split",
                              "carved": None, "components": {}}
    selected_overrides = []
    for component in components:
        scored = []
        for candidate, folder in planned:
            if candidate.component == component and (folder / "results.json").exists():
                results = json.loads((folder / "results.json").read_text())
                record["carved"] = record["carved"] or results["held_out"]
                scored.append((candidate, results["average_accuracy"]))
        if not scored:
            raise RuntimeError(f"every tuning run of {component} failed; see {out / 'tune' / 'failures.log'}")
        best = max(scored, key=lambda pair: -1.0 if pair[1] is None else pair[1])[0]
        record["components"][component] = {
            "selected": best.values,
            "candidates": [{"values": c.values, "score": score} for c, score in scored]}
        selected_overrides += best.overrides
    atomic_write_json(out / "tune" / "selected.json", record)
    return selected_overrides
