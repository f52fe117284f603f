"""Training precision: float32, or mixed precision under autocast where the device computes it natively.

Autocast runs convolutions and matrix products in a 16-bit type and keeps everything else (BatchNorm statistics,
losses, the optimizer's weights and moments) in float32. ``train.precision: auto`` picks, per device:

- CPU: ``bf16`` where the processor has bfloat16 units (AMX tiles or AVX512-BF16, which oneDNN uses), which makes a
  training step faster (docs/studies.md, Training speed), else ``fp32`` (emulated bfloat16 is slower);
- CUDA: ``bf16`` where the GPU supports it (Ampere and later), else ``fp16`` with a gradient scaler
  (``GradientScaler``): float16's range is too narrow for small gradients, which the scaler multiplies before the
  backward pass and divides back before anything reads them;
- MPS: ``fp32``.
"""
from __future__ import annotations

import torch

HALF_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", "fp32", *HALF_TYPES)
"""What ``train.precision`` may be."""


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic units (AMX tiles or AVX512-BF16) that oneDNN uses."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> the precision of ``device`` (module docstring); the others unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu":
        return "bf16" if native_bf16() else "fp32"
    return "fp32"


def autocast(precision: str, device: torch.device | str = "cpu") -> torch.autocast:
    """The autocast context of a resolved ``precision`` (disabled for ``fp32``)."""
    return torch.autocast(torch.device(device).type, dtype=HALF_TYPES.get(precision, torch.bfloat16),
                          enabled=precision in HALF_TYPES)


def to_float(output):
    """A model output (a tensor or a list of tensors) in float32, so losses and metrics never see 16-bit values."""
    if isinstance(output, (list, tuple)):
        return type(output)(to_float(item) for item in output)
    return output.float()


class GradientScaler:
    """torch's gradient scaler for ``fp16``, a pass-through otherwise: ``backward`` scales the loss, then unscales
    the gradients at once, so everything after the backward pass (gradient averaging across processes, clipping,
    plugins) sees true gradients; ``step`` skips an update whose gradients overflowed and adapts the scale."""

    def __init__(self, precision: str, device: torch.device | str) -> None:
        self.enabled = precision == "fp16"
        self._scaler = torch.amp.GradScaler(torch.device(device).type, enabled=self.enabled)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, retain_graph: bool = False) -> None:
        self._scaler.scale(loss).backward(retain_graph=retain_graph)
        if self.enabled:
            self._scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self._scaler.step(optimizer)
        self._scaler.update()
