"""Data-parallel training over several processes, started by ``torchrun``.

``torchrun --nproc_per_node=N -m clmtl run ...`` starts N copies of the run. Each process holds the whole model;
every global training batch (``train.batch_size``) is split between them, their gradients are averaged after each
backward pass, evaluation is sharded and the metrics are merged across processes, and only rank 0 writes outputs.

Why not ``DistributedDataParallel``: its gradient reducer accepts parameters only through the wrapped module's
``forward``. EWC's penalty, replay's extra per-task passes and LwF's distillation all use parameters outside it, and
DDP then stops with "Expected to mark a variable ready only once" (torch 2.14, gloo). Averaging the
gradients once after ``backward`` gives the same update whatever the plugins do, at the cost of not overlapping the
communication with the backward pass (one all-reduce of the flattened gradients per step).

Avalanche's ``DistributedHelper`` initialises the process group (NCCL on CUDA, gloo on the CPU) and carries the
collectives. Its data loaders add a ``DistributedSampler`` that pads the evaluation set with repeated samples (so
metrics would count some images twice) and is never told the epoch (the same order every epoch); clmtl shards
batches itself instead (``ShardedBatchSampler``, ``shard_bounds``).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
from avalanche.distributed import DistributedHelper
from torch import nn
from torch.utils.data import Sampler

from clmtl.training.checkpoint import plugin_states
from clmtl.training.plugin import to_device


def launched_by_torchrun() -> bool:
    """True in a process torchrun started as one of several."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(seed: int, device: torch.device) -> None:
    """Join the process group torchrun describes, once per process: NCCL when training on CUDA (each process on the
    GPU of its ``LOCAL_RANK``), gloo on the CPU."""
    if DistributedHelper.is_distributed:
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    DistributedHelper.init_distributed(seed, backend="nccl" if cuda else "gloo", use_cuda=cuda)


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def shard_bounds(length: int, shard: int, shards: int) -> tuple[int, int]:
    """Start and stop of ``shard``'s contiguous slice of ``range(length)``; earlier shards take the remainder.

    Contiguous slices keep each process's samples in dataset order, so merged per-image results keep the ids a
    single process would give them.
    """
    size, extra = divmod(length, shards)
    start = shard * size + min(shard, extra)
    return start, start + size + (1 if shard < extra else 0)


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank 0 draws each epoch's global batches; every process takes its share ``batch[rank::world]`` of each.

    The global batches come from the sampler one process would use, so together the N processes train on whole
    batches of ``train.batch_size``. In the first epoch they are exactly one process's batches; later epochs are
    drawn from rank 0's generator, which augmentation has advanced less (each process augments only its share).
    Drawing on rank 0 and broadcasting keeps the processes in step although their generators drift apart. A last
    batch with fewer samples than processes is dropped, since some process would get none.
    """

    def __init__(self, batches: Sampler[list[int]], shard: int, shards: int) -> None:
        self.batches, self.shard, self.shards = batches, shard, shards

    def __iter__(self) -> Iterator[list[int]]:
        epoch = DistributedHelper.broadcast_object(list(self.batches) if self.shard == 0 else None)
        for batch in epoch:
            if len(batch) >= self.shards:
                yield batch[self.shard :: self.shards]

    def __len__(self) -> int:
        return len(self.batches)


def average_gradients(model: nn.Module) -> None:
    """Replace every trainable parameter's gradient by its mean over the processes (a missing one counts as 0)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)  # views of one buffer, as DDP's gradient buckets are
        offset += p.numel()


def average_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the processes.

    Each process updates them from its own half of the batch; the average is close to what one process would track
    over the whole batch, and it makes every process evaluate with the same model.
    """
    for buffer in model.buffers():
        if buffer.is_floating_point():
            torch.distributed.all_reduce(buffer)
            buffer /= world_size()


def broadcast_plugin_states(plugins: Sequence, model: nn.Module) -> None:
    """Give every process rank 0's plugin states (EWC's Fisher, replay buffers...), which rank 0 also checkpoints.

    They travel on the CPU, as in a checkpoint: a tensor pickled on rank 0's GPU would be unpickled onto that same GPU
    by every process; each puts them back on its own device (``clmtl.training.plugin_state``)."""
    states = DistributedHelper.broadcast_object(to_device(plugin_states(plugins), "cpu") if is_main_process() else None)
    if not is_main_process():
        for plugin, state in zip(plugins, states):
            if state is not None:
                plugin.load_state_dict(state, model)


def gather(obj):
    """``obj`` from every process, in rank order."""
    return DistributedHelper.gather_all_objects(obj)
