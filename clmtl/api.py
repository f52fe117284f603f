"""clmtl from Python: the documented entry points a notebook or a script calls (``import clmtl``).

``clmtl.run`` does what ``clmtl run`` does and returns ``Results``; the pieces it joins (config, benchmark, model,
strategy, template, evaluation, report) are callable one by one for experiments of one's own.

Side effects are explicit. A call here changes torch's thread count only when given ``threads`` (and puts the
caller's back afterwards), starts a second process only with ``baselines_beside=True``, writes files only under
``out``, and seeds Python's, NumPy's and torch's global generators with the config's seed, as every run must to be
repeatable. The command line does more, and says so: it sets the threads from ``train.threads``, trains the
baselines beside the stream (``train.parallel_baselines``), writes into ``runs/`` by default and installs signal
handlers that checkpoint and stop on Ctrl-C or SIGTERM.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from clmtl.config import Config, load_config
from clmtl.deploy.evaluation import evaluate_model
from clmtl.report.results import Results
from clmtl.runner import run as run_stream
from clmtl.deploy.continuation import continued_config, read_parent
from clmtl.stream.benchmark import Benchmark
from clmtl.training.registry import parse_strategy

ConfigSource = Config | Mapping[str, Any] | str | Path | None
"""A config: a ``Config``, a dict of config keys (as the YAML file holds them), a YAML file, or None (defaults).
``load_config`` (``clmtl.config``'s, the one loader) takes any of them."""


def run(config: ConfigSource = None, strategy: str | None = None, out: str | Path | None = None, *,
        overrides: Sequence[str] = (), benchmark: Benchmark | None = None, baselines: bool = False,
        threads: int | None = None, baselines_beside: bool = False, model: Any = None,
        start_from: str | Path | None = None) -> Results:
    """Train ``strategy`` (a name or a hybrid, ``ewc+replay``) on the config's stream, or on ``benchmark``, and
    return what results.json holds.

    ``out``: the folder of results.json, summary.md, plots, checkpoints and logs (None: nothing is written).
    ``model``: a ``torch.nn.Module`` of your own instead of the config's model, for classification streams: a plain
    classifier (``x -> logits``, one output per class of the stream) for the class and domain scenarios, or an
    Avalanche ``MultiTaskModule`` for the task scenario. It is copied, so the module you pass stays as it was.
    ``baselines``: also train each task alone, the reference of the drops (``baselines_beside``: in a second
    process, beside the stream, on half of ``threads``). ``threads``: torch threads for the run (None: as they are).
    ``strategy``: None is ``ewc``, or the parent's strategy for a continuation.

    ``start_from``: the folder of a finished run to continue (docs/continue.md): ``config`` then lists only the new
    tasks (and whatever else changes); the rest comes from that run, which is only read.
    """
    parent = None
    if start_from is not None:
        parent = read_parent(start_from)
        config = continued_config(parent, config, overrides)
        strategy = strategy or parent.checkpoint.strategy
    else:
        config = load_config(config, overrides)
    strategy = strategy or "ewc"
    parse_strategy(strategy)
    return run_stream(config, strategy, out, baselines=baselines, benchmark=benchmark,
                      threads=torch.get_num_threads() if threads is None else threads,
                      baselines_beside=baselines_beside, model=model, parent=parent)


def evaluate(model: Any, benchmark: Benchmark, config: ConfigSource = None) -> dict[str, dict[str, float]]:
    """Every metric of each task of ``benchmark`` for ``model`` on its validation data: ``{task: {metric: value}}``
    (``config`` gives the batch size and the detection thresholds)."""
    return evaluate_model(model, benchmark, load_config(config))
