"""Experience replay on a stream of heterogeneous tasks: a task-aware memory replayed through each task's own head.

**Memory.** ``mem_size`` samples in all, split over the tasks seen so far (``split``): ``equal`` shares (the
remainder to the oldest tasks, as Avalanche's ``ExperienceBalancedBuffer``) or shares ``proportional`` to each
task's training-set size (largest remainders, ties to the older task). With ``mem_per_class`` instead, each task
keeps that many samples per class its training set shows (``present_classes``), so the memory grows with the stream
and no task is trimmed: the budget of iCaRL and of van de Ven et al. (2022), "100 per class". A task never holds more
than its training set. Within a task, ``selection`` puts the samples in a priority order and the memory keeps its
prefix, so when a new task arrives and quotas shrink every old task is trimmed deterministically by cutting that
prefix shorter:

- ``reservoir``: a random order — Avalanche's ``ReservoirSamplingBuffer`` (random priorities, a resize keeps the
  highest), i.e. a uniform random subset of the task;
- ``class_balanced``: random within each group, groups interleaved round-robin (rarest group first), so every prefix
  is as balanced as the data allows. A classification sample's group is its label; a segmentation or detection
  sample's group is the *rarest class present in it* (rarity = number of the task's training images containing the
  class; segmentation ignores background and void, images with nothing else form one group, as do detection images
  without boxes). Balancing by the rarest class present keeps every class in memory, which balancing by the most
  frequent class would not.

Images are stored as uint8 (``round(x * 255)``, at most 0.5/255 off), segmentation label maps as uint8 too (classes
and the void label 255 fit), boxes and class ids as they come; ``nbytes`` (``memory_bytes`` on the plugin) counts the
stored images and targets (a class id as 8 bytes, the int64 it is batched as). The memory is filled after each
training experience from ``experience.dataset.eval()``: Avalanche's way to drop training augmentation. Augmentation
wrapped *inside* the dataset (``clmtl.data.transforms.JointTransform``) still applies; the dataset is then read under
a forked global RNG seeded from ``seed``, so what is stored is reproducible and training's random stream is untouched.

**Replay.** Each training step replays ``ceil(ratio * B)`` stored samples for a current mini-batch of B, split
equally over the stored tasks (remainder to the oldest), at most ``per_task_cap`` each, drawn without replacement.
Samples of the head being trained (the class and domain scenarios' shared head of a kind) join the mini-batch, as
Avalanche's ``ReplayPlugin`` concatenates them: one forward pass in which BatchNorm normalises old and new samples
together, as evaluation will, and the loss a mean over every sample of the joined batch. Samples of other heads
cannot join it (each head has its own output format and loss: one collate function and one head cannot take label
maps, box lists and class ids at once), so in ``before_backward`` they are replayed in one batch per head h,
forwarded as ``model(x, h)`` and scored by ``strategy._criterion`` (which dispatches on the output's structure):

    loss = L_k + weight * mean_h L_h

The mean over heads keeps the replay term's scale independent of how many tasks are stored: at ``weight`` 1 the old
tasks together count as much as the current one, and each head's term is its own loss's batch mean, at its natural
scale (as the current task's is). In the task scenario every task has its own head, so every old task is replayed
this way. The memory is kept by experience, so a task of the class scenario keeps its quota although it shares its
task label (its head) with every other task of its kind.

**Against Avalanche.** A head's own samples are replayed exactly as Avalanche's concatenated batch is (tested on a
class-incremental stream). For an old task of another head with a model without BatchNorm, Avalanche's
concatenated batch of b current and m memory samples has loss (b L_k + m L_t) / (b + m); ours with
``weight = m / b`` is (b + m) / b times it — the same gradient direction, and the same SGD trajectory with the
learning rate scaled by b / (b + m) (tested, as are our equal quotas against ``ExperienceBalancedBuffer``'s group
sizes). What remains different there: BatchNorm sees each head's batch separately, and the default ``weight`` 1
weighs old tasks by ``weight`` rather than by their share of a mixed batch.

**Why not Avalanche's buffers.** They store ``AvalancheDataset`` subsets, views on the training set that render float
images and rerun augmentation at every access, with no byte count; their random picks come from the global torch
RNG (``torch.rand``) or Python's ``random``, not a seeded generator, so they would shift training's random stream;
and ``ClassBalancedBuffer`` needs an int ``targets`` attribute (segmentation and detection have none) and balances
over all the stream's classes, not within a task's quota. The rules above are theirs, re-stated on our storage in a
few lines, and tested against them. All sampling uses ``torch.Generator``s spawned from ``seed``: one for the
selection, one for the replay draws, so the memory's content does not depend on how many steps were replayed.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from clmtl.settings import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, one_of, setting
from clmtl.stream.experiences import collate_for
from clmtl.stream.tasks import CLASSIFICATION, DETECTION, IGNORE_INDEX, SEGMENTATION
from clmtl.training.plugin import Plugin, joined, task_batch_loss, to_device
from clmtl.training.registry import register

SPLITS = ("equal", "proportional")
SELECTIONS = ("reservoir", "class_balanced")
NO_CLASS = -1
"""Group of a sample with no class to balance on (a detection image without boxes, a background-only map)."""


def split_quotas(total: int, sizes: Sequence[int], policy: str = "equal") -> list[int]:
    """Shares of ``total`` for groups of the given sizes, oldest first; they sum to ``total``.

    ``equal``: ``total // n`` each, the remainder one by one to the oldest groups (Avalanche's group lengths).
    ``proportional``: ``total * size / sum(sizes)`` rounded by largest remainder (ties to the older group).
    """
    if policy == "equal":
        share, extra = divmod(total, len(sizes))
        return [share + (i < extra) for i in range(len(sizes))]
    exact = [total * size / sum(sizes) for size in sizes]
    quotas = [math.floor(value) for value in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def target_kind(target: Any) -> str:
    """The task kind a target belongs to: a class id, a label map or a box dictionary."""
    if isinstance(target, dict):
        return DETECTION
    if isinstance(target, int) or (isinstance(target, torch.Tensor) and target.ndim == 0):
        return CLASSIFICATION
    if isinstance(target, torch.Tensor) and target.ndim == 2:
        return SEGMENTATION
    raise ValueError(f"replay: cannot tell the task kind of a target of type {type(target).__name__}")


def present_classes(target: Any, kind: str) -> set[int]:
    """The classes a sample shows: its label; the foreground classes of its map; the labels of its boxes."""
    if kind == CLASSIFICATION:
        return {int(target)}
    if kind == SEGMENTATION:
        return set(target.unique().tolist()) - {0, IGNORE_INDEX}
    return set(target["labels"].tolist())


def class_balanced_order(targets: Sequence[Any], kind: str, generator: torch.Generator) -> list[int]:
    """Sample indices, random within each group, groups interleaved round-robin (rarest first; see the module doc)."""
    classes = [present_classes(target, kind) for target in targets]
    images_with = Counter(c for present in classes for c in present)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in torch.randperm(len(targets), generator=generator).tolist():
        rarest = min(classes[i], key=lambda c: (images_with[c], c), default=NO_CLASS)
        groups[rarest].append(i)
    queues = sorted(groups.values(), key=len)  # stable: equal sizes keep the first-drawn group first
    return [queue[rank] for rank in range(len(queues[-1])) for queue in queues if rank < len(queue)]


def _quantise(image: torch.Tensor) -> torch.Tensor:
    return image.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def _compact(target: Any, kind: str) -> Any:
    """The target as stored: an int, a uint8 label map, or a copy of the box dictionary."""
    if kind == CLASSIFICATION:
        return int(target)
    if kind == SEGMENTATION:
        if target.min() < 0 or target.max() > 255:
            raise ValueError(f"replay: a segmentation label map holds values outside 0-255 "
                             f"({int(target.min())}..{int(target.max())}); it cannot be stored as uint8")
        return target.to(torch.uint8)
    return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in target.items()}


def _target_bytes(target: Any, kind: str) -> int:
    if kind == CLASSIFICATION:
        return torch.empty((), dtype=torch.int64).element_size()
    if kind == SEGMENTATION:
        return target.nbytes
    return sum(value.nbytes for value in target.values() if isinstance(value, torch.Tensor))


@dataclass
class TaskMemory:
    """One task's stored samples, in priority order (a trim keeps the prefix), and the head they are replayed in."""

    kind: str
    head: int = 0
    images: list[torch.Tensor] = field(default_factory=list)  # uint8 [3, S, S]
    targets: list[Any] = field(default_factory=list)  # compact (see _compact)
    indices: list[int] = field(default_factory=list)  # position of each sample in the task's training set

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        """Sample ``i`` as the dataset served it: float image in [0, 1] and the target in its own kind."""
        target = self.targets[i]
        return self.images[i].float().div_(255), target.long() if self.kind == SEGMENTATION else target

    def samples(self, positions: list[int]) -> list[list[Any]]:
        """The stored samples at ``positions`` as ``[image, target, head]``, what ``collate_for`` batches."""
        return [[*self[i], self.head] for i in positions]

    def trim(self, size: int) -> None:
        del self.images[size:], self.targets[size:], self.indices[size:]

    @property
    def nbytes(self) -> int:
        return sum(image.nbytes for image in self.images) + sum(_target_bytes(t, self.kind) for t in self.targets)


Ranking = Callable[[Dataset, list, int], list[int]]
"""``rank(dataset, targets, quota)``: a task's samples in the order a memory keeps them (at least ``quota`` of them)."""


class TaskBuffer:
    """Memory of ``mem_size`` samples over the tasks seen, or ``mem_per_class`` per class of each, by experience
    (see the module doc)."""

    def __init__(self, mem_size: int, split: str = "equal", selection: str = "reservoir", seed: int = 0,
                 mem_per_class: int | None = None) -> None:
        self.mem_size = mem_size
        self.split = split
        self.selection = selection
        self.mem_per_class = mem_per_class
        self.generator = torch.Generator().manual_seed(seed)
        self.tasks: dict[int, TaskMemory] = {}
        self.train_sizes: dict[int, int] = {}
        self.class_counts: dict[int, int] = {}
        """Classes each stored experience's training set shows (read with ``mem_per_class`` only)."""

    def __len__(self) -> int:
        return sum(len(memory) for memory in self.tasks.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the stored images and targets."""
        return sum(memory.nbytes for memory in self.tasks.values())

    def quotas(self) -> dict[int, int]:
        """Each seen task's share of ``mem_size``, or ``mem_per_class`` times its classes (it stores at most its
        training-set size)."""
        if self.mem_per_class is not None:
            return {experience: self.mem_per_class * count for experience, count in self.class_counts.items()}
        labels = list(self.train_sizes)
        return dict(zip(labels, split_quotas(self.mem_size, [self.train_sizes[t] for t in labels], self.split)))

    def add(self, dataset: Dataset, experience: int, head: int, rank: Ranking | None = None) -> None:
        """Store samples of a new task from its ``[image, target, ...]`` dataset, then trim the older tasks.

        ``rank(dataset, targets, quota)``: the priority order to keep instead of ``selection``'s (iCaRL's herding),
        called with the dataset read as it is stored."""
        if experience in self.train_sizes:
            raise ValueError(f"replay: experience {experience} is already in memory; each experience may come once")
        dataset = dataset.eval() if hasattr(dataset, "eval") else dataset
        self.train_sizes[experience] = len(dataset)
        read_seed = int(torch.randint(2**62, (), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(read_seed)
            memory = TaskMemory(target_kind(dataset[0][1]), head)
            targets = None  # targets only: holding every image of a large training set would not fit
            if self.selection == "class_balanced" or self.mem_per_class is not None or rank is not None:
                targets = [dataset[i][1] for i in range(len(dataset))]
            if self.mem_per_class is not None:
                self.class_counts[experience] = len(set().union(*(present_classes(t, memory.kind) for t in targets)))
            quota = self.quotas()[experience]
            if rank is not None:
                order = rank(dataset, targets, quota)[:quota]
            elif self.selection == "reservoir":
                order = torch.randperm(len(dataset), generator=self.generator)[:quota].tolist()
            else:
                order = class_balanced_order(targets, memory.kind, self.generator)[:quota]
            for i in order:
                image, target = dataset[i][:2]
                memory.images.append(_quantise(image))
                memory.targets.append(_compact(target, memory.kind))
                memory.indices.append(i)
        self.tasks[experience] = memory
        for stored, size in self.quotas().items():
            self.tasks[stored].trim(size)

    def pick(self, experience: int, count: int, generator: torch.Generator) -> list[int]:
        """``count`` distinct stored positions of an experience (fewer if fewer stored)."""
        return torch.randperm(len(self.tasks[experience]), generator=generator)[:count].tolist()

    def draw(self, experience: int, count: int, generator: torch.Generator) -> list[list[Any]]:
        """``count`` distinct samples ``[image, target, head]`` of an experience (fewer if fewer stored)."""
        return self.tasks[experience].samples(self.pick(experience, count, generator))


class MultiTaskReplayPlugin(Plugin, supports_distributed=True):
    """Task-aware replay: a memory shared by the tasks seen, replayed through each task's own head and loss.

    Fills a ``TaskBuffer`` after each experience and adds each stored task's replay loss (see the module doc)."""

    state = ("buffer.tasks", "buffer.train_sizes", "buffer.class_counts", "buffer.generator", "generator", "replayed")
    """The stored samples and both generators (selection, draws), so a resumed run stores and draws the same."""
    transient = ("_pending",)

    def __init__(self, mem_size: int = 200, ratio: float = 0.5, split: str = "equal", selection: str = "reservoir",
                 weight: float = 1.0, per_task_cap: int | None = None, seed: int = 0,
                 mem_per_class: int | None = None) -> None:
        super().__init__()
        selection_seed, draw_seed = (int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(2))
        self.buffer = TaskBuffer(mem_size, split, selection, selection_seed, mem_per_class)
        self.generator = torch.Generator().manual_seed(draw_seed)
        self.ratio = ratio
        self.weight = weight
        self.per_task_cap = per_task_cap
        self.replayed: Counter[int] = Counter()
        """Samples replayed so far, by experience."""
        self._pending: dict[int, list] = {}
        """This step's replay samples of other heads than the one trained, by head: [kind, samples]."""

    @property
    def memory_bytes(self) -> int:
        """Bytes the memory holds (uint8 images plus targets), for a run to report."""
        return self.buffer.nbytes

    def replay_sizes(self, batch_size: int, experiences: Sequence[int]) -> list[int]:
        """Replay batch size of each stored experience for a current mini-batch of ``batch_size``."""
        sizes = split_quotas(math.ceil(self.ratio * batch_size), [1] * len(experiences))
        return [size if self.per_task_cap is None else min(size, self.per_task_cap) for size in sizes]

    def stats(self) -> dict[str, dict[str, int]]:
        """What results.json records of this plugin: samples stored and replayed per experience (keyed by the
        experience's index as text, as JSON keys are, so results read back equal the run's)."""
        return {"stored": {str(experience): len(memory) for experience, memory in self.buffer.tasks.items()},
                "replayed": {str(experience): count for experience, count in self.replayed.items()}}

    def stored_before(self, strategy) -> list[int]:
        """The experiences with samples in memory, other than the one being trained."""
        current = strategy.experience.current_experience
        return [e for e, memory in self.buffer.tasks.items() if e != current and len(memory)]

    def after_training_exp(self, strategy, **kwargs) -> None:
        experience = strategy.experience
        self.buffer.add(experience.dataset, experience.current_experience, experience.task_label)

    def before_forward(self, strategy, **kwargs) -> None:
        """Draw this step's replay samples: those of the head being trained join the mini-batch, the others wait for
        ``before_backward`` in one batch per head."""
        self._pending = {}
        stored = self.stored_before(strategy)
        if not stored:
            return
        batches: dict[int, list] = {}  # by head: experiences that share a head are replayed in one batch
        for experience, size in zip(stored, self.replay_sizes(len(strategy.mb_x), stored)):
            if size:
                memory = self.buffer.tasks[experience]
                drawn = self.buffer.draw(experience, size, self.generator)
                batches.setdefault(memory.head, [memory.kind, []])[1].extend(drawn)
                self.replayed[experience] += len(drawn)
        head = strategy.experience.task_label
        if head in batches:
            kind, samples = batches.pop(head)
            strategy.mbatch = joined(strategy.mbatch, to_device(collate_for(kind)(samples), strategy.device))
        self._pending = batches

    def before_backward(self, strategy, **kwargs) -> None:
        losses = [task_batch_loss(strategy, collate_for(kind)(samples), head)
                  for head, (kind, samples) in self._pending.items()]
        self._pending = {}
        if losses:
            strategy.loss += self.weight * torch.stack(losses).mean()



@dataclass(frozen=True)
class MemorySettings:
    """What a memory of stored samples and its draws take (``replay``, ``der``, ``derpp``)."""

    mem_size: int = setting(200, AT_LEAST_ONE, help="samples stored over all tasks", search=(100, 200, 400))
    ratio: float = setting(0.5, POSITIVE, help="replayed samples per current sample in a step")
    split: str = setting("equal", one_of(*SPLITS), help="how the memory is shared between tasks")
    selection: str = setting("reservoir", one_of(*SELECTIONS), help="which samples of a task are kept")
    per_task_cap: int | None = setting(None, AT_LEAST_ONE, help="at most this many samples of a task per step")
    seed: int = setting(0, NON_NEGATIVE, help="seed of the selection and of the draws")
    mem_per_class: int | None = setting(None, AT_LEAST_ONE, help="instead of mem_size: this many samples per class "
                                        "of each task, the memory growing with the stream")


@dataclass(frozen=True)
class ReplaySettings(MemorySettings):
    """Replay's hyperparameters, ``strategy.replay.<key>`` (module docstring)."""

    weight: float = setting(1.0, NON_NEGATIVE, help="weight of the replay loss of other heads")


register("replay", settings=ReplaySettings, acts_on=("data", "loss"))(MultiTaskReplayPlugin)
