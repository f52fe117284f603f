"""Scenarios: which output space (head) of the model each task uses, and where its classes sit in it.

The three scenarios of van de Ven & Tolias (2019, "Three scenarios for continual learning"):

- ``task``: the task label is known at training and test time; every task owns a head (multi-head).
- ``class``: no task label at test time; the tasks of one kind share one head whose classes grow, old classes kept
  and each task's new ones appended, so a prediction is over every class seen so far. A segmentation head starts
  with background, which every segmentation task shares (classes a task does not cover are background in its labels,
  the MiB/PLOP protocol); other classes may belong to one task only.
- ``domain``: no task label at test time; the tasks of one kind have the same classes and share one head.

In a stream of mixed kinds the kind still routes an image to its head: an image's head is known from its kind alone
in the class and domain scenarios, from its task in the task scenario. The head index is also the experience's
Avalanche task label, so a stream of classification tasks in the class scenario carries task label 0 throughout,
as Avalanche's own class-incremental benchmarks do.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from clmtl.errors import ConfigError
from clmtl.stream.tasks import DETECTION, SEGMENTATION, OutputSpace, TaskSpec, short_kind

SCENARIOS = ("task", "class", "domain")
"""van de Ven & Tolias (2019): task labels at test time (task), none and one growing output space per kind
(class), none and the same classes in every task (domain)."""


def plan_stream(tasks: Sequence[TaskSpec], scenario: str, positional: bool = False) -> list[TaskSpec]:
    """``tasks`` with ``head`` and ``labels`` set for ``scenario``; refuses streams the scenario cannot hold.

    ``positional`` (the domain scenario of a ``split:`` stream, van de Ven's domain-incremental Split MNIST) shares
    the heads by class position: class ``i`` of every task is output ``i``, whatever its name.
    """
    if scenario not in SCENARIOS:
        raise ConfigError(f"scenario: must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    if scenario == "task":
        return [replace(task, head=index, labels=None) for index, task in enumerate(tasks)]
    heads = list(dict.fromkeys(task.kind for task in tasks))  # one head per kind, in order of first appearance
    planned, first_of_kind, space_classes = [], {}, {}
    for task in tasks:
        head = heads.index(task.kind)
        first = first_of_kind.setdefault(task.kind, task)
        if scenario == "domain":
            same = len(task.classes) == len(first.classes) if positional else task.classes == first.classes
            if not same:
                raise ConfigError(f"scenario domain: tasks {first.name!r} and {task.name!r} ({task.kind}) have "
                                  f"different classes {list(first.classes)} and {list(task.classes)}; every task "
                                  "of a kind must have the same classes")
            planned.append(replace(task, head=head, labels=None))
            continue
        seen = space_classes.setdefault(task.kind, {})  # class name -> (label, task that brought it)
        own = list(enumerate(task.classes))
        labels = [0] if task.kind == SEGMENTATION else []
        if task.kind == SEGMENTATION:
            own = own[1:]  # background is label 0 of every segmentation task and of the shared head
            seen.setdefault(task.classes[0], (0, task.name))
        for _, name in own:
            if name in seen and seen[name][1] != task.name:
                raise ConfigError(f"scenario class: tasks {seen[name][1]!r} and {task.name!r} ({task.kind}) both "
                                  f"have class {name!r}; in the class scenario each class belongs to one task")
            seen[name] = (len(seen), task.name)
            labels.append(seen[name][0])
        planned.append(replace(task, head=head, labels=tuple(labels)))
    return planned


def placed(tasks: Sequence[TaskSpec]) -> list[TaskSpec]:
    """``tasks`` with every task in a head: as planned, or, for tasks not placed yet, one head each by position."""
    if all(task.head is not None for task in tasks):
        return list(tasks)
    return plan_stream(tasks, "task")


def output_spaces(tasks: Sequence[TaskSpec]) -> list[OutputSpace]:
    """The heads a stream uses, by head index: each one's classes in label order, from its tasks (``placed``)."""
    tasks = placed(tasks)
    count = max(task.head for task in tasks) + 1
    spaces = []
    for head in range(count):
        members = [task for task in tasks if task.head == head]
        if not members:
            raise ValueError(f"no task uses head {head}; heads must be numbered 0, 1, ... by the tasks")
        kinds = {task.kind for task in members}
        if len(kinds) > 1:
            raise ValueError(f"head {head} is shared by tasks of different kinds {sorted(kinds)}")
        size = max(label for task in members for label in task.labels) + 1
        names: list[str | None] = [None] * size
        ids: list[int | None] = [None] * size
        for task in members:
            for local, label in enumerate(task.labels):
                names[label] = names[label] or task.classes[local]
                if task.category_ids is not None:
                    ids[label] = task.category_ids[local]
        if positional_names := _positional(members):
            names = positional_names
        kind = members[0].kind
        has_ids = kind == DETECTION and all(i is not None for i in ids)
        spaces.append(OutputSpace(kind, tuple(str(n) for n in names), tuple(ids) if has_ids else None,
                                  max(members[0].labels) + 1,
                                  members[0].name if len(members) == 1 else short_kind(kind)))
    return spaces


def _positional(members: Sequence[TaskSpec]) -> list[str] | None:
    """Names of a head shared by position (domain scenario of a split): each output named by its classes, joined."""
    if len({task.labels for task in members}) > 1 or len({task.classes for task in members}) == 1:
        return None  # not shared by position, or by classes of the same names
    return ["/".join(dict.fromkeys(task.classes[i] for task in members)) for i in range(len(members[0].classes))]


def require_own_heads(strategy: str, tasks: Sequence[TaskSpec]) -> None:
    """Refuse a strategy that keeps something per task label (a route, BatchNorm statistics) on a stream whose tasks
    share heads: it would need to know the task at test time, which the class and domain scenarios do not give."""
    heads = [task.head for task in tasks]
    shared = sorted({head for head in heads if heads.count(head) > 1})
    if shared:
        names = [task.name for task in tasks if task.head == shared[0]]
        raise ConfigError(f"strategy {strategy} keeps state per task and needs the task at test time; tasks "
                          f"{', '.join(names)} share head {shared[0]} (scenario class or domain): use scenario task")
