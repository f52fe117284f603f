"""`clmtl run`: single-task baselines, then sequential training on the stream, then the report.

Data flows one way: config -> benchmark (``clmtl.stream.benchmark``) -> template + strategy plugins (``clmtl.builders``)
-> metrics after every experience -> results (``clmtl.report.results``) -> report (``clmtl.report.summary``).

A ``Run`` goes through named stages (``Run.execute``): ``check`` refuses what cannot run before anything is written;
``prepare`` sets the threads and seed and builds the stream and the strategy's plugins; ``start_baselines`` trains
the single-task baselines, or starts them beside the stream, or takes given ones; ``build`` makes the model and the
template; ``restore`` (a resumed run) or ``score_initial`` (forward transfer's reference); ``train_stream`` trains
and evaluates experience by experience, checkpointing each; ``finish_baselines`` collects the baselines trained
beside it; ``results`` and ``report``. What the stages set up (torch's thread count, the log file, the baselines'
process) is undone in a ``finally``, however the run ends.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import TextIO

import torch
from avalanche.logging import TextLogger

from clmtl.baselines import BackgroundBaselines, Baselines, baseline_threads, single_task_baselines
from clmtl.builders import build_model, build_strategy, make_decoder, make_loggers, make_template, recipe_plugins
from clmtl.config import Config, check_model_input
from clmtl.deploy.continuation import (Lineage, ParentRun, carried_plugin_states, check_output_folder,
                                       inherited_tasks, load_parent_weights, output_folder_claimed, read_parent,
                                       same_strategy_names)
from clmtl.errors import ConfigError
from clmtl.metrics.plugin import task_scores
from clmtl.models.unified import UnifiedModel
from clmtl.models.decode import predict
from clmtl.models.heads import HeadedModel
from clmtl.report.results import Results, assemble_results
from clmtl.report.summary import prediction_overlays, write_report
from clmtl.stream.benchmark import Benchmark, build_benchmark
from clmtl.stream.tasks import TaskSpec
from clmtl.training import distributed
from clmtl.training.checkpoint import (ResumeError, RunCheckpoint, StopRequest, StreamProgress, check_resumable,
                                       clock_state, load_run_checkpoint, plugin_states, restore_plugins, rng_state,
                                       save_run_checkpoint, set_clock_state, set_rng_state, task_model_states)
from clmtl.training.devices import device_name, resolve_device, resolve_threads
from clmtl.training.plugin import Plugin
from clmtl.training.registry import check_model
from clmtl.training.seeding import seed_everything, start_experience


class Run:
    """One run of ``strategy`` on the config's stream (or ``benchmark``), written into ``out_dir`` (None: nothing is
    written); ``execute`` goes through the stages (module docstring) and returns the results.

    ``baselines``: train the single-task baselines (in this process, or in a second one beside the stream);
    ``reuse_baselines``: ones trained before with the same config and seed, used instead (benchmark scripts share
    them between strategies). ``resume`` continues the interrupted run in ``out_dir`` after its last finished
    experience (``clmtl.training.checkpoint``); config and strategy must be the run's. ``benchmark``: the stream to
    train on (``clmtl.from_avalanche``); None builds the config's. ``model``: a module of the user's own to train
    instead of the config's model (``clmtl.models.user``; a copy, as given, for each training).

    ``threads``: torch's thread count for the run (None: ``train.threads``); the caller's count is put back at the
    end. ``baselines_beside`` trains the baselines in a second process beside the stream on half of the threads
    (None: ``train.parallel_baselines``); the stream then keeps the other half, also when no baselines are trained,
    so its numbers do not depend on them.

    ``stop``, once requested (the command line's signal handler), checkpoints and stops after the current training
    iteration. In a process group (``torchrun``, see ``clmtl.training.distributed``) every process trains its share and
    gets the same results; only rank 0 writes to ``out_dir``.

    ``parent``: the run ``config.continues`` names, when the caller has read it already (``read_parent``).
    """

    def __init__(self, config: Config, strategy: str, out_dir: str | Path | None = None, *, baselines: bool = True,
                 reuse_baselines: Baselines | None = None, resume: bool = False, stop: StopRequest | None = None,
                 benchmark: Benchmark | None = None, threads: int | None = None,
                 baselines_beside: bool | None = None, model: torch.nn.Module | None = None,
                 parent: ParentRun | None = None) -> None:
        self.config, self.strategy = config, strategy
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.writes = distributed.is_main_process() and out_dir is not None
        self.train_baselines = baselines and reuse_baselines is None
        self.baselines = reuse_baselines if reuse_baselines is not None else None if baselines else Baselines({}, {})
        """The single-task baselines; None until trained (or, beside the stream, delivered)."""
        self.resume, self.stop = resume, stop
        self.benchmark, self.module = benchmark, model
        self.total_threads = resolve_threads(config.train.threads) if threads is None else threads
        self.beside = config.train.parallel_baselines if baselines_beside is None else baselines_beside
        self.threads: dict[str, int | None] = {"stream": self.total_threads, "baselines": None}
        self.saved: RunCheckpoint | None = None
        """The checkpoint a resumed run continues."""
        self.progress = StreamProgress()
        self.plugins: list = []
        self.model: HeadedModel | None = None
        self.template = None
        self.background: BackgroundBaselines | None = None
        self.log: TextIO | None = None
        self.checkpoints = config.output.checkpoints and self.writes
        self.resume_point: dict | None = None
        """Where a run stopped inside an experience continues."""
        self.parent = parent
        """The finished run a continued run starts from (``config.continues``), read before anything is written."""
        self.lineage: Lineage | None = None

    @property
    def tasks(self) -> list[TaskSpec]:
        return self.benchmark.tasks

    def execute(self) -> Results:
        """The run, stage by stage; returns its results (what results.json holds)."""
        start = time.perf_counter()
        self.check()
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(torch.set_num_threads, torch.get_num_threads())
            self.prepare(cleanup)
            self.log = cleanup.enter_context(self.open_log())
            self.start_baselines(cleanup)
            self.build()
            if self.saved is not None:
                self.restore()
            elif self.parent is not None:
                self.start_from_parent()
            else:
                self.score_initial()
            self.train_stream()
            self.finish_baselines()
        results = self.results(time.perf_counter() - start)
        if self.writes:
            self.report(results)
        return results

    def check(self) -> None:
        """Refuse what cannot run, before anything is written; read the checkpoint a resumed run continues."""
        config = self.config
        own_parts = self.benchmark is not None or self.module is not None
        if self.beside and own_parts and self.train_baselines:
            raise ConfigError("baselines beside the stream rebuild the stream and model from the config in a second "
                              "process; a benchmark or model given as an object trains its baselines in this "
                              "process (baselines_beside=False)")
        if self.resume and self.out_dir is None:
            raise ConfigError("resume continues the run in out_dir: give its folder")
        processes = distributed.world_size()
        if config.train.batch_size % processes:
            raise ConfigError(f"train.batch_size={config.train.batch_size} must be a multiple of the {processes} "
                              "processes: each process takes an equal share of every batch")
        resolve_device(config.train.device)  # an absent device stops the run before it writes anything
        if self.module is None:
            check_model_input(config)
        if self.resume:
            self.saved = _resumable_checkpoint(self.out_dir, config, self.strategy)
            self.lineage = Lineage(**self.saved.lineage) if self.saved.lineage else None
        elif config.continues is not None:
            if self.parent is None or self.parent.folder.resolve() != Path(config.continues.run).resolve():
                self.parent = read_parent(config.continues.run)
            self.lineage = inherited_tasks(self.parent, config)
            if self.out_dir is not None:
                check_output_folder(self.out_dir, self.parent.folder)

    def prepare(self, cleanup: contextlib.ExitStack) -> None:
        """Threads and seed, the stream and the strategy's plugins (bad data, a stream the scenario or the strategy
        refuses, a resumed run with a plugin a checkpoint cannot hold: the run stops before writing), then the output
        folder."""
        torch.set_num_threads(self.total_threads)
        seed_everything(self.config.seed)
        if self.benchmark is None:
            self.benchmark = build_benchmark(self.config)
        self.plugins = [*recipe_plugins(self.config), *build_strategy(self.strategy, self.config, self.benchmark)]
        if self.saved is not None or self.parent is not None:  # a plugin whose state a checkpoint cannot hold:
            check_resumable(self.plugins)  # refused before writing
        if self.writes:
            if self.parent is not None:  # before anything is written there
                cleanup.enter_context(output_folder_claimed(self.out_dir))
            (self.out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            if self.saved is None:
                (self.out_dir / "metrics.csv").unlink(missing_ok=True)  # a rerun into the same folder starts afresh

    def open_log(self) -> TextIO:
        """log.txt (a resumed run appends to it; nothing is written without ``out_dir``)."""
        path = self.out_dir / "log.txt" if self.writes else Path(os.devnull)
        return open(path, "a" if self.saved is not None else "w")

    def start_baselines(self, cleanup: contextlib.ExitStack) -> None:
        """The baselines of the checkpoint, or given ones, or none; else train them now, or start them in a second
        process beside the stream (stopped by ``cleanup`` however the run ends)."""
        share = baseline_threads(self.total_threads, self.beside)
        self.threads = {"stream": self.total_threads - share, "baselines": None}
        inherited = self.saved if self.saved is not None else self.parent.checkpoint if self.parent else None
        if inherited is not None and inherited.baselines is not None:  # a continuation's: the parent's tasks only
            self.baselines = Baselines(**inherited.baselines)
        elif not self.train_baselines or self.parent is not None:
            return
        elif share:
            self.threads["baselines"] = share
            self.background = BackgroundBaselines(self.config, share)
            cleanup.callback(self.background.close)
            self.baselines = None  # until that process delivers them
            if self.writes:
                print(f"single-task baselines: training in a second process beside the stream ({share} + "
                      f"{self.threads['stream']} threads)", flush=True)
        else:
            self.threads["baselines"] = self.total_threads
            self.log.write("== single-task baselines ==\n")
            self.baselines = single_task_baselines(self.config, self.benchmark, [TextLogger(self.log)],
                                                   module=self.module)

    def build(self) -> None:
        """The model (the checkpoint's weights for a resumed run) and the template on the stream's threads."""
        config = self.config
        self.log.write(f"== sequential training, strategy {self.strategy} ==\n")
        torch.set_num_threads(self.threads["stream"])
        seed_everything(config.seed)
        self.model = build_model(config, self.tasks, module=self.module)
        check_model(self.strategy, self.model)
        if self.saved is not None:  # before the optimizer is made: heads take the checkpoint's (grown) shapes
            self.model.load_state_dict(self.saved.model)
            self.model.mark_trained(task.head for task in self.tasks[:self.saved.progress.finished + 1])
        elif self.parent is not None:
            load_parent_weights(self.model, self.parent)
            self.model.mark_trained(task.head for task in self.tasks[:len(self.parent.checkpoint.task_entries)])
        loggers = make_loggers(config, self.out_dir, self.log) if self.writes else []
        self.template = make_template(config, self.model, self.tasks, self.plugins, loggers, stop=self.stop,
                                      preload=self.benchmark.fixed_samples, val_sets=self.benchmark.val_sets,
                                      checkpoint_every=config.output.checkpoint_every if self.checkpoints else 0,
                                      on_checkpoint=self.save_partial if self.checkpoints else None)

    def restore(self) -> None:
        """A resumed run: the scores so far, then the plugins, clock and generators as the checkpoint left them (or,
        stopped inside an experience, where the template continues it)."""
        saved = self.saved
        self.progress = copy.deepcopy(saved.progress)
        finished = self.progress.finished
        if saved.partial is not None:  # stopped inside experience finished + 1: the template continues it
            self.resume_point = {**saved.partial,
                                 "restore": lambda: restore_plugins(self.plugins, saved.plugins, self.model)}
            self.log.write(f"== resumed inside experience {finished + 1} (epoch {saved.partial['epoch']}, "
                           f"iteration {saved.partial['iteration']}) ==\n")
            return
        restore_plugins(self.plugins, saved.plugins, self.model)
        set_clock_state(self.template.clock, saved.clock)
        set_rng_state(saved.rng)
        if saved.optimizer is not None:
            self.template.carry_optimizer_state(saved.optimizer)
        self.log.write(f"== resumed after experience {finished} ==\n")

    def start_from_parent(self) -> None:
        """A continued run: the parent's progress (its rows, the new tasks' columns empty), the plugin states the
        strategy takes over, the parent's training clock and generators."""
        saved = self.parent.checkpoint
        progress, new = copy.deepcopy(saved.progress), len(self.tasks) - len(saved.task_entries)
        progress.matrix = [row + [None] * new for row in progress.matrix]
        progress.scores, progress.random_init = progress.scores + [None] * new, progress.random_init + [None] * new
        self.progress = progress
        names = saved.plugin_names or same_strategy_names(saved, self.strategy, self.plugins)
        states, self.lineage.not_taken_over = carried_plugin_states(names, saved.plugins, self.plugins)
        for plugin, state in zip(self.plugins, states):
            if state is not None:
                restore_plugins([plugin], [state], self.model)
        set_clock_state(self.template.clock, saved.clock)
        set_rng_state(saved.rng)
        if saved.optimizer is not None and not self.config.train.reset_optimizer:
            self.template.carry_optimizer_state(saved.optimizer)
        self.log.write(f"== continued from {self.parent.folder} after its {len(saved.task_entries)} tasks ==\n")
        for note in self.lineage.not_taken_over:
            self.log.write(f"not taken over: {note}\n")
            if self.writes:
                print(f"clmtl: {note}", flush=True)

    def score_initial(self) -> None:
        self.log.write("== scores of the model as initialised (forward transfer's reference) ==\n")
        self.progress.random_init = random_init_scores(self.template, self.benchmark)

    def train_stream(self) -> None:
        """Every experience not finished yet: trained, then every task evaluated and the checkpoint written."""
        for label, experience in enumerate(self.benchmark.stream.train_stream):
            if label > self.progress.finished:
                self.train_experience(label, experience)

    def train_experience(self, label: int, experience) -> None:
        """Train experience ``label`` from its own random stream (``clmtl.training.seeding``; a resumed experience
        continues from its checkpoint's generators), then evaluate every task and checkpoint."""
        progress = self.progress
        if self.resume_point is None:
            start_experience(self.config.seed, label)
        progress.train_seconds[self.tasks[label].name] = self.template.train_for(
            experience, *self.benchmark.budget(label), self.config.data.num_workers, self.resume_point)
        self.resume_point = None
        if distributed.is_distributed():
            distributed.broadcast_plugin_states(self.plugins, self.model)
        progress.scores = task_scores(self.template.eval(self.benchmark.stream.test_stream), self.tasks)
        progress.matrix.append([progress.scores[j][t.metric] for j, t in enumerate(self.tasks)])
        progress.finished = label
        if self.checkpoints:
            save_run_checkpoint(self.snapshot(), self.out_dir / "checkpoints")

    def finish_baselines(self) -> None:
        """The baselines trained beside the stream, once they are done."""
        if self.background is None:
            return
        if self.writes and not self.background.ready():
            print("waiting for the single-task baselines...", flush=True)
        self.baselines, baseline_log = self.background.result()
        self.log.write(f"== single-task baselines (trained beside the stream) ==\n{baseline_log}")
        if self.checkpoints:  # the last checkpoint, now with them: resuming a finished run needs no retraining
            save_run_checkpoint(self.snapshot(), self.out_dir / "checkpoints")

    def snapshot(self) -> RunCheckpoint:
        """Everything resuming needs, as of now; `clmtl export` also rebuilds the model from it without data."""
        baselines = self.baselines
        return RunCheckpoint(
            model=self.model.state_dict(), config=self.config.to_dict(),
            task_entries=[task.as_dict() for task in self.tasks], task_states=task_model_states(self.plugins),
            strategy=self.strategy, progress=self.progress,
            baselines=None if baselines is None else {"scores": baselines.scores, "seconds": baselines.seconds},
            plugins=plugin_states(self.plugins), clock=clock_state(self.template.clock), rng=rng_state(),
            plugin_names=[type(plugin).__name__ for plugin in self.plugins],
            lineage=None if self.lineage is None else dataclasses.asdict(self.lineage),
            optimizer=None if self.config.train.reset_optimizer else self.template.optimizer_state())

    def save_partial(self, position: dict) -> None:
        """The template's position inside an experience, as ``partial.pt`` (``output.checkpoint_every``, a stop)."""
        save_run_checkpoint(self.snapshot().inside_experience(position), self.out_dir / "checkpoints")

    def results(self, total_seconds: float) -> Results:
        """The results (``clmtl.report.results``) of the finished stream."""
        template, stateful = self.template, [p for p in self.plugins if isinstance(p, Plugin)]
        progress, baselines = self.progress, self.baselines
        final_scores = {t.name: progress.scores[j] for j, t in enumerate(self.tasks)}
        return assemble_results(
            self.config, self.strategy, self.benchmark, progress.matrix, final_scores, baselines.scores,
            progress.random_init, self.model, train_seconds=progress.train_seconds,
            baseline_train_seconds=baselines.seconds, memory_bytes=sum(p.memory_bytes for p in stateful),
            strategy_stats={type(p).__name__: p.stats() for p in stateful if p.stats()}, total_seconds=total_seconds,
            processes=distributed.world_size(), threads=self.threads, precision=template.precision,
            device=str(template.device), device_name=device_name(template.device),
            parent=None if self.lineage is None else dataclasses.asdict(self.lineage))

    def report(self, results: Results) -> None:
        """results.json, summary.md and plots into ``out_dir``; a few validation images with the final model's
        predictions (``output.overlays``)."""
        write_report(results.to_dict(), self.out_dir)
        if self.config.output.overlays:
            draw_overlays(self.model, self.benchmark, self.config, self.out_dir / "plots")


def run(config: Config, strategy: str, out_dir: str | Path | None, baselines: bool = True, resume: bool = False,
        stop: StopRequest | None = None, **options) -> Results:
    """``Run(config, strategy, out_dir, baselines=..., resume=..., stop=..., **options).execute()``: what ``clmtl
    run`` does; ``options`` are ``Run``'s other keywords."""
    return Run(config, strategy, out_dir, baselines=baselines, resume=resume, stop=stop, **options).execute()


def _resumable_checkpoint(out_dir: Path, config: Config, strategy: str) -> RunCheckpoint:
    """The run's last checkpoint, if it belongs to this config and strategy."""
    saved = load_run_checkpoint(out_dir)
    if saved.strategy != strategy:
        raise ResumeError(f"{out_dir} holds a run of strategy {saved.strategy!r}, not {strategy!r}")
    if saved.config != config.to_dict():
        raise ResumeError(f"{out_dir} holds a run with another config; resume with the run's own config")
    return saved


def random_init_scores(template, benchmark: Benchmark) -> list[float | None]:
    """Each task's primary metric for the model as initialised, before any training: the reference of forward
    transfer. The generators are put back afterwards, so training draws what it would have drawn without it."""
    with torch.random.fork_rng(devices=[]):
        scores = task_scores(template.eval(benchmark.stream.test_stream), benchmark.tasks)
    return [None if row is None else row[task.metric] for row, task in zip(scores, benchmark.tasks)]


@torch.inference_mode()
def draw_overlays(model: UnifiedModel, benchmark: Benchmark, config: Config, plot_dir: Path) -> None:
    """A few validation images per task with what the final model predicts on them."""
    model.eval()
    count = config.output.overlays
    decode = functools.partial(make_decoder(config, model), score_threshold=0.3)  # what is worth drawing
    for label, task in enumerate(benchmark.tasks):
        dataset = benchmark.val_sets[label]
        samples = [dataset[i] for i in range(min(count, len(dataset)))]
        images = torch.stack([s[0] for s in samples]).to(next(model.parameters()).device)
        predictions = predict(model(images, task.head), task.kind, decode)
        prediction_overlays(images, predictions, task.kind, model.spaces[task.head].classes,
                            plot_dir / f"predictions_{task.name}.png", targets=[s[1] for s in samples])
