"""CPU use of a process group (a ``vllm serve`` instance: API server, EngineCore, workers),
read from ``/proc``: how many cores an instance burns while it should be idle (issue 14:
an idle holder with a lease out). Used by tests and benches; Linux only."""

from __future__ import annotations

import os
import time


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds so far of every live process in group ``pgid``."""
    ticks = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def group_cores(pgid: int, window_s: float) -> float:
    """The cores group ``pgid`` used on average over the next ``window_s`` seconds."""
    t0, c0 = time.monotonic(), group_cpu_s(pgid)
    time.sleep(window_s)
    return (group_cpu_s(pgid) - c0) / (time.monotonic() - t0)
