"""Training precision on CPU: float32, or bfloat16 autocast where the processor computes bfloat16 natively.

Autocast runs convolutions and matrix products in bfloat16 and keeps everything else (BatchNorm statistics, losses,
the optimizer's weights and moments) in float32, as mixed-precision training does on GPUs. On a CPU with AMX or
AVX512-BF16 units (this project's machine: a Xeon with AMX) a training step is 12-25 % faster than in float32 (docs/studies.md,
Training speed); on one without them bfloat16 is emulated and slower than float32, which is why ``auto`` checks.
"""
from __future__ import annotations

import torch

from clmtl.config import PRECISIONS


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic units (AMX tiles or AVX512-BF16) that oneDNN uses."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on a CPU with native bfloat16, else ``fp32``; the others unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str = "cpu") -> torch.autocast:
    """The autocast context of a resolved ``precision`` (disabled for ``fp32``)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def to_float(output):
    """A model output (a tensor or a list of tensors) in float32, so losses and metrics never see bfloat16."""
    if isinstance(output, (list, tuple)):
        return type(output)(to_float(item) for item in output)
    return output.float()
