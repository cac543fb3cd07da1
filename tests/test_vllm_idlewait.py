"""The EngineCore's wait between idle steps while leases are out (``p2pkv.vllm.idlewait``),
without an engine: a queue stands in for the EngineCore's input queue. It ends on new work,
on a worker's wake datagram and at the lease's end, and never waits while the engine has an
unfinished request. The real engine: tests/test_lease_idle_vllm.py."""

from __future__ import annotations

import queue
import socket
import threading
import time

from p2pkv.vllm.idlewait import (
    EXPIRY_SLACK_S,
    EngineLoop,
    IdleWait,
    find_engine_loop,
    send_wake,
)


class FakeScheduler:
    def __init__(self) -> None:
        self.unfinished = 0

    def get_num_unfinished_requests(self) -> int:
        return self.unfinished


def make_wait() -> tuple[IdleWait, queue.Queue, FakeScheduler]:
    wait = IdleWait()
    q: queue.Queue = queue.Queue()
    sched = FakeScheduler()
    # as IdleWait.active() would find it on an EngineCoreProc's stack
    wait._loop = EngineLoop(q, sched)
    wait._cond = q.not_empty
    wait._looked = True
    return wait, q, sched


def later(delay_s: float, fn) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay_s), fn()), daemon=True)
    t.start()
    return t


def test_outside_an_engine_loop_nothing_waits():
    assert find_engine_loop(None) is None
    wait = IdleWait()
    try:
        assert not wait.active()  # pytest's stack holds no EngineCoreProc
        assert wait.wait(lease_end=time.monotonic() + 5) == 0.0
    finally:
        wait.close()


def test_new_work_ends_the_wait_at_once():
    wait, q, _ = make_wait()
    try:
        later(0.2, lambda: q.put_nowait(("ADD", None)))
        waited = wait.wait(lease_end=time.monotonic() + 30)
        assert 0.15 < waited < 1.0, waited
        assert wait.wait(lease_end=time.monotonic() + 30) < 0.05  # work is queued: no wait
    finally:
        wait.close()


def test_a_workers_wake_ends_the_wait():
    wait, _, _ = make_wait()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        later(0.2, lambda: send_wake(sock, wait.port))
        waited = wait.wait(lease_end=time.monotonic() + 30)
        assert 0.15 < waited < 1.0, waited
    finally:
        sock.close()
        wait.close()


def test_the_wait_ends_with_the_lease_and_is_bounded_past_it():
    wait, _, _ = make_wait()
    try:
        waited = wait.wait(lease_end=time.monotonic() + 0.3)
        assert 0.3 + EXPIRY_SLACK_S * 0.8 < waited < 0.3 + EXPIRY_SLACK_S + 0.3, waited
        past = wait.wait(lease_end=time.monotonic() - 10)  # due, not handed back yet
        assert 0.02 < past < 0.3, past
    finally:
        wait.close()


def test_no_wait_while_the_engine_has_an_unfinished_request():
    wait, _, sched = make_wait()
    try:
        sched.unfinished = 1
        assert wait.wait(lease_end=time.monotonic() + 30) == 0.0
    finally:
        wait.close()
