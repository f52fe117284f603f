"""Crash-safe file writes and safe checkpoint loading.

A run killed halfway (Ctrl-C, out of memory, power) must leave either the previous file or the new one, never a
truncated ``results.json`` or ``last.pt``; and loading a checkpoint someone sent you must not run their code.
"""
from __future__ import annotations

import json
import os
import pickle
import secrets
from pathlib import Path
from typing import IO, Any, Callable

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded safely; the message names the file."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one step."""
    data = text.encode("utf-8")
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as strict JSON (no NaN); tensors and numpy values become numbers/lists."""
    text = json.dumps(obj, indent=2, allow_nan=False, default=_to_json) + "\n"
    atomic_write_text(path, text)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that leaves the previous file intact if saving fails."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint of tensors and plain containers; refuse pickled objects, which could run code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message starts with advice to retry with weights_only=False; keep only what it found
        paragraphs = [p for p in str(error).split("\n\n") if p.strip()]
        detail = " ".join(paragraphs[min(1, len(paragraphs) - 1)].split())
        raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors and plain "
                              f"containers, which could run code when unpickled ({detail})") from None
    except FileNotFoundError:
        raise  # callers say what was missing
    except OSError as error:  # torch's zip reader fails on a truncated file with EINVAL, which names no file
        problem = f"{error.strerror}" if error.filename is not None else f"truncated or damaged? {error}"
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: {problem})") from None
    except Exception as error:  # truncated zip, a text file...: torch raises many kinds
        detail = " ".join(str(error).split()) or "the file ends early: empty or truncated?"  # one line
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: {detail})") from None


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 minus umask, like open()
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _to_json(value: Any) -> Any:
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and numpy scalars
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
