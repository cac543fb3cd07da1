"""Rate-limited logging: one line per reason per interval, with how many were held back.

A server under a flood of bad peers must not turn each one into a log line (a flood of lines
is a second denial of service: disk, and the GIL of the process writing them). Used by the
data-plane server (``transport/server.py``) and the router.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class RateLimitedLog:
    """``log(reason, msg, *args)`` emits at most one record per ``reason`` every
    ``interval_s``; the next one that is emitted says how many were suppressed since.

    NOTE: ``reason`` must come from a small fixed set (a constant per call site), never from
    peer input: each distinct reason is a line of its own and an entry kept here."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, level: int, reason: str, msg: str, *args: object,
            exc_info: bool = False) -> bool:
        """Log unless ``reason`` was logged less than ``interval_s`` ago; True if it was."""
        now = self._clock()
        with self._lock:
            last = self._last.get(reason)
            if last is not None and now - last < self._interval:
                self._held[reason] = self._held.get(reason, 0) + 1
                return False
            self._last[reason] = now
            held = self._held.pop(reason, 0)
        if held:
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, held, self._interval)
        self._logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, reason: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        return self.log(logging.WARNING, reason, msg, *args, exc_info=exc_info)

    def info(self, reason: str, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, reason, msg, *args)
