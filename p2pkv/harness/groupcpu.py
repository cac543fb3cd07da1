"""CPU and memory of a process group (a ``vllm serve`` instance: API server, EngineCore,
workers), read from ``/proc``: how many cores an instance burns while it should be idle
(issue 14: an idle holder with a lease out) and how much it keeps resident (issue 13's fault
suite). Used by tests and benches; Linux only."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator


def _members(pgid: int) -> Iterator[tuple[str, list[str]]]:
    """(pid, the ``/proc/<pid>/stat`` fields after the command name) of every live process
    in group ``pgid``; a process that exits meanwhile is skipped."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                yield pid, fields
        except (OSError, IndexError, ValueError):
            continue


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds so far of every live process in group ``pgid``."""
    ticks = sum(int(fields[11]) + int(fields[12]) for _, fields in _members(pgid))
    return ticks / os.sysconf("SC_CLK_TCK")


def group_cores(pgid: int, window_s: float) -> float:
    """The cores group ``pgid`` used on average over the next ``window_s`` seconds."""
    t0, c0 = time.monotonic(), group_cpu_s(pgid)
    time.sleep(window_s)
    return (group_cpu_s(pgid) - c0) / (time.monotonic() - t0)


def group_rss_mib(pgid: int) -> float:
    """Resident memory (VmRSS) of every live process in group ``pgid``, in MiB."""
    total_kib = 0
    for pid, _ in _members(pgid):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total_kib += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total_kib / 1024
