"""Blocking-socket helpers shared by the data plane's client and server.

NOTE: we use blocking sockets with kernel timeouts (SO_RCVTIMEO / SO_SNDTIMEO) rather than
Python's socket timeouts: a Python timeout makes the socket non-blocking, so a big receive
becomes hundreds of short recv calls, each re-acquiring the GIL. In a vLLM worker whose main
thread is busy, that costs milliseconds per call (measured: a 47 MB pull took 5 s). One
MSG_WAITALL call per chunk releases the GIL once.
"""

from __future__ import annotations

import socket
import struct
import time
import weakref
from collections.abc import Sequence

from p2pkv.errors import DeadlineExceeded, TransportError

IOV_MAX = 1024  # buffers per recvmsg/sendmsg call (Linux's UIO_MAXIOV)
_TIMEVAL = struct.Struct("@ll")


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (optionally ``tcp://host:port``) -> (host, port)."""
    host, sep, port = address.removeprefix("tcp://").rpartition(":")
    if not sep or not port.isdigit():
        raise TransportError(f"bad data-plane address {address!r} (want host:port)")
    return host.strip("[]"), int(port)


# NOTE: what each live socket's kernel timeouts are set to, so that a call sets them only
# when needed: a setsockopt per receive cost ~40 µs per request on loopback (measured).
_current: weakref.WeakKeyDictionary[socket.socket, dict[int, float]] = (
    weakref.WeakKeyDictionary())
SLACK_S = 0.05  # a wait may overrun its deadline by this (or 10 %) to skip a setsockopt


def set_os_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    """Make the kernel end a blocking call on ``sock`` after about ``seconds``: the timeout
    already set is kept unless it would overrun by more than max(SLACK_S, 10 %) or end much
    too early."""
    seconds = max(seconds, 0.001)
    now = _current.setdefault(sock, {})
    old = now.get(option)
    if old is not None and 0.9 * seconds <= old <= seconds + max(SLACK_S, 0.1 * seconds):
        return  # a call that ends early is retried by the caller until its deadline
    sec = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(sec, int((seconds - sec) * 1e6)))
    now[option] = seconds


def make_blocking(sock: socket.socket) -> None:
    sock.settimeout(None)  # blocking, with kernel timeouts (see set_os_timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def recv_views(sock: socket.socket, views: Sequence[memoryview], deadline: float) -> None:
    """Fill ``views`` in order from ``sock`` (scatter receive), or raise by ``deadline``."""
    pending = [v for v in views if v.nbytes]
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline passed while receiving")
        set_os_timeout(sock, socket.SO_RCVTIMEO, left)
        try:
            n = sock.recvmsg_into(pending[:IOV_MAX], 0, socket.MSG_WAITALL)[0]
        except (BlockingIOError, TimeoutError):
            continue  # the kernel timeout ended: the deadline check above decides
        if n == 0:
            raise TransportError("peer closed the connection")
        while n and pending:
            if n >= pending[0].nbytes:
                n -= pending.pop(0).nbytes
            else:
                pending[0], n = pending[0][n:], 0


def recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray(n)
    recv_views(sock, [memoryview(buf)], deadline)
    return bytes(buf)


def send_views(sock: socket.socket, views: Sequence[memoryview | bytes], timeout_s: float
               ) -> None:
    """Send ``views`` in order (gather send) within ``timeout_s`` in all: a peer that reads
    slowly cannot stretch one response past it (raises DeadlineExceeded, or OSError if the
    peer is gone)."""
    pending = [memoryview(v).cast("B") for v in views if len(v)]
    deadline = time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline passed while sending")
        set_os_timeout(sock, socket.SO_SNDTIMEO, left)
        try:
            n = sock.sendmsg(pending[:IOV_MAX])
        except (BlockingIOError, TimeoutError):
            continue  # the kernel timeout ended with nothing sent: the deadline decides
        while n and pending:
            if n >= pending[0].nbytes:
                n -= pending.pop(0).nbytes
            else:
                pending[0], n = pending[0][n:], 0
