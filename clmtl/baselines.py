"""Single-task baselines: each task trained alone, from the same initial weights and with the same budget as in
the stream, the reference that drops are measured against.

They train in the run's process, or (``train.parallel_baselines``) in a second process beside the stream, which on
a machine where one training barely uses two cores finishes sooner than training them one after the other.
"""
from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from typing import TextIO

import torch
from avalanche.logging import TextLogger

from clmtl.builders import build_model, make_template, recipe_plugins
from clmtl.config import Config
from clmtl.metrics.plugin import task_scores
from clmtl.orphans import exit_with_parent
from clmtl.stream.benchmark import Benchmark, build_benchmark
from clmtl.stream.tasks import TaskSpec
from clmtl.training import distributed
from clmtl.training.devices import resolve_threads
from clmtl.training.seeding import seed_everything, start_experience


@dataclass
class Baselines:
    """Single-task results: every metric of each task, and the training seconds of each."""

    scores: dict[str, dict[str, float]]
    seconds: dict[str, float]


def single_task_baselines(config: Config, benchmark: Benchmark, loggers: list,
                          only: Sequence[str] | None = None, progress: bool = True,
                          module: torch.nn.Module | None = None) -> Baselines:
    """Each task (or those named in ``only``) trained alone from the same initial weights with the same budget: the
    reference for drops (``module``: a user's own model, ``clmtl.builders.build_model``)."""
    scores, seconds = {}, {}
    for label, task in enumerate(benchmark.tasks):
        if only is not None and task.name not in only:
            continue
        model = build_model(config, benchmark.tasks, module=module)
        template = make_template(config, model, benchmark.tasks, recipe_plugins(config), loggers, label="baseline ",
                                 progress=progress, preload=benchmark.fixed_samples, val_sets=benchmark.val_sets)
        start_experience(config.seed, label)
        seconds[task.name] = template.train_for(benchmark.stream.train_stream[label], *benchmark.budget(label),
                                                config.data.num_workers)
        metrics = template.eval([benchmark.stream.test_stream[label]])
        scores[task.name] = task_scores(metrics, benchmark.tasks)[label]
    return Baselines(scores, seconds)


def baselines_alone(config: Config, log: TextIO, only: Sequence[str] | None = None,
                    progress: bool = True) -> tuple[Baselines, list[TaskSpec]]:
    """``single_task_baselines`` in a process of their own (the run's second process, benchmark workers), with the
    config's threads and the data and seeds rebuilt as ``run`` builds them, so the scores equal ``clmtl run``'s with
    the same threads; returns them and the tasks, the text log going to ``log``."""
    torch.set_num_threads(resolve_threads(config.train.threads))
    seed_everything(config.seed)
    benchmark = build_benchmark(config)
    return single_task_baselines(config, benchmark, [TextLogger(log)], only, progress), benchmark.tasks


def _baselines_beside(config: Config) -> tuple[Baselines, str]:
    """``baselines_alone`` in ``BackgroundBaselines``'s process; returns them and their log."""
    log = io.StringIO()
    baselines, _ = baselines_alone(config, log, progress=False)
    return baselines, log.getvalue()


def baseline_threads(total_threads: int, beside: bool) -> int:
    """Threads of the single-task baselines when they train in a second process beside the stream, else 0.

    A training step of this small model gains little from a second thread (docs/studies.md, Training speed), so two
    1-thread trainings side by side (baselines and stream) finish sooner than one 2-thread training after the other.
    The stream keeps the other threads whether or not the run trains baselines (``--no-baselines``, resumed runs):
    its numbers depend on its thread count, and must not depend on the baselines.
    """
    if not beside or distributed.is_distributed():
        return 0
    return total_threads // 2


class BackgroundBaselines:
    """The single-task baselines, trained in a spawned process while this one trains the stream.

    ``close`` stops that process: an error or a stop in the stream must not leave it running. A run killed outright
    stops nothing: the process ends itself then (``exit_with_parent``, set up before its seconds of imports).
    """

    def __init__(self, config: Config, threads: int) -> None:
        self._pool = get_context("spawn").Pool(1, initializer=exit_with_parent, initargs=(os.getpid(),))
        own_threads = dataclasses.replace(config, train=dataclasses.replace(config.train, threads=threads))
        self._job = self._pool.apply_async(_baselines_beside, (own_threads,))

    def ready(self) -> bool:
        return self._job.ready()

    def result(self) -> tuple[Baselines, str]:
        """The baselines and their log, once trained (an error in their process is raised here)."""
        result = self._job.get()
        self._pool.close()  # the process then exits by itself, releasing what it holds (tqdm's lock)
        self._pool.join()
        return result

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()
