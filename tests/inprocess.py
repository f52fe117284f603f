"""``clmtl ARGS`` run in the test process, returning what ``subprocess.run`` of the command line would.

A new Python process pays about 5 s of CPU importing torch, torchvision and Avalanche before it does anything; the
entry point itself (``python -m clmtl``) is tested in a subprocess once (tests/test_run.py), and the tests that kill
a run (SIGKILL) or watch its baselines' process keep a process of their own."""
import contextlib
import io
import subprocess


def clmtl_here(*args) -> subprocess.CompletedProcess:
    from clmtl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            returncode = main([str(arg) for arg in args])
        except SystemExit as exit:  # argparse's usage errors
            returncode = exit.code
    return subprocess.CompletedProcess(args, returncode, out.getvalue(), err.getvalue())
