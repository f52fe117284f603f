"""clmtl: continual multi-task learning for vision on Avalanche.

The Python API (``docs/api.md``)::

    import clmtl
    results = clmtl.run({"tasks": ["seg", "det", "cls"]}, strategy="ewc+replay", out="runs/mine")
    print(results.average_accuracy, results.matrix)

Names are imported when first used, so ``import clmtl`` (and the command line's first error message) stays fast.
"""
import importlib

__version__ = "0.1.0"

_API = {
    "Config": "clmtl.config",
    "load_config": "clmtl.config",
    "run": "clmtl.api",
    "evaluate": "clmtl.api",
    "Results": "clmtl.report.results",
    "build_benchmark": "clmtl.stream.benchmark",
    "from_avalanche": "clmtl.stream.from_avalanche",
    "build_model": "clmtl.builders",
    "build_strategy": "clmtl.builders",
    "make_template": "clmtl.builders",
    "write_report": "clmtl.report.summary",
    "strategies": "clmtl.training.registry",
    "register": "clmtl.training.registry",
    "setting": "clmtl.settings",
}
"""Each public name and the module that defines it (``strategies`` is ``clmtl.training.registry.available``)."""

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'clmtl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), "available" if name == "strategies" else name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
