"""The `clmtl` command: run, continue, eval, export, strategies. Heavy imports (torch, avalanche) happen only inside
commands."""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from pathlib import Path


def _add_plugin_files(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin-file", type=Path, action="append", default=[], metavar="PATH",
                        help="Python file registering extra strategies (repeatable)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    _add_plugin_files(parser)
    parser.add_argument("--config", type=Path, help="YAML config file (defaults: clmtl/default.yaml)")
    parser.add_argument("--seed", type=int, help="random seed (overrides the config's seed)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.lr=1e-3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clmtl", description="Continual multi-task learning for vision.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="single-task baselines, then sequential training on the stream")
    _add_common(run)
    run.add_argument("--strategy", help="registered strategy or a+b composition (default: ewc)")
    run.add_argument("--out", type=Path, help="output directory (default: runs/<benchmark>_<strategy>_seed<N>)")
    run.add_argument("--no-baselines", action="store_true", help="skip the single-task baselines")
    run.add_argument("--resume", type=Path, metavar="OUT",
                     help="continue the interrupted run in OUT after its last finished experience")

    proceed = commands.add_parser("continue", help="train a finished run's final model on new tasks, keeping the "
                                  "strategy's state; every task, old and new, is evaluated")
    _add_plugin_files(proceed)
    proceed.add_argument("parent", type=Path, metavar="RUN", help="the folder of a finished run (clmtl run --out)")
    proceed.add_argument("--config", type=Path, required=True,
                         help="YAML listing the new tasks (tasks:, split: or domains:) and whatever else changes")
    proceed.add_argument("--out", type=Path, required=True, help="output directory of the continued run (a new one)")
    proceed.add_argument("--strategy", help="registered strategy or a+b composition (default: the parent's)")
    proceed.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="dotted config overrides, e.g. train.lr=1e-3")

    evaluate = commands.add_parser("eval", help="score a saved model on every task's validation split")
    _add_common(evaluate)
    evaluate.add_argument("--checkpoint", type=Path, required=True,
                          help="a run's checkpoint, e.g. OUT/checkpoints/last.pt")
    evaluate.add_argument("--predictions", type=Path, help="also write the predictions here (det.json, seg/, cls.csv)")
    evaluate.add_argument("--out", type=Path, help="where metrics.json goes (default: the run's folder /eval)")

    export = commands.add_parser("export", help="write a checkpoint's model (every task from one pass) for deployment")
    _add_plugin_files(export)
    export.add_argument("--checkpoint", type=Path, required=True,
                        help="a run's checkpoint, e.g. OUT/checkpoints/last.pt")
    export.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript",
                        help="torchscript (default) or onnx (needs the onnx and onnxscript packages)")
    export.add_argument("--out", type=Path, required=True, help="file to write, e.g. model.pt or model.onnx")
    export.add_argument("--image-size", type=int, help="input side the graph is traced at (default: the run's)")

    strategies = commands.add_parser("strategies", help="list registered strategies and their hyperparameters")
    _add_plugin_files(strategies)
    return parser


def _load(args: argparse.Namespace):
    """Config with overrides and --seed applied, validated against the registered strategies."""
    from clmtl.config import load_config
    from clmtl.training.registry import parse_strategy, use_strategy_files

    use_strategy_files(args.plugin_file)
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    config = load_config(args.config, overrides)  # strategy keys: checked against the registered strategies
    if getattr(args, "strategy", None):
        parse_strategy(args.strategy)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    parent = None
    try:
        if args.command == "continue":
            config, strategy, out, parent = _continued(args)
        elif args.resume:
            config, strategy, out = _resumed(args)
        else:
            strategy = args.strategy or "ewc"
            args.strategy = strategy
            config = _load(args)
            from clmtl.stream.benchmark import benchmark_name

            out = args.out or Path("runs") / (f"{benchmark_name(config)}_{config.scenario}_"
                                               f"{strategy.replace('+', '-')}_seed{config.seed}")
    except (ValueError, FileNotFoundError, RuntimeError) as error:  # bad config, strategy or checkpoint: one line
        return _fail(error)
    from clmtl.deploy.continuation import ContinueError
    from clmtl.errors import ConfigError, DataError
    from clmtl.runner import run
    from clmtl.training import distributed
    from clmtl.training.checkpoint import ResumeError, StopRequest
    from clmtl.training.plugin import StateError

    stop = StopRequest()
    previous = {name: signal.getsignal(name) for name in (signal.SIGTERM, signal.SIGINT)}
    for name in previous:  # a scheduler's SIGTERM, Ctrl-C: checkpoint, then stop
        signal.signal(name, functools.partial(_interrupt, stop))
    if distributed.launched_by_torchrun():
        from clmtl.training.devices import resolve_device

        distributed.init_from_environment(config.seed, resolve_device(config.train.device))
    try:
        results = run(config, strategy, out, baselines=not getattr(args, "no_baselines", True),
                      resume=bool(getattr(args, "resume", None)), stop=stop, parent=parent)
    except (ConfigError, DataError, ResumeError, StateError, ContinueError) as error:  # data paths, bad files,
        return _fail(error)  # undeclared state: one line naming the file or the plugin's attribute
    except KeyboardInterrupt:
        print(f"\nclmtl: stopped. {out}/checkpoints/ holds every finished experience and, when training was "
              f"stopped by a signal, the iteration it stopped at; continue with: clmtl run --resume {out}",
              file=sys.stderr)
        return 130
    finally:
        main_process = distributed.is_main_process()
        distributed.shutdown()
        for name, handler in previous.items():  # as they were, for a caller of main() in its own process
            signal.signal(name, handler)
    if not main_process:
        return 0
    print(results.summary())
    print(f"\nwrote {out}/results.json, summary.md, plots/, checkpoints/")
    return 0


def _interrupt(stop, signum: int, frame: object) -> None:
    """First signal: checkpoint and stop after the current training iteration. Second: stop now."""
    if stop.requested:
        raise KeyboardInterrupt
    stop.request()


def _continued(args: argparse.Namespace):
    """The parent run (read once), its config with the new tasks, the strategy (the parent's unless given), the new
    folder."""
    from clmtl.deploy.continuation import continued_config, read_parent
    from clmtl.training.registry import parse_strategy, use_strategy_files

    use_strategy_files(args.plugin_file)
    parent = read_parent(args.parent)
    strategy = args.strategy or parent.checkpoint.strategy
    parse_strategy(strategy)
    return continued_config(parent, args.config, args.overrides), strategy, args.out, parent


def _resumed(args: argparse.Namespace):
    """The interrupted run's own config and strategy, read from its last checkpoint."""
    if args.config or args.overrides or args.strategy or args.seed is not None or args.out:
        raise ValueError("--resume continues a run with its own config, strategy and folder: "
                         "give no --config, --strategy, --seed, --out or overrides")
    from clmtl.training.checkpoint import checkpoint_config, load_run_checkpoint
    from clmtl.training.registry import use_strategy_files

    use_strategy_files(args.plugin_file)
    saved = load_run_checkpoint(args.resume)
    return checkpoint_config(saved, args.resume), saved.strategy, args.resume


def cmd_eval(args: argparse.Namespace) -> int:
    from clmtl.deploy.evaluation import evaluate_checkpoint
    from clmtl.io import CheckpointError, atomic_write_json
    from clmtl.training.registry import use_strategy_files

    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    try:
        use_strategy_files(args.plugin_file)
        metrics = evaluate_checkpoint(args.checkpoint, args.predictions, args.config, overrides)
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        return _fail(error)
    run_dir = args.checkpoint.parent.parent if args.checkpoint.parent.name == "checkpoints" else args.checkpoint.parent
    out = args.out or run_dir / "eval"
    atomic_write_json(out / "metrics.json", metrics)
    for task, values in metrics.items():
        print(f"{task:6s} " + "  ".join(f"{name} {value:.4f}" for name, value in values.items()))
    print(f"wrote {out / 'metrics.json'}" + (f" and predictions in {args.predictions}" if args.predictions else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from clmtl.deploy.export import export_checkpoint
    from clmtl.io import CheckpointError
    from clmtl.training.registry import use_strategy_files

    try:
        use_strategy_files(args.plugin_file)
        path = export_checkpoint(args.checkpoint, args.out, args.format, image_size=args.image_size)
    except (ValueError, FileNotFoundError, CheckpointError, ModuleNotFoundError) as error:
        return _fail(error)
    print(f"wrote {path} (outputs and how to decode them: its clmtl.json, see clmtl/deploy/export.py)")
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    from clmtl.training.registry import available, use_strategy_files

    try:
        use_strategy_files(args.plugin_file)
    except FileNotFoundError as error:
        return _fail(error)
    from clmtl.settings import describe_settings
    from clmtl.stream.tasks import KINDS

    for name, entry in available().items():
        print(f"{name}: {entry.summary}\n  acts on: {', '.join(entry.acts_on) or 'nothing'}")
        if entry.kinds != KINDS:
            print(f"  handles: {' and '.join(entry.kinds)} tasks only")
        settings = describe_settings(entry.settings)
        for s in settings:
            check = f", {s['check']}" if s["check"] else ""
            search = f"; --tune tries {', '.join(map(repr, s['search']))}" if s["search"] else ""
            print(f"  strategy.{name}.{s['key']} = {s['default']!r} ({s['type']}{check}): {s['help']}{search}")
        if not settings:
            print("  no hyperparameters")
    return 0


def _fail(error: Exception) -> int:
    if os.environ.get("CLMTL_DEBUG"):
        raise error
    print(f"clmtl: error: {error}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(text.startswith("-") or "=" not in text for text in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # KEY=VALUE after an option that follows the positional arguments: overrides too
        args.overrides = [*args.overrides, *extra]
    commands = {"run": cmd_run, "continue": cmd_run, "eval": cmd_eval, "export": cmd_export,
                "strategies": cmd_strategies}
    command = commands[args.command]
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
