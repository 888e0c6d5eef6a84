"""Stop requests: SIGINT and SIGTERM stop meta-training between outer steps.

A handler that raises (Python's SIGINT default) can fire anywhere: inside
``vmap``, while ``torch.func.functional_call`` has swapped the net's
parameters for batched tensors (the net then cannot be saved), or inside
TensorBoard's writer queue (its worker then misses the close and the process
waits). So the first signal only records the request, and the outer loop
stops at the end of the step it is in; a second signal raises
``KeyboardInterrupt`` at once, for a step that never ends.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Context manager: while open, SIGINT and SIGTERM set :attr:`signum`
    instead of stopping the process (a second one raises
    ``KeyboardInterrupt``). SIGINT is caught even where it was ignored: a
    shell starts background jobs that way, and ``kill -INT`` should still
    stop them cleanly. Off the main thread, where Python cannot install
    handlers, it does nothing: signals keep their usual effect."""

    def __init__(self) -> None:
        self.signum: int | None = None
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
        if self.signum is not None:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str | None:
        """The first signal's name (``"SIGTERM"``), or None if none came."""
        return None if self.signum is None else signal.Signals(self.signum).name
