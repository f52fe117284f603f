"""`clmtl run`: single-task baselines, then sequential training on the stream, then the report.

Data flows one way: config -> benchmark (``clmtl.benchmark``) -> template + strategy plugins (``clmtl.builders``)
-> metrics after every experience -> results (``clmtl.results``) -> report (``clmtl.report``).
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path

import torch

from clmtl import distributed
from clmtl.baselines import BackgroundBaselines, Baselines, baseline_threads, single_task_baselines
from clmtl.benchmark import Benchmark, build_benchmark
from clmtl.builders import (build_model, build_strategy, make_decoder, make_loggers, make_template, recipe_plugins,
                             seed_everything)
from clmtl.checkpoint import (ResumeError, StopRequest, check_resumable, clock_state, load_run_checkpoint,
                              plugin_states, restore_plugins, rng_state, save_run_checkpoint, set_clock_state,
                              set_rng_state, task_model_states)
from clmtl.config import Config, ConfigError, check_model_input
from clmtl.decode import predict
from clmtl.devices import device_name, resolve_device, resolve_threads
from clmtl.metrics.plugin import task_scores
from clmtl.models import UnifiedModel
from clmtl.plugin import Plugin
from clmtl.registry import check_model
from clmtl.report import prediction_overlays, write_report
from clmtl.results import assemble_results


def run(config: Config, strategy: str, out_dir: str | Path | None, baselines: bool | Baselines = True,
        resume: bool = False, stop: StopRequest | None = None, *, benchmark: Benchmark | None = None,
        threads: int | str | None = "config", baselines_beside: bool | None = None,
        model: torch.nn.Module | None = None) -> dict:
    """Baselines, then the stream with ``strategy``; writes the report into ``out_dir`` (None: writes nothing) and
    returns results.

    ``baselines``: True trains them, False skips them, a ``Baselines`` reuses ones trained before with the same
    config and seed (benchmark scripts share them between strategies). ``resume`` continues the interrupted run in
    ``out_dir`` after its last finished experience (``clmtl.checkpoint``); config and strategy must be the run's.
    ``benchmark``: the stream to train on (``clmtl.from_avalanche``); None builds the config's. ``model``: a module of
    the user's own to train instead of the config's model (``clmtl.models.user``; a copy, as given, for each
    training).

    ``threads``: ``"config"`` (what ``clmtl run`` does) sets torch's thread count from ``train.threads``, a number
    sets that count, None leaves it as it is; the caller's count is put back at the end. ``baselines_beside`` trains
    the baselines in a second process beside the stream on half of the threads (None: ``train.parallel_baselines``);
    the stream then keeps the other half, also when no baselines are trained, so its numbers do not depend on them.

    ``stop``, once requested (the command line's signal handler), checkpoints and stops after the current training
    iteration. In a process group (``torchrun``, see ``clmtl.distributed``) every process trains its share and gets
    the same results; only rank 0 writes to ``out_dir``.
    """
    from avalanche.logging import TextLogger

    start = time.perf_counter()
    writes = distributed.is_main_process() and out_dir is not None
    out_dir = Path(out_dir) if out_dir is not None else None
    beside = config.train.parallel_baselines if baselines_beside is None else baselines_beside
    if beside and (benchmark is not None or model is not None) and baselines is True:
        raise ConfigError("baselines beside the stream rebuild the stream and model from the config in a second "
                          "process; a benchmark or model given as an object trains its baselines in this process "
                          "(baselines_beside=False)")
    if resume and out_dir is None:
        raise ConfigError("resume continues the run in out_dir: give its folder")
    processes = distributed.world_size()
    if config.train.batch_size % processes:
        raise ConfigError(f"train.batch_size={config.train.batch_size} must be a multiple of the {processes} "
                          "processes: each process takes an equal share of every batch")
    resolve_device(config.train.device)  # an absent device stops the run before it writes anything
    if model is None:
        check_model_input(config)
    saved = _resumable_checkpoint(out_dir, config, strategy) if resume else None
    callers_threads = torch.get_num_threads()
    total_threads = resolve_threads(config.train.threads) if threads == "config" else threads or callers_threads
    torch.set_num_threads(total_threads)
    seed_everything(config.seed)
    if benchmark is None:  # bad data, a stream the scenario or the strategy refuses: stop before writing
        benchmark = build_benchmark(config)
    plugins = [*recipe_plugins(config), *build_strategy(strategy, config, benchmark)]
    if saved is not None:  # a plugin whose state the checkpoint cannot hold: refused before anything is written
        check_resumable(plugins)
    tasks = benchmark.tasks
    if writes:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if saved is None and writes:
        (out_dir / "metrics.csv").unlink(missing_ok=True)  # a rerun into the same folder starts a fresh log
    log_path = out_dir / "log.txt" if writes else Path(os.devnull)
    share = baseline_threads(total_threads, beside)
    background, threads = None, {"stream": total_threads - share, "baselines": None}
    with open(log_path, "a" if saved else "w") as log_file, contextlib.ExitStack() as cleanup:
        if saved is not None and saved["baselines"] is not None:
            baselines = Baselines(**saved["baselines"])
        elif baselines is True and share:
            threads["baselines"] = share
            background = BackgroundBaselines(config, threads["baselines"])
            cleanup.callback(background.close)
            if writes:
                print(f"single-task baselines: training in a second process beside the stream ({threads['baselines']}"
                      f" + {threads['stream']} threads)", flush=True)
            baselines = None  # until that process delivers them
        elif baselines is True:
            threads["baselines"] = total_threads
            log_file.write("== single-task baselines ==\n")
            baselines = single_task_baselines(config, benchmark, [TextLogger(log_file)], module=model)
        else:
            baselines = baselines or Baselines({}, {})
        log_file.write(f"== sequential training, strategy {strategy} ==\n")
        torch.set_num_threads(threads["stream"])
        seed_everything(config.seed)
        model = build_model(config, tasks, module=model)
        check_model(strategy, model)
        if saved is not None:  # before the optimizer is made: heads take the checkpoint's (grown) shapes
            model.load_state_dict(saved["model"])
        loggers = make_loggers(config, out_dir, log_file) if writes else []
        checkpoints = config.output.checkpoints and writes

        def save_partial(position: dict) -> None:  # inside an experience: called by the template, after snapshot exists
            save_run_checkpoint({**snapshot(), "partial": position}, out_dir / "checkpoints", None)

        template = make_template(config, model, tasks, plugins, loggers, stop=stop, preload=benchmark.fixed_samples,
                                 checkpoint_every=config.output.checkpoint_every if checkpoints else 0,
                                 on_checkpoint=save_partial if checkpoints else None)
        matrix: list[list[float | None]] = []
        train_seconds: dict[str, float] = {}
        per_task: list[dict[str, float]] = []
        finished = -1  # the last experience trained and evaluated
        resume_point = None  # where a run stopped inside an experience continues
        if saved is not None:
            matrix, train_seconds, per_task, finished = (saved["matrix"], saved["train_seconds"], saved["scores"],
                                                         saved["experience"])
            random_init = saved.get("random_init", [None] * len(tasks))  # a checkpoint without the field: no scores
            if "partial" in saved:  # stopped inside experience finished + 1: the template continues it
                resume_point = {**saved["partial"],
                                "restore": lambda: restore_plugins(plugins, saved["plugins"], model)}
                log_file.write(f"== resumed inside experience {finished + 1} (epoch {saved['partial']['epoch']}, "
                               f"iteration {saved['partial']['iteration']}) ==\n")
            else:
                restore_plugins(plugins, saved["plugins"], model)
                set_clock_state(template.clock, saved["clock"])
                set_rng_state(saved["rng"])
                log_file.write(f"== resumed after experience {finished} ==\n")
        else:
            log_file.write("== scores of the model as initialised (forward transfer's reference) ==\n")
            random_init = random_init_scores(template, benchmark)

        def snapshot() -> dict:
            """Everything resuming needs, as of now; `clmtl export` also rebuilds the model from it without data."""
            return {"model": model.state_dict(), "experience": finished, "matrix": matrix, "scores": per_task,
                    "random_init": random_init, "train_seconds": train_seconds,
                    "baselines": None if baselines is None else {"scores": baselines.scores,
                                                                 "seconds": baselines.seconds},
                    "plugins": plugin_states(plugins), "task_states": task_model_states(plugins),
                    "clock": clock_state(template.clock), "rng": rng_state(),
                    "config": config.to_dict(), "strategy": strategy, "tasks": [t.as_dict() for t in tasks]}

        for label, experience in enumerate(benchmark.stream.train_stream):
            if label <= finished:
                continue
            task = tasks[label]
            train_seconds[task.name] = template.train_for(experience, *benchmark.budget(label),
                                                          config.data.num_workers, resume_point)
            resume_point = None
            if distributed.is_distributed():
                distributed.broadcast_plugin_states(plugins, model)
            per_task = task_scores(template.eval(benchmark.stream.test_stream), tasks)
            matrix.append([per_task[j][t.metric] for j, t in enumerate(tasks)])
            finished = label
            if checkpoints:
                save_run_checkpoint(snapshot(), out_dir / "checkpoints", label)
        if background is not None:
            if writes and not background.ready():
                print("waiting for the single-task baselines...", flush=True)
            baselines, baseline_log = background.result()
            log_file.write(f"== single-task baselines (trained beside the stream) ==\n{baseline_log}")
            if checkpoints:  # the last checkpoint, now with them: resuming a finished run needs no retraining
                save_run_checkpoint(snapshot(), out_dir / "checkpoints", finished)

    torch.set_num_threads(callers_threads)
    final_scores = {t.name: per_task[j] for j, t in enumerate(tasks)}
    measured = {"train_seconds": train_seconds, "baseline_train_seconds": baselines.seconds,
                "memory_bytes": sum(p.memory_bytes for p in plugins if isinstance(p, Plugin)),
                "strategy_stats": {type(p).__name__: p.stats() for p in plugins if isinstance(p, Plugin) and p.stats()},
                "total_seconds": time.perf_counter() - start, "processes": processes,
                "threads": threads,
                "precision": template.precision, "device": str(template.device),
                "device_name": device_name(template.device)}
    results = assemble_results(config, strategy, benchmark, matrix, final_scores, baselines.scores, random_init, model,
                               measured)
    if not writes:
        return results
    write_report(results, out_dir)
    if config.output.overlays:
        draw_overlays(model, benchmark, config, out_dir / "plots")
    return results


def _resumable_checkpoint(out_dir: Path, config: Config, strategy: str) -> dict:
    """The run's last checkpoint, if it belongs to this config and strategy."""
    saved = load_run_checkpoint(out_dir)
    if saved["strategy"] != strategy:
        raise ResumeError(f"{out_dir} holds a run of strategy {saved['strategy']!r}, not {strategy!r}")
    if saved["config"] != config.to_dict():
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
