"""What the installed distribution puts on sys.path: the package ``clmtl`` only, the built-in strategies inside it as
``clmtl.strategies`` (their folder stays ``strategies/`` at the repository's root, mapped by setup.cfg's
``package_dir``). A top-level ``strategies`` in site-packages would shadow, or be shadowed by, any other project's
module of that name."""
import subprocess
import sys
from importlib.metadata import distribution

REINSTALL = "reinstall the project (pip install -e .) after changing setup.cfg's packages"


def test_strategies_install_as_clmtl_strategies_and_nothing_else_at_the_top_level(tmp_path):
    """Checked in a fresh interpreter away from the repository (``-I``: neither its folder nor PYTHONPATH on
    sys.path), so only what the install provides is importable."""
    probe = ("import importlib.util, clmtl.strategies.ewc, clmtl.training.registry as r; "
             "print(importlib.util.find_spec('strategies')); print(clmtl.strategies.ewc.__name__); "
             "print(r.available()['ewc'].factory.__module__)")
    result = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{REINSTALL}: {result.stderr.strip().splitlines()[-1:]}"
    top_level, module, registered_from = result.stdout.split()
    assert top_level == "None", f"a top-level package 'strategies' is importable: {REINSTALL}"
    assert (module, registered_from) == ("clmtl.strategies.ewc", "clmtl.strategies.ewc")


def test_the_distribution_declares_one_top_level_package():
    assert distribution("clmtl").read_text("top_level.txt").split() == ["clmtl"], REINSTALL
