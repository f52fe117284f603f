"""Layers only look down: the data, the models and the strategies know nothing of the run's config.

Each module's imports are read with ``ast`` (also those inside functions, which run later but still depend), and
followed through clmtl's own modules, so a lower module that reaches the config through another one fails too.
"""
import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"clmtl.strategies": ROOT / "strategies", "clmtl": ROOT / "clmtl"}
"""Where each package of the repository lives (setup.cfg's ``package_dir``); longest prefix first."""

LOWER_LAYERS = ("clmtl.data", "clmtl.models", "clmtl.strategies")
RUN_CONFIG = "clmtl.config"


def module_file(name: str) -> Path | None:
    """The file of module ``name`` in this repository (a package's ``__init__.py``), or None."""
    for prefix, folder in PACKAGE_DIRS.items():
        if name == prefix or name.startswith(prefix + "."):
            path = folder.joinpath(*name[len(prefix):].lstrip(".").split(".")) if name != prefix else folder
            if path.with_suffix(".py").is_file():
                return path.with_suffix(".py")
            if (path / "__init__.py").is_file():
                return path / "__init__.py"
    return None


def module_name(path: Path) -> str:
    for prefix, folder in PACKAGE_DIRS.items():
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            return ".".join([prefix, *[part for part in parts if part != "__init__"]])
    raise ValueError(path)


@functools.cache
def imported(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere in its body, parent packages included (importing ``a.b.c`` runs
    ``a`` and ``a.b`` first); ``from a import b`` counts ``a.b`` when it is a module."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}"))
    return {".".join(name.split(".")[:end]) for name in names for end in range(1, name.count(".") + 2)}


def path_to(start: str, target: str) -> list[str] | None:
    """The chain of clmtl modules by which importing ``start`` imports ``target`` (None: it does not)."""
    chains, seen = [[start]], {start}
    while chains:
        chain = chains.pop(0)
        if chain[-1] == target or chain[-1].startswith(target + "."):
            return chain
        file = module_file(chain[-1])
        for name in sorted(imported(file)) if file else ():
            if name not in seen and (module_file(name) or name == target):
                seen.add(name)
                chains.append([*chain, name])
    return None


def lower_modules() -> list[str]:
    return sorted({module_name(path) for layer in LOWER_LAYERS
                   for path in module_file(layer).parent.rglob("*.py")})


def test_the_walk_sees_imports_inside_functions_relative_ones_and_chains(tmp_path, monkeypatch):
    """The checker itself: a module that imports the config only inside a function, or through another module, or
    relatively, is caught; one that does not is not."""
    package = tmp_path / "clmtl"
    (package / "data").mkdir(parents=True)
    for name, text in {"__init__.py": "", "config.py": "", "plain.py": "import os\n",
                       "middle.py": "def late():\n    from clmtl.config import Config\n",
                       "data/__init__.py": "", "data/lazy.py": "def f():\n    import clmtl.config\n",
                       "data/chained.py": "from clmtl import middle\n", "data/relative.py": "from .. import config\n",
                       "data/clean.py": "from clmtl import plain\nfrom . import clean\n"}.items():
        (package / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIRS", {"clmtl": package})
    imported.cache_clear()
    assert path_to("clmtl.data.lazy", RUN_CONFIG) == ["clmtl.data.lazy", RUN_CONFIG]
    assert path_to("clmtl.data.chained", RUN_CONFIG) == ["clmtl.data.chained", "clmtl.middle", RUN_CONFIG]
    assert path_to("clmtl.data.relative", RUN_CONFIG) == ["clmtl.data.relative", RUN_CONFIG]
    assert path_to("clmtl.data.clean", RUN_CONFIG) is None


@pytest.mark.parametrize("module", lower_modules())
def test_no_data_model_or_strategy_module_imports_the_run_config(module):
    chain = path_to(module, RUN_CONFIG)
    assert chain is None, f"{module} imports the run's config: {' -> '.join(chain)}"


LAZY_BOUNDARIES = {"clmtl/cli.py"}
"""Modules that may import inside functions: the command line, so that ``clmtl --help`` and its argument errors come
back without loading torch (``clmtl/__init__.py`` is the other boundary; it resolves names with importlib)."""
OPTIONAL_PACKAGES = {"ray", "onnx"}
"""Extras a user may not have installed; importing them where they are needed keeps the rest working without them."""


def imports_inside_functions(path: Path) -> list[str]:
    """``file:line module`` for each import statement inside a function body of ``path``."""
    inner = {node for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path)))
             if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
             for node in ast.walk(function) if isinstance(node, ast.Import | ast.ImportFrom)}
    modules = {node: node.module if isinstance(node, ast.ImportFrom) else node.names[0].name for node in inner}
    return [f"{path.relative_to(ROOT)}:{node.lineno} {module}"
            for node, module in sorted(modules.items(), key=lambda item: item[0].lineno)
            if (module or "").split(".")[0] not in OPTIONAL_PACKAGES]


def test_the_inner_import_finder_sees_nested_functions_and_spares_optional_packages(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    def g():\n        from clmtl import io\n    import ray\n")
    assert imports_inside_functions(module) == ["m.py:5 clmtl"]


@pytest.mark.parametrize("folder", ["clmtl", "strategies"])
def test_imports_sit_at_module_top_so_the_dependency_graph_is_visible(folder):
    inner = [line for path in sorted((ROOT / folder).rglob("*.py"))
             if str(path.relative_to(ROOT)) not in LAZY_BOUNDARIES for line in imports_inside_functions(path)]
    assert not inner, "imports inside functions:\n" + "\n".join(inner)


def test_import_clmtl_loads_neither_torch_nor_avalanche():
    """``import clmtl`` is the lazy boundary: the public names resolve on first use, so the import itself is cheap.
    Measured side by side with ``-X importtime`` in one process, the package costs a small fraction of torch."""
    probe = ("import sys, clmtl; heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'avalanche', "
             "'ultralytics', 'numpy'}); print(','.join(heavy)); import torch")
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", probe], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    assert done.stdout.strip() == "", f"import clmtl loaded {done.stdout.strip()}"
    cumulative = {fields[2].strip(): int(fields[1]) for fields in (line.split("|") for line in done.stderr.splitlines())
                  if fields[0].startswith("import time:") and fields[1].strip().isdigit()}
    assert cumulative["clmtl"] < cumulative["torch"] / 20
    resolved = subprocess.run([sys.executable, "-c", "import clmtl; print(clmtl.run.__module__)"],
                              capture_output=True, text=True, check=True, cwd=ROOT)
    assert resolved.stdout.splitlines()[-1] == "clmtl.api"
