"""Let p2pkv's I/O threads run on every CPU the process may use.

vLLM's CPU worker binds its main thread to one core (its OpenMP thread 0), and threads inherit
the affinity of the thread that starts them. While a request waits for its KV, that main thread
spins (``sched_yield``) on the same core, and our pull and serve threads starved there:
measured on a 2-core machine, a 47 MB pull between two instances missed a 5 s deadline every
time, against 64 ms once unbound. Called at the start of every thread p2pkv owns.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def widen_cpu_affinity() -> None:
    """Let the calling thread run on every CPU the process may use."""
    if not hasattr(os, "sched_setaffinity"):
        return
    try:
        # NOTE: the kernel intersects this with the cgroup's cpuset, so asking for every CPU
        # means "every CPU this container may use".
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except OSError as e:
        logger.debug("could not widen thread affinity: %s", e)
