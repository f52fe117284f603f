"""Continuing a finished run on new tasks: ``clmtl continue RUN --config NEW.yaml --out DIR`` and
``clmtl.run(NEW, start_from=RUN)``.

A continued run is an ordinary run whose config says so (``continues: {run: PARENT, tasks: K}``): its stream is the
parent's K tasks followed by the new ones. It starts from the parent's last checkpoint (the final model, every
plugin's declared state, the training clock and the random generators), reads only the validation data of the
inherited tasks, trains the new tasks alone, and evaluates every task after each of them. Its accuracy matrix
starts with the parent's rows, bit for bit (the new tasks' columns empty there), so forgetting and BWT cover the
whole lineage; ``results.json`` names the parent and the hash of its results. The parent's folder is only read.

What would be silently wrong is refused in one line: another scenario, a task name the parent already has, another
model (backbone, sizes, input). A strategy may change: a plugin the parent had not starts empty, and a state the new
strategy has no plugin for is dropped; both are said and recorded (``Lineage.not_taken_over``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clmtl.config import DEFAULT_TASKS, STREAM_KEYS, Config, TaskConfig, load_config
from clmtl.config_files import read_file
from clmtl.stream.benchmark import task_entries
from clmtl.training.checkpoint import ResumeError, RunCheckpoint, checkpoint_config, load_run_checkpoint
from clmtl.training.plugin import Plugin

SAME_MODEL_KEYS = ("model", "data.image_size", "data.channels")
"""Config keys a continuation must share with its parent: they decide the network its weights belong to."""
DATA_PATH_KEYS = ("root", "train_images", "train_ann", "val_images", "val_ann")
"""The keys of a task's data that name files or folders."""


class ContinueError(ValueError):
    """A run cannot be continued as asked; the message says why in one line."""


@dataclass(frozen=True)
class ParentRun:
    """A finished run read for continuing: its folder, last checkpoint and the hash of its results.json."""

    folder: Path
    checkpoint: RunCheckpoint
    results_sha256: str


@dataclass
class Lineage:
    """What a continued run records of its parent (``results.json``'s ``parent``)."""

    run: str
    results_sha256: str
    tasks: int
    """How many of the stream's tasks are the parent's."""
    strategy: str
    not_taken_over: list[str] = field(default_factory=list)
    """The parent's plugin states the new strategy did not take over, and the new strategy's plugins that started
    empty, one sentence each."""


def read_parent(folder: str | Path) -> ParentRun:
    """The finished run in ``folder``, checked: a missing folder, an unfinished run, unreadable results or a
    truncated checkpoint raise ``ContinueError`` in one line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ContinueError(f"{folder}: no such run folder")
    results = folder / "results.json"
    if not results.is_file():
        raise ContinueError(f"{folder}: no results.json, so the run has not finished; finish it with "
                            f"clmtl run --resume {folder}")
    data = results.read_bytes()
    try:
        json.loads(data)
    except ValueError as error:
        raise ContinueError(f"{results}: not valid JSON ({error})") from None
    try:
        checkpoint = load_run_checkpoint(folder)
    except (ResumeError, ValueError) as error:
        raise ContinueError(str(error)) from None
    tasks = len(checkpoint.task_entries)
    if checkpoint.partial is not None or checkpoint.progress.finished != tasks - 1:
        raise ContinueError(f"{folder}: its last checkpoint is not the end of its stream ({tasks} tasks); finish the "
                            f"run with clmtl run --resume {folder}")
    return ParentRun(folder, checkpoint, hashlib.sha256(data).hexdigest())


def continued_config(parent: ParentRun, source: Config | Mapping[str, Any] | str | Path | None,
                     overrides: Sequence[str] = ()) -> Config:
    """The parent's config with the new tasks of ``source`` (a file, a dict or a ``Config`` listing ``tasks``,
    ``split`` or ``domains``) appended, and the rest of ``source`` and ``overrides`` on top."""
    parent_config = checkpoint_config(parent.checkpoint, parent.folder)
    if parent_config.split is not None and parent_config.scenario == "domain":
        raise ContinueError(f"{parent.folder}: a split: stream in the domain scenario shares its head by position; "
                            "continuing one is not supported")
    if isinstance(source, Config):
        layer = source.to_dict()
    elif isinstance(source, Mapping):
        layer = source
    else:
        layer = read_file(Path(source)) if source is not None else {}
    if not any(key in layer for key in STREAM_KEYS) and not any(o.split("=")[0] in STREAM_KEYS for o in overrides):
        raise ContinueError(f"{source or 'the new config'}: lists no new task (give tasks:, split: or domains:)")
    base = {**parent.checkpoint.config, "tasks": DEFAULT_TASKS, "split": None, "domains": None, "continues": None}
    new = load_config(layer, overrides, base=base, base_source=f"{parent.folder} (parent config)")
    moved = new.continues.moved if new.continues is not None else {}  # the parent's own moves are in its entries
    inherited, added = relocated(task_entries(parent_config), moved), task_entries(new)
    clash = sorted({task.name for task in inherited} & {task.name for task in added})
    if clash:
        raise ContinueError(f"task name(s) {', '.join(clash)} already in the parent run {parent.folder}; a new task "
                            "needs a name of its own")
    combined = {**new.to_dict(), "split": None, "domains": None,
                "tasks": [dataclasses.asdict(task) for task in [*inherited, *added]],
                "continues": {"run": str(parent.folder.resolve()), "tasks": len(inherited), "moved": moved}}
    config = load_config(combined)
    check_same_setting(parent_config, config, parent.folder)
    return config


def relocated(entries: Sequence[TaskConfig], moved: Mapping[str, str]) -> list[TaskConfig]:
    """``entries`` with every data path that starts with a moved folder (``continues.moved``: ``{OLD: NEW}``) read
    under its new place."""
    def place(path: str | None) -> str | None:
        for old, new in moved.items():
            if not isinstance(new, str):
                raise ContinueError(f"continues.moved: {old!r} must map to a folder, got {new!r}")
            if path is not None and (path == old or path.startswith(old.rstrip("/") + "/")):
                return new.rstrip("/") + path[len(old.rstrip("/")):]
        return path

    return [dataclasses.replace(entry, data=dataclasses.replace(
        entry.data, **{key: place(getattr(entry.data, key)) for key in DATA_PATH_KEYS})) for entry in entries]


def check_same_setting(parent: Config, config: Config, folder: Path) -> None:
    """Refuse another scenario or another model than the parent's: the parent's weights would not mean the same."""
    if config.scenario != parent.scenario:
        raise ContinueError(f"{folder} was trained in the {parent.scenario} scenario, not {config.scenario}; a "
                            "continuation keeps its parent's scenario")
    for key in SAME_MODEL_KEYS:
        section, _, name = key.partition(".")
        theirs, ours = (getattr(getattr(c, section), name) if name else getattr(c, section) for c in (parent, config))
        if theirs != ours:
            raise ContinueError(f"{key} differs from the parent run's ({folder}): a continuation trains the parent's "
                                f"model, so it keeps {key} as it was")


def check_output_folder(folder: Path, parent: Path) -> None:
    """A continuation writes into a folder of its own that holds no run yet."""
    if folder.resolve() == parent.resolve():
        raise ContinueError(f"--out {folder} is the parent run's folder; a continuation writes into a new one")
    if (folder / "results.json").exists() or (folder / "checkpoints" / "last.pt").exists():
        raise ContinueError(f"{folder} already holds a run; choose another --out (or clmtl run --resume {folder})")


def carried_plugin_states(names: Sequence[str], states: Sequence[dict | None],
                          plugins: Sequence[Any]) -> tuple[list[dict | None], list[str]]:
    """For each plugin of the continuation, the parent's state of the plugin of the same class (the k-th of a class
    takes the k-th), or None where the parent had none; and a sentence for each state not taken over."""
    available: dict[str, list[dict | None]] = defaultdict(list)
    for name, state in zip(names, states, strict=True):
        available[name].append(state)
    carried, notes = [], []
    for plugin in plugins:
        name = type(plugin).__name__
        if available.get(name):
            carried.append(available[name].pop(0))
        else:
            carried.append(None)
            if isinstance(plugin, Plugin) and plugin.state_dict():
                notes.append(f"{name} starts empty (the parent run had none)")
    for name, left in available.items():
        notes += [f"{name}'s state is dropped (the new strategy has none)" for state in left if state]
    return carried, notes


def inherited_tasks(parent: ParentRun, config: Config) -> Lineage:
    """The lineage of a run whose config continues ``parent``, checked: its first tasks must be the parent's."""
    count = config.continues.tasks
    theirs = [entry["name"] for entry in parent.checkpoint.task_entries]
    ours = [task.name for task in task_entries(config)[:count]]
    if count != len(theirs) or ours != theirs:
        raise ContinueError(f"continues: the first {count} tasks ({', '.join(ours)}) are not the tasks of "
                            f"{parent.folder} ({', '.join(theirs)})")
    check_same_setting(checkpoint_config(parent.checkpoint, parent.folder), config, parent.folder)
    return Lineage(str(parent.folder), parent.results_sha256, count, parent.checkpoint.strategy)


LOCK = ".continuing"
"""The file a continuation holds in its output folder while it runs (its process id), so a second one stops."""


@contextlib.contextmanager
def output_folder_claimed(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock file while the continuation runs, or fail in one line if a live process holds it (one
    left by a process killed outright is taken over)."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK
    try:
        with lock.open("x") as file:
            file.write(str(os.getpid()))
    except FileExistsError:
        owner = lock.read_text().strip()
        if owner.isdigit() and _alive(int(owner)):
            raise ContinueError(f"{folder}: another continuation (process {owner}) writes into this folder; choose "
                                "another --out") from None
        lock.write_text(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def load_parent_weights(model: torch.nn.Module, parent: ParentRun) -> None:
    """The parent's final weights into the continued model; only the new tasks' heads keep their fresh weights."""
    try:
        unexpected = model.load_state_dict(parent.checkpoint.model, strict=False).unexpected_keys
    except RuntimeError as error:
        raise ContinueError(f"{parent.folder}: its weights do not fit the continued model: "
                            f"{str(error).splitlines()[0]}") from None
    if unexpected:
        raise ContinueError(f"{parent.folder}: its weights hold tensors the continued model does not have "
                            f"({', '.join(unexpected[:3])})")


def same_strategy_names(saved: RunCheckpoint, strategy: str, plugins: Sequence[Any]) -> list[str]:
    """The plugin names of a checkpoint written before they were recorded: those of the same strategy's plugins."""
    if strategy != saved.strategy or len(plugins) != len(saved.plugins):
        raise ContinueError(f"{saved.source}: does not record its plugins' names, so its state can be taken over by "
                            f"its own strategy ({saved.strategy}) only")
    return [type(plugin).__name__ for plugin in plugins]
