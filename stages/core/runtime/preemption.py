"""SIGTERM, what Kubernetes and spot instances send before they stop a machine: finish the current
optimizer step, write a checkpoint, exit non-zero; `--resume auto` then continues exactly.

A second SIGTERM (or SIGKILL when the grace period runs out) ends the process at once: the last
complete checkpoint stays intact, since a checkpoint only counts once its state.json is in place.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable

from stages.core.errors import PipelineError


class Preempted(PipelineError):
    """Raised by the command after the preemption checkpoint is written (pipeline.py exits 143)."""


class Preemption:
    """Notes a SIGTERM in this process. Only the main thread can take signals: a Ray Train worker
    (a thread) is told by its driver through `ask` instead."""

    def __init__(self, ask: Callable[[], bool] | None = None, listen: bool = True):
        self.requested = False
        self._ask = ask
        self._previous = None
        if listen and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        # The console channel's stream (stderr), but not console.say: a signal handler takes no locks
        # (tqdm's write lock may be held by the code this handler interrupted).
        print("SIGTERM: finishing this step, then a checkpoint and exit (a second SIGTERM stops at once)",
              file=sys.stderr, flush=True)

    def asked(self) -> bool:
        if not self.requested and self._ask is not None:
            self.requested = bool(self._ask())
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
