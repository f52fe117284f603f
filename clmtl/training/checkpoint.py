"""Run checkpoints: everything an interrupted run needs to continue as if it had never stopped.

A run checkpoint is written after every experience (``OUT/checkpoints/exp{k}.pt``, with ``last.pt`` a hard link to
the newest, each written atomically), and with ``output.checkpoint_every=N`` also every N training iterations and
when a stop is requested (SIGTERM, Ctrl-C: ``StopRequest``), as ``partial.pt`` with ``last.pt`` pointing at it.
It holds only tensors and plain containers, so it loads with ``weights_only=True`` (Avalanche's own
``save_checkpoint`` pickles the whole strategy with dill): the model's state dict, every plugin's declared state
(EWC's θ* and Fisher, the replay buffer, the LwF teacher, per-task BatchNorm...: ``clmtl.training.plugin_state``), the
template's clock (EWC and layerlr read the experience counter from it), the random-number generators' states, the
accuracy matrix and scores so far, the baselines, the config and the strategy.

Resuming rebuilds the benchmark, model, plugins and template from the saved config, loads all of that, and goes on
with the next experience. The optimizer is rebuilt fresh at every experience (``train.reset_optimizer``), or, when
one state runs through the stream, starts from the state the checkpoint keeps by parameter name; each experience
draws from its own random stream (``clmtl.training.seeding``); so a resumed run reproduces the uninterrupted one
exactly on CPU. A partial checkpoint also holds the position inside the experience
(``MultiTaskTemplate.position``: epoch, iteration, optimizer state, the generators at the start of the epoch and
now); resuming finishes that experience from there, the same way. Without one, work inside an unfinished
experience is redone from its start.
"""
from __future__ import annotations

import os
import random
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clmtl.config import load_config
from clmtl.io import atomic_torch_save, load_checkpoint
from clmtl.stream.tasks import TaskSpec
from clmtl.training.plugin import Plugin, StateError, to_device


@dataclass
class StreamProgress:
    """What the stream has given so far, which a checkpoint carries to a resumed run."""

    matrix: list[list[float | None]] = field(default_factory=list)
    """``matrix[i][j]``: task j's primary metric after experience i."""
    scores: list[dict[str, float] | None] = field(default_factory=list)
    """Every metric of each task after the last finished experience."""
    train_seconds: dict[str, float] = field(default_factory=dict)
    random_init: list[float | None] = field(default_factory=list)
    """Each task's primary metric for the model as initialised (forward transfer's reference)."""
    finished: int = -1
    """The last experience trained and evaluated."""


@dataclass(kw_only=True)
class ModelCheckpoint:
    """What using a trained model needs of a run checkpoint (``clmtl eval``, ``clmtl export``): its weights, the
    config that describes it, the stream's tasks and the tensors that differ per task (``task_model_states``)."""

    model: dict[str, torch.Tensor]
    config: dict[str, Any]
    task_entries: list[dict[str, Any]] | None = None
    """The stream's tasks as ``TaskSpec.as_dict`` entries (None in a checkpoint written without them)."""
    task_states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    source: str = "checkpoint"
    """Where it was read from, for the errors its entries raise."""

    @property
    def tasks(self) -> list[TaskSpec] | None:
        """The tasks, checked when read: ``clmtl eval`` rebuilds them from the config and never needs these."""
        return None if self.task_entries is None else checkpoint_tasks(self.task_entries, self.source)

    @classmethod
    def from_dict(cls, saved: Any, source: str | Path) -> ModelCheckpoint:
        if not isinstance(saved, Mapping) or "model" not in saved or "config" not in saved:
            raise ValueError(f"{source}: not a clmtl run checkpoint (expected 'model' and 'config' entries)")
        return cls(model=saved["model"], config=saved["config"], task_entries=saved.get("tasks"),
                   task_states=saved.get("task_states", {}), source=str(source))


@dataclass(kw_only=True)
class RunCheckpoint(ModelCheckpoint):
    """Everything a run needs to go on from where it stopped; written as plain containers of tensors
    (``to_dict``), so it loads with ``weights_only=True``."""

    strategy: str
    progress: StreamProgress
    baselines: dict[str, dict] | None
    """The single-task baselines' ``scores`` and ``seconds``; None until they are trained."""
    plugins: list[dict | None]
    """Each plugin's declared state (``plugin_states``)."""
    clock: dict[str, int]
    rng: dict[str, Any]
    partial: dict[str, Any] | None = None
    """The template's position inside the experience after ``progress.finished`` (``partial.pt``), else None."""
    plugin_names: list[str] = field(default_factory=list)
    """Each plugin's class name, so a continuation with another strategy knows whose state is whose (empty in a
    checkpoint written before they were recorded)."""
    lineage: dict[str, Any] | None = None
    """A continued run's parent (``clmtl.deploy.continuation.Lineage``), else None."""
    optimizer: dict[str, dict[str, Any]] | None = None
    """The optimizer's state by parameter name after the last finished experience, when one state runs through the
    stream (``train.reset_optimizer=false``; ``MultiTaskTemplate.optimizer_state``), else None."""

    ENTRIES = ("model", "config", "tasks", "strategy", "experience", "matrix", "scores", "plugins", "clock", "rng")

    def to_dict(self) -> dict[str, Any]:
        progress = self.progress
        saved = {"model": self.model, "config": self.config, "tasks": self.task_entries,
                 "task_states": self.task_states, "strategy": self.strategy, "experience": progress.finished,
                 "matrix": progress.matrix, "scores": progress.scores, "random_init": progress.random_init,
                 "train_seconds": progress.train_seconds, "baselines": self.baselines, "plugins": self.plugins,
                 "clock": self.clock, "rng": self.rng, "plugin_names": self.plugin_names, "lineage": self.lineage,
                 "optimizer": self.optimizer}
        return saved if self.partial is None else {**saved, "partial": self.partial}

    @classmethod
    def from_dict(cls, saved: Any, source: str | Path) -> RunCheckpoint:
        missing = [key for key in cls.ENTRIES if not isinstance(saved, Mapping) or key not in saved]
        if missing:
            raise ResumeError(f"{source}: not a resumable clmtl run checkpoint (missing {', '.join(missing)})")
        progress = StreamProgress(saved["matrix"], saved["scores"], saved.get("train_seconds", {}),
                                  saved.get("random_init", [None] * len(saved["tasks"])), saved["experience"])
        return cls(model=saved["model"], config=saved["config"], task_entries=saved["tasks"],
                   task_states=saved.get("task_states", {}), source=str(source), strategy=saved["strategy"],
                   progress=progress, baselines=saved.get("baselines"), plugins=saved["plugins"],
                   clock=saved["clock"], rng=saved["rng"], partial=saved.get("partial"),
                   plugin_names=saved.get("plugin_names", []), lineage=saved.get("lineage"),
                   optimizer=saved.get("optimizer"))

    def inside_experience(self, position: dict[str, Any]) -> RunCheckpoint:
        """This checkpoint, taken at ``position`` inside the experience after the last finished one. The position
        holds the optimizer's state as it is there, so ``optimizer`` (the state after a finished experience) is not
        kept twice."""
        return replace(self, partial=position, optimizer=None)


class ResumeError(ValueError):
    """A run cannot be resumed from what its folder holds; the message says why."""


class StopRequested(KeyboardInterrupt):
    """Training stopped at the end of an iteration because its ``StopRequest`` was set (by a signal handler)."""


class StopRequest:
    """Asks training to checkpoint and stop after the current iteration; ``request`` is safe in a signal handler.

    The command line makes one and hands it to ``clmtl.runner.run``, which hands it to the template.
    """

    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        self.requested = True


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and every CUDA device) generator states as tensors and plain values."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    return {"python": [version, list(python_state), python_gauss],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    version, python_state, python_gauss = state["python"]
    random.setstate((version, tuple(python_state), python_gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def clock_state(clock: Any) -> dict[str, int]:
    """The integer counters of Avalanche's training clock."""
    return {name: value for name, value in vars(clock).items() if isinstance(value, int)}


def set_clock_state(clock: Any, state: dict[str, int]) -> None:
    """Put Avalanche's training clock back to the counters ``clock_state`` saved."""
    for name, value in state.items():
        setattr(clock, name, value)


def plugin_states(plugins: list) -> list[dict | None]:
    """Each plugin's ``state_dict()``: its declared state; None for a plain Avalanche plugin and for one that cannot
    be resumed. A plugin holding tensors in undeclared attributes raises ``StateError`` before anything is written."""
    return [plugin.state_dict() if isinstance(plugin, Plugin) else None for plugin in plugins]


def task_model_states(plugins: list) -> dict[int, dict[str, torch.Tensor]]:
    """Model tensors that differ per task (``bnfreeze per_task``'s BatchNorm), by task label, from every plugin's
    ``task_model_states()``. Checkpoints keep them beside the model, so ``clmtl eval`` can run each task with its own
    (``load_task_state``)."""
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for plugin in plugins:
        for task, tensors in (plugin.task_model_states() if isinstance(plugin, Plugin) else {}).items():
            merged.setdefault(task, {}).update(tensors)
    return merged


@torch.no_grad()
def load_task_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy one task's entry of ``task_model_states`` into ``model``."""
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ValueError(f"task state names tensors the model does not have: {unknown[:5]}")
    for name, value in tensors.items():
        own[name].copy_(value)


def check_resumable(plugins: list) -> None:
    """Refuse, in one line, a plugin whose state a checkpoint does not hold: a plain Avalanche plugin, or a
    ``clmtl.training.plugin.Plugin`` that says why it cannot resume (``no_resume``)."""
    for plugin in plugins:
        if isinstance(plugin, Plugin) and plugin.no_resume:
            raise ResumeError(f"plugin {type(plugin).__name__} cannot be resumed: {plugin.no_resume}")
        if not isinstance(plugin, Plugin):
            raise ResumeError(f"plugin {type(plugin).__name__} is not a clmtl.training.plugin.Plugin, so its state "
                              "cannot be restored; subclass Plugin and declare its state (clmtl.training.plugin)")


def restore_plugins(plugins: list, states: list[dict | None], model: torch.nn.Module) -> None:
    if len(states) != len(plugins):
        raise ResumeError(f"the checkpoint holds {len(states)} plugin states for {len(plugins)} plugins")
    check_resumable(plugins)
    for plugin, state in zip(plugins, states):
        if state is None:
            raise ResumeError(f"the checkpoint holds no state of plugin {type(plugin).__name__}")
        try:
            plugin.load_state_dict(state, model)
        except StateError as error:
            raise ResumeError(str(error)) from None


PARTIAL = "partial.pt"


def save_run_checkpoint(checkpoint: RunCheckpoint, checkpoint_dir: Path) -> Path:
    """Write ``exp{k}.pt`` (``partial.pt`` for a checkpoint inside an experience) atomically, then point ``last.pt``
    at it (one serialisation, atomic link). A finished experience's checkpoint replaces the partial one."""
    experience = None if checkpoint.partial is not None else checkpoint.progress.finished
    path = checkpoint_dir / (PARTIAL if experience is None else f"exp{experience}.pt")
    atomic_torch_save(to_device(checkpoint.to_dict(), "cpu"), path)  # loads anywhere: the run moves what it needs
    link = checkpoint_dir / f".last.pt.{secrets.token_hex(4)}.tmp"
    os.link(path, link)
    os.replace(link, checkpoint_dir / "last.pt")
    if experience is not None:
        (checkpoint_dir / PARTIAL).unlink(missing_ok=True)
    return path


def load_model_checkpoint(path: str | Path) -> ModelCheckpoint:
    """A checkpoint ``clmtl run`` wrote (``exp{k}.pt`` or ``last.pt``): at least the model's state and its config."""
    return ModelCheckpoint.from_dict(load_checkpoint(path), path)


def checkpoint_config(saved: ModelCheckpoint, source: str | Path, config_file: str | Path | None = None,
                      overrides: Sequence[str] = ()):
    """The config a checkpoint was trained with, validated, with an optional file and overrides on top."""
    return load_config(config_file, overrides, base=saved.config, base_source=f"{source} (saved config)")


def checkpoint_tasks(entries: Any, source: str | Path) -> list[TaskSpec]:
    """The tasks of a checkpoint's ``tasks`` entry (``TaskSpec.as_dict`` entries), checked: a malformed one raises
    ``ValueError`` in one line naming ``source`` and the entry, instead of a ``KeyError`` or ``TypeError`` later."""
    if not isinstance(entries, list) or not entries:
        got = "an empty list" if isinstance(entries, list) else type(entries).__name__
        raise ValueError(f"{source}: 'tasks' must be a non-empty list of task entries, got {got}")
    optional = {"category_ids": int, "labels": int}
    tasks = []
    for position, entry in enumerate(entries):
        where = f"{source}: tasks[{position}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping, got {type(entry).__name__} {entry!r}")
        missing = [key for key in ("name", "kind", "classes") if key not in entry]
        if missing:
            raise ValueError(f"{where} has no {', '.join(map(repr, missing))}")
        for key in ("name", "kind"):
            if not isinstance(entry[key], str):
                raise ValueError(f"{where}.{key} must be a string, got {entry[key]!r}")
        lists = {"classes": str, **{key: kind for key, kind in optional.items() if entry.get(key) is not None}}
        for key, kind in lists.items():
            values = entry[key]
            if not isinstance(values, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
                raise ValueError(f"{where}.{key} must be a list of {kind.__name__}, got {values!r}")
        head = entry.get("head", position)
        if head is not None and (not isinstance(head, int) or isinstance(head, bool) or head < 0):
            raise ValueError(f"{where}.head must be a head index (int >= 0), got {head!r}")
        try:
            tasks.append(TaskSpec.from_dict(entry, position))
        except ValueError as error:  # unknown kind, no class, lengths that differ: TaskSpec's own one line
            raise ValueError(f"{where}: {error}") from None
    return tasks


def load_run_checkpoint(out_dir: str | Path) -> RunCheckpoint:
    """The newest checkpoint of the run in ``out_dir``, checked to be one clmtl wrote."""
    path = Path(out_dir) / "checkpoints" / "last.pt"
    if not path.exists():
        raise ResumeError(f"{out_dir}: no checkpoints/last.pt to resume from")
    return RunCheckpoint.from_dict(load_checkpoint(path), path)
