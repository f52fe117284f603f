"""Where a benchmark's trainings run: ``local``, a pool of processes on this machine (no dependency), or ``ray``,
Ray tasks on this machine or on a Ray cluster (``pip install -e '.[ray]'``).

Both engines take the same ``Job`` list and behave alike, so a grid gives the same files whichever runs it:

- a job that raises is reported (``Failure``: its label and error) and the other jobs run on;
- stopping the caller (Ctrl-C, SIGTERM) stops every job that is running and leaves no process behind;
- a progress line after each job, with the time left at the pace so far.

On Ray each job is one task that asks for ``cpus`` CPUs (its trainings' threads) and, on a cluster with GPUs, one
GPU; without ``address`` Ray starts on this machine with ``workers`` CPUs, so as many jobs run at once as with the
local pool, its workers import from the same paths as this process (as the pool's spawned processes do), and it is
shut down afterwards. Ray's dashboard and usage statistics are off: nothing tries the network.
On a cluster every node needs clmtl installed in the same environment (the jobs import it by name).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, NamedTuple

ENGINES = ("local", "ray")


class Job(NamedTuple):
    """One training: ``function(*arguments)``, named ``label`` in the progress lines and failure reports."""

    label: str
    function: Callable[..., Any]
    arguments: tuple


@dataclass(frozen=True)
class Failure:
    """A job that raised: its label and the last line of the error (``details``: the whole traceback)."""

    label: str
    error: str
    details: str = ""


@dataclass(frozen=True)
class Engine:
    """Where a benchmark's jobs run: ``name`` (``local`` or ``ray``), ``jobs`` at once on this machine, and the
    ``address`` of a Ray cluster to join (None: Ray starts on this machine)."""

    name: str = "local"
    jobs: int = 2
    address: str | None = None

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.name!r}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {self.jobs}")
        if self.address is not None and self.name != "ray":
            raise ValueError("--address joins a Ray cluster: it needs --engine ray")

    @property
    def job_threads(self) -> int | None:
        """Threads each training gets: one where trainings share the machine (several at once, or Ray tasks that
        ask for one CPU), None (the config's own ``train.threads``) where they run one after the other here."""
        return 1 if self.jobs > 1 or self.name == "ray" else None

    @contextlib.contextmanager
    def session(self, cpus: int = 1):
        """Keep Ray up for every ``run_jobs`` inside the block (a grid runs several), so it starts once and its
        workers, with their imports done, are reused; nothing for the local pool. Stopped at the end of the block
        when it started Ray."""
        if self.name != "ray":
            yield
            return
        ray = _import_ray()
        if ray.is_initialized():
            yield
            return
        previous = signal.getsignal(signal.SIGTERM)
        options: dict[str, Any] = {"include_dashboard": False, "logging_level": "warning", "log_to_driver": False}
        if self.address is None:  # this machine: as wide as the local pool, its workers importing what this can
            options["num_cpus"] = self.jobs * cpus
            options["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
        ray.init(address=self.address or "local", **options)  # "local": a new instance, never one already running
        # Ray's driver installs its own SIGTERM handler: exit through `finally` blocks instead (run_jobs' own, if set)
        signal.signal(signal.SIGTERM, previous if isinstance(previous, ExitOnSigterm) else ExitOnSigterm())
        try:
            yield
        finally:
            ray.shutdown()
            signal.signal(signal.SIGTERM, previous)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> Engine:
        """The engine ``add_engine_arguments``' options chose; a bad combination is a one-line error."""
        try:
            return cls(args.engine, args.jobs, args.address)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """``--engine``, ``--jobs`` and ``--address``, the same in every benchmark script."""
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="local: a process pool on this machine (default); ray: Ray tasks "
                             "(pip install -e '.[ray]')")
    parser.add_argument("--jobs", type=int, default=2,
                        help="trainings at once on this machine, one thread each (default 2)")
    parser.add_argument("--address", metavar="ADDR",
                        help="with --engine ray: the Ray cluster to join (e.g. ray://head:10001); default: Ray starts "
                             "on this machine")


def run_jobs(jobs: Sequence[Job], engine: Engine = Engine(), cpus: int = 1) -> list[Failure]:
    """Run ``jobs`` on ``engine``, each asking Ray for ``cpus`` CPUs; returns the jobs that failed."""
    if not jobs:
        return []
    progress = Progress(len(jobs))
    on_sigterm = ExitOnSigterm()
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if engine.name == "ray":
            with engine.session(cpus):
                return _run_on_ray(jobs, cpus, progress)
        return _run_locally(jobs, engine.jobs, progress)
    except SystemExit:
        if on_sigterm.received:  # Ray turns the interrupted wait into SystemExit(1): exit as SIGTERM'd instead
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_locally(jobs: Sequence[Job], workers: int, progress: Progress) -> list[Failure]:
    with contextlib.ExitStack() as stack:
        if workers == 1:
            outcomes = map(run_job, jobs)
        else:  # leaving the block terminates the workers
            outcomes = stack.enter_context(get_context("spawn").Pool(workers)).imap_unordered(run_job, jobs)
        return [outcome for outcome in map(progress.done, outcomes) if isinstance(outcome, Failure)]


def _import_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # read when Ray starts
    try:
        import ray
    except ImportError as error:
        raise SystemExit("engine ray: Ray is not installed; pip install -e '.[ray]'") from error
    return ray


def _run_on_ray(jobs: Sequence[Job], cpus: int, progress: Progress) -> list[Failure]:
    ray = _import_ray()
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(run_job)
    pending = {task.remote(job): job for job in jobs}
    failures = []
    try:
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready)
            try:
                outcome = ray.get(ready)
            except ray.exceptions.RayError as error:  # the worker process died (killed, out of memory)
                outcome = Failure(job.label, str(error).strip().splitlines()[-1], str(error))
            if isinstance(outcome, Failure):
                failures.append(outcome)
            progress.done(outcome)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return failures


def run_job(job: Job) -> str | Failure:
    """The job's label when it finished, its ``Failure`` when it raised (Ctrl-C and exits are not caught)."""
    try:
        job.function(*job.arguments)
    except Exception as error:  # noqa: BLE001 - reported with its traceback; the other jobs run on
        return Failure(job.label, f"{type(error).__name__}: {error}", traceback.format_exc())
    return job.label


class ExitOnSigterm:
    """A SIGTERM handler that exits through ``finally`` blocks (which stop the jobs) and remembers it fired."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum: int, frame) -> None:
        self.received = True
        raise SystemExit(128 + signum)


class Progress:
    """``[done/total] label done — elapsed, ~left`` after each job (``failed`` and its error for a failure)."""

    def __init__(self, total: int) -> None:
        self.total, self.count, self.start = total, 0, time.perf_counter()

    def done(self, outcome: str | Failure) -> str | Failure:
        self.count += 1
        elapsed = time.perf_counter() - self.start
        remaining = elapsed / self.count * (self.total - self.count)
        what = f"{outcome.label} FAILED ({outcome.error})" if isinstance(outcome, Failure) else f"{outcome} done"
        print(f"[{self.count}/{self.total}] {what} — {elapsed / 60:.1f} min elapsed, ~{remaining / 60:.1f} min left",
              flush=True)
        return outcome
