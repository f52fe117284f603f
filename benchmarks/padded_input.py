"""Permuted MNIST EWC with the first layer drawn as van de Ven & Tolias's padded network draws it.

The paper pads each 28x28 image to 32x32 and permutes 1,024 pixels; clmtl's protocol permutes the 784 real ones. The
240 padded inputs are 0 in every image, so their weights get no gradient and no Fisher, and the one difference left
is the first layer's initial scale: PyTorch draws a ``Linear`` layer's weights and biases from U(-1/sqrt(fan_in),
1/sqrt(fan_in)), 1/32 for 1,024 inputs against 1/28 for 784. This script trains the protocol's EWC cell with a
784-1000-1000-10 MLP of its own (through ``clmtl.run(config, model=...)``) whose first layer is drawn for ``--fan-in``
inputs: the same draws scaled by sqrt(784 / fan_in), so two runs differ in that scale alone.

    python benchmarks/padded_input.py --root DIR --fan-in 784 --out runs/padded_784
    python benchmarks/padded_input.py --root DIR --fan-in 1024 --out runs/padded_1024

Each writes a run report to ``--out`` and prints the average accuracy after the last task.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

PROTOCOL = Path(__file__).parent / "protocols" / "permuted_mnist.yaml"
PIXELS = 28 * 28


def padded_mlp(fan_in: int, seed: int) -> nn.Sequential:
    """The protocol's MLP on 784 pixels, its first layer drawn as a layer of ``fan_in`` inputs would be."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(),
                          nn.Linear(1000, 10))
    with torch.no_grad():
        model[1].weight.mul_((PIXELS / fan_in) ** 0.5)
        model[1].bias.mul_((PIXELS / fan_in) ** 0.5)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="MNIST: DIR/MNIST/raw/ or DIR/{train,val}/<digit>/")
    parser.add_argument("--fan-in", type=int, default=1024, help="inputs the first layer is drawn for (784: clmtl's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fisher-samples", type=int, default=1000, help="images per task for EWC's Fisher")
    parser.add_argument("--iterations", type=int, help="iterations per task instead of the paper's (a quick look)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import clmtl
    from clmtl.errors import ConfigError
    from clmtl.studies.protocols import Protocol, mnist_source

    protocol = Protocol.load(PROTOCOL)
    try:
        config = protocol.config("domain", mnist_source(args.root), args.iterations)
    except ConfigError as error:
        raise SystemExit(f"padded_input: {error}") from None
    strategy, overrides = protocol.strategy_for("ewc", "domain")
    results = clmtl.run(config, strategy, args.out, threads=1, model=padded_mlp(args.fan_in, args.seed),
                        overrides=[*overrides, f"strategy.ewc.fisher_max_samples={args.fisher_samples}",
                                   f"seed={args.seed}"])
    print(f"first layer drawn for {args.fan_in} inputs: average accuracy {results.average_accuracy:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
