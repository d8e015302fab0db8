"""Stop signals: SIGTERM (a scheduler's stop, ``kill``, ``docker stop``) is handled like Ctrl-C.

SLURM, Kubernetes and ``timeout`` send SIGTERM and wait a grace period before SIGKILL. Python's default
for SIGTERM ends the process at once, without the cleanup Ctrl-C gets; inside :func:`sigterm_as_interrupt`
it raises :class:`Terminated`, a ``KeyboardInterrupt``, so the code that finishes and reports on Ctrl-C
does the same on SIGTERM, and the CLI exits with 143 (128 + SIGTERM) instead of 130.
"""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["Terminated", "ignore_stop_signals", "sigterm_as_interrupt"]


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop as on Ctrl-C."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (elsewhere: no change,
    signal handlers can only be set there); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """For worker processes the main process shuts down itself (DataLoader decode workers): a terminal's
    Ctrl-C or a scheduler's SIGTERM reaches the whole process group, and a worker that stopped on it would
    leave its results unsent in its pipe and hang on exit until the DataLoader kills it 5 s later."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
