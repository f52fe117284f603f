"""How long a protocol's training takes in clmtl against the plainest PyTorch loop that does the same arithmetic.

The floor is the paper's network trained in a bare loop (Adam steps at the protocol's batch size, one thread, on
tensors already in memory: no data pipeline, evaluation, plugins or bookkeeping). Beside it, in the same process and
on the same data size, clmtl trains the protocol's naive cell for the same number of steps (``--iterations`` per
task; its first scenario). The ratio of the two, times the floor of the full budget, projects the whole protocol
(every scenario, method and seed of its file) on ``--cores`` cores::

    python benchmarks/protocol_floor.py --protocol split_mnist_2019 --root DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

PROTOCOLS = Path(__file__).parent / "protocols"
SEEDS = 5
WARMUP = 20


def floor_seconds(hidden: Sequence[int], inputs: int, classes: int, batch: int, lr: float, steps: int) -> float:
    """Seconds of ``steps`` Adam steps of the MLP on one thread, fed from memory (after a few unclocked ones)."""
    from clmtl.models.classifier import mlp

    torch.manual_seed(0)
    body, width = mlp(inputs, hidden)  # the network clmtl trains, without its heads' task dispatch
    model = torch.nn.Sequential(body, torch.nn.Linear(width, classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.rand(batch, inputs), torch.randint(0, classes, (batch,))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(steps + WARMUP):
            if step == WARMUP:
                start = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", required=True, help="a file of benchmarks/protocols/ (its stem)")
    parser.add_argument("--root", type=Path, required=True, help="MNIST, as reproduce.py --root")
    parser.add_argument("--iterations", type=int, default=200, help="iterations per task timed (default 200)")
    parser.add_argument("--cores", type=int, default=2, help="trainings at once for the projection (default 2)")
    args = parser.parse_args(argv)

    from clmtl.errors import ConfigError
    from clmtl.studies.protocols import Protocol, mnist_source, train_clmtl

    protocol = Protocol.load(PROTOCOLS / f"{args.protocol}.yaml")
    try:
        data = mnist_source(args.root)
    except ConfigError as error:
        print(f"protocol_floor: {error}", file=sys.stderr)
        return 1
    steps = protocol.tasks * args.iterations
    with tempfile.TemporaryDirectory() as scratch:
        config = protocol.config(protocol.scenarios[0], data, args.iterations)
        train_clmtl(config, "naive", [], 0, Path(scratch))
        results = json.loads((Path(scratch) / "results.json").read_text())
    floor = floor_seconds(protocol.hidden, protocol.image_size**2 * protocol.channels, 10, protocol.batch_size,
                          protocol.lr, steps)
    training, total = sum(results["train_seconds"].values()), results["total_seconds"]
    full = floor * protocol.iterations / args.iterations
    trainings = len(protocol.scenarios) * len(protocol.methods) * SEEDS
    print(f"{protocol.name}, {steps} steps ({args.iterations} per task): floor {floor:.1f} s; clmtl naive "
          f"{training:.1f} s training ({training / floor:.2f}x), {total:.1f} s in all ({total / floor:.2f}x)")
    print(f"full budget ({protocol.iterations} per task): floor {full:.0f} s per training; {trainings} trainings "
          f"({SEEDS} seeds) on {args.cores} cores: floor {trainings * full / args.cores / 60:.0f} min, clmtl naive "
          f"pace {trainings * full * total / floor / args.cores / 60:.0f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
