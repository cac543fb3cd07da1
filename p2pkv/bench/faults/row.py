"""One row of ``p2pkv bench faults``' table, and the process figures it is made of (shared by
``faults.py`` and ``faults/router.py``)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass(slots=True)
class Row:
    case: str
    sent: int = 0
    correct: int = 0
    caught: int = 0  # of the correct ones: a corrupted chunk refused, as it must be
    failed: int = 0
    wrong: int = 0
    slowest_ms: float = 0.0
    recover_s: float | None = None
    rss_before: float = 0.0
    rss_after: float = 0.0
    fault: str = "-"


def hold_silent_sockets(host: str, port: int, stop, count, n: int = 600) -> None:
    """Open ``n`` connections from another loopback address that never send a byte, hold them
    until ``stop`` is set (``count`` = how many connected), then close them."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.settimeout(2)
        try:
            s.connect((host, port))
            socks.append(s)
        except OSError:
            s.close()
    count.value = len(socks)
    stop.wait()
    for s in socks:
        s.close()
