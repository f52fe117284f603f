"""Strategies for the tests that stop runs, loaded with ``--plugin-file``.

``killer`` sends its own process KILL_SIGNAL (default SIGKILL: no clean-up) before iteration KILL_AT (default 1) of
the second experience when KILL_FOR_TEST is set, and does nothing otherwise. ``idle`` waits, without using the CPU,
before the stream's first training iteration until a signal asks the run to stop, leaving the machine to the run's
other process, the one training the single-task baselines."""
import os
import signal
import time

from clmtl.training.plugin import Plugin
from clmtl.training.registry import register


class KillDuringSecondExperience(Plugin):  # keeps no state: Plugin's defaults make it resumable
    def before_training_iteration(self, strategy, **kwargs):
        clock = strategy.clock
        at = int(os.environ.get("KILL_AT", "1"))
        if os.environ.get("KILL_FOR_TEST") and clock.train_exp_counter == 1 and clock.train_exp_iterations == at:
            os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))


class IdleUntilStopped(Plugin):
    def before_training_iteration(self, strategy, **kwargs):
        while not strategy.stop.requested:
            time.sleep(0.1)


@register("killer")
def killer():
    """Test helper."""
    return KillDuringSecondExperience()


@register("idle")
def idle():
    """Test helper."""
    return IdleUntilStopped()
