"""Waiting out idle steps in the EngineCore while only leases keep vLLM stepping (issue 14).

A leased request is delay-freed (``request_finished`` returned True), so vLLM's scheduler
``has_requests()`` until every worker rank hands it back, and ``EngineCoreProc`` steps with
1 ms between steps that run no model (``v1/engine/core.py``, ``_process_engine_step``).
Each step crosses vLLM's shared-memory queues, whose readers busy-wait (``sched_yield``) for
a second after each message (``distributed/device_communicators/shm_broadcast.py``,
``SpinCondition``, ``busy_loop_s``): measured, an idle ``kv_producer`` with a lease out
burnt ~1.1 cores. With nothing to do but wait for a lease to end, the scheduler side
(:class:`IdleWait`, called from ``build_connector_meta`` in the EngineCore's main thread)
blocks on a condition instead, until the first of:

- new work: anything put on the EngineCore's input queue (a request, an abort, a utility
  call, vLLM's own shutdown wake-up) notifies the queue's ``not_empty`` condition, which is
  what this waits on; the step then runs empty and the next one schedules the request;
- a worker's wake: a rank whose lease became ready to hand back (its last read ended after
  it was pulled ``lease_pulls`` times, or after it ended) sends a datagram to
  :class:`WakeListener` (a UDP socket on 127.0.0.1, its port in the step's metadata);
- the earliest lease end known to the book, plus :data:`EXPIRY_SLACK_S` (the workers time
  a lease from the step that carried its grant, a little after the book did);
- :data:`IDLE_WAIT_MAX_S`, a bound for what this cannot see.

Only the plain ``EngineCoreProc`` loop is waited in (found on the call stack, see
:func:`find_engine_loop`); elsewhere (an in-process engine, data parallelism, another vLLM)
nothing waits here and the workers keep their short wait (``worker.IDLE_STEP_WAIT_S``).
"""

from __future__ import annotations

import logging
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

IDLE_WAIT_MAX_S = 10.0
"""Longest one idle step is held back (the engine then steps once and waits again)."""
EXPIRY_SLACK_S = 0.1
"""Waited past the book's end of a lease, for the workers' own clock of it."""
PAST_DUE_WAIT_S = 0.05
"""Between idle steps once a lease is past its end but not handed back yet (a read of it
still out wakes the engine when it ends; this only bounds a missed wake)."""


@dataclass(frozen=True, slots=True)
class EngineLoop:
    """What the wait needs of vLLM's ``EngineCoreProc``: its input queue (all new work and
    vLLM's shutdown wake-ups arrive there) and its scheduler (unfinished requests)."""

    input_queue: queue.Queue
    scheduler: Any


def find_engine_loop(frame: FrameType | None) -> EngineLoop | None:
    """The ``EngineCoreProc`` whose step called us, from the call stack (``build_connector_
    meta`` ← ``Scheduler.schedule`` ← ``EngineCore.step``); None when not under one.

    NOTE: vLLM gives connectors no handle on the engine loop; the stack is the narrowest way
    to reach it. Data-parallel engines (``DPEngineCoreProc``) step in lockstep with their
    peers, so they are left alone."""
    try:
        from vllm.v1.engine.core import DPEngineCoreProc, EngineCoreProc
    except ImportError:
        return None
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, EngineCoreProc):
            if isinstance(obj, DPEngineCoreProc):
                return None
            q = getattr(obj, "input_queue", None)
            sched = getattr(obj, "scheduler", None)
            if isinstance(q, queue.Queue) and hasattr(sched, "get_num_unfinished_requests"):
                return EngineLoop(q, sched)
            return None
        frame = frame.f_back
    return None


class WakeListener:
    """A UDP socket on 127.0.0.1 (port 0) that workers ping when a lease can be handed back;
    a daemon thread turns each datagram into ``on_wake()``. The datagram's content is
    ignored: a stray one only makes the engine step once more."""

    def __init__(self, on_wake: Callable[[], None]) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._on_wake = on_wake
        self._thread = threading.Thread(target=self._run, name="p2pkv-idle-wake", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self._sock.recv(64)
            except OSError:
                return  # closed
            self._on_wake()

    def close(self) -> None:
        self._sock.close()


def send_wake(sock: socket.socket, port: int) -> None:
    """A worker rank: wake the EngineCore's idle wait (best effort; the wait is bounded)."""
    try:
        sock.sendto(b"w", ("127.0.0.1", port))
    except OSError as e:
        logger.debug("p2pkv: idle wake to port %d failed: %s", port, e)


class IdleWait:
    """The EngineCore's wait between idle steps while leases are out (see the module doc).
    Made by the connector's scheduler side on CPU instances with leases."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._loop: EngineLoop | None = None
        self._looked = False
        self._woken = False
        self._cond: threading.Condition | None = None
        self._wake = WakeListener(self._on_wake)
        self.waits = 0
        self.waited_s = 0.0

    @property
    def port(self) -> int:
        return self._wake.port

    def active(self) -> bool:
        """Whether this engine waits here (found on the first call from a step)."""
        if not self._looked:
            self._looked = True
            self._loop = find_engine_loop(sys._getframe(1))
            if self._loop is not None:
                self._cond = self._loop.input_queue.not_empty
            logger.info("p2pkv: idle steps with leases out %s", "wait in the EngineCore (woken "
                        "by new work or a lease's end)" if self._loop is not None else
                        "wait in the workers (no EngineCoreProc loop found)")
        return self._loop is not None

    def _on_wake(self) -> None:
        cond = self._cond
        if cond is None:
            return
        with cond:
            self._woken = True
            cond.notify_all()

    def wait(self, *, lease_end: float | None) -> float:
        """Block until new work arrives, a worker wakes us, or the lease ending first
        (``lease_end``, the book's clock; None: every lease out was ended already) is due;
        only when the engine has no unfinished request. Returns the seconds waited."""
        loop = self._loop
        if loop is None or self._cond is None:
            return 0.0
        if loop.scheduler.get_num_unfinished_requests() > 0:
            return 0.0  # e.g. a request waiting for blocks or its grammar: let vLLM step
        now = self._clock()
        until = now + IDLE_WAIT_MAX_S
        if lease_end is not None:
            until = min(until, max(lease_end + EXPIRY_SLACK_S, now + PAST_DUE_WAIT_S))
        q = loop.input_queue
        with self._cond:  # the input queue's mutex: a put notifies this condition
            self._cond.wait_for(lambda: q._qsize() > 0 or self._woken,  # noqa: SLF001
                                timeout=max(0.0, until - now))
            self._woken = False
        waited = self._clock() - now
        self.waits += 1
        self.waited_s += waited
        return waited

    def close(self) -> None:
        self._wake.close()
