"""Stop requests: SIGINT and SIGTERM stop meta-training between outer steps.

A handler that raises (Python's SIGINT default) can fire anywhere: inside
``vmap``, while ``torch.func.functional_call`` has swapped the net's
parameters for batched tensors (the net then cannot be saved), or inside
TensorBoard's writer queue (its worker then misses the close and the process
waits). So the first signal only records the request, and the outer loop
stops at the end of the step it is in (raising :class:`StopAtStepEnd`); a
second signal raises ``KeyboardInterrupt`` at once, for a step that never
ends. A repeat of the first signal within :data:`REPEAT_WINDOW_S` is the same
request: ``torchrun`` forwards the SIGTERM it gets to every worker, so
``pkill -f meta_train`` reaches each worker twice at once.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW_S = 1.0


class StopAtStepEnd(KeyboardInterrupt):
    """A stop at the end of an outer step: every rank is between steps, so
    collective work (a checkpoint's gather) is safe. A bare
    ``KeyboardInterrupt`` came at once, from anywhere in the step."""


class StopRequests:
    """Context manager: while open, SIGINT and SIGTERM set :attr:`signum`
    instead of stopping the process (a second one raises
    ``KeyboardInterrupt``; the same signal again within
    :data:`REPEAT_WINDOW_S` seconds is not a second one). SIGINT is caught
    even where it was ignored: a shell starts background jobs that way, and
    ``kill -INT`` should still stop them cleanly. Off the main thread, where
    Python cannot install handlers, it does nothing: signals keep their
    usual effect."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._replaced: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._replaced = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._replaced.items():
            signal.signal(s, handler)
        self._replaced = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # No printing here: a handler that writes to a stream the main thread
        # is writing to raises "reentrant call".
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
        elif signum != self.signum or now - self._first_at > REPEAT_WINDOW_S:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    @property
    def name(self) -> str | None:
        """The first signal's name (``"SIGTERM"``), or None if none came."""
        return None if self.signum is None else signal.Signals(self.signum).name
