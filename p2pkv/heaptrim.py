"""Hand freed heap memory back to the kernel in a long-running server process.

glibc keeps memory that a burst allocated and then freed resident in its arenas: after a
flood of 600 silent TCP connections to the directory (libzmq's engine, session and buffers
per connection, allocated in its I/O thread's arena) closed, the directory's RSS stayed
+3 MiB (+11 % of 27 MiB) for good, reusable by the process but not back
(``p2pkv bench faults``, ``d-flood``). A second and third flood did not add to it: not a
leak. ``malloc_trim(0)`` returns every arena's free pages (0.2–0.5 ms on this host), so
:class:`HeapTrimmer` calls it every :data:`INTERVAL_S` on a thread of its own (ctypes
releases the GIL for the call). Where the C library has no ``malloc_trim`` (musl, macOS) it
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

INTERVAL_S = 1.0
STOP_TIMEOUT_S = 5.0


def malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)`` as a callable (1 if it released memory), or None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` every ``interval_s`` until :meth:`stop`; ``trims`` counts
    the calls made."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self.trims = 0
        self._trim = malloc_trim()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._trim is not None

    def start(self) -> bool:
        """Start the thread; False (and nothing started) where there is no malloc_trim."""
        if self._trim is None or self._thread is not None:
            return self._thread is not None
        self._thread = threading.Thread(target=self._run, name="p2pkv-heap-trim", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)

    def _run(self) -> None:
        trim = self._trim
        assert trim is not None
        while not self._stop.wait(self.interval_s):
            try:
                trim()
            except OSError as e:  # pragma: no cover - ctypes raises none for this call
                logger.warning("malloc_trim failed (%s): no more heap trimming", e)
                return
            self.trims += 1
