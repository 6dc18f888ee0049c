"""Stopping on request at a step boundary: while training, SIGTERM (a cluster's
preemption, ``scancel``, torchrun passing one on) and SIGINT (Ctrl-C) only raise a flag;
the trainer checks it after each optimizer step, writes its checkpoint and raises
``Preempted``. What cannot wait (SIGKILL) finds the last checkpoint whole."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, List

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped at a step boundary on ``signum``, with its checkpoint written."""

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at {where}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's code for death by that signal (143, 130)


@contextmanager
def deferred() -> Iterator[Callable[[], int]]:
    """While the block runs, SIGTERM and SIGINT are recorded instead of acted on; yields
    a function giving the first one received (0: none). Off the main thread, where
    Python cannot install handlers, signals keep their usual effect."""
    received: List[int] = []

    def record(signum, frame) -> None:
        # a repeat changes nothing: torchrun passes on the Ctrl-C its workers also got
        received.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    previous = {s: signal.signal(s, record) for s in SIGNALS}
    try:
        yield lambda: received[0] if received else 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
