"""TCP transport against a real peer process on loopback."""

from __future__ import annotations

import socket
import struct
import time

import numpy as np
import pytest

from p2pkv.transport.base import Outcome, PullItem
from p2pkv.transport.tcp import TcpTransport
from tests.peer_process import chunk_bytes, key_of

SEED = 7


@pytest.fixture
def transport():
    t = TcpTransport(bind_host="127.0.0.1")
    yield t
    t.close()


def peer(spawn, size: int, n: int):
    return spawn(["-m", "tests.peer_process", "ready", str(size), str(n), str(SEED)], "ready")


def split_dest(size: int, pieces: int) -> tuple[np.ndarray, tuple[memoryview, ...]]:
    buf = np.zeros(size, dtype=np.uint8)
    bounds = np.linspace(0, size, pieces + 1).astype(int)
    return buf, tuple(memoryview(buf[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("size", [1, 4096, 196_608, 4 << 20])
def test_round_trip_into_scattered_destinations(spawn, transport, size):
    _, address = peer(spawn, size, 3)
    bufs, items = [], []
    for i in range(3):
        buf, dest = split_dest(size, min(size, 30))
        bufs.append(buf)
        items.append(PullItem(key_of(i), dest))
    results = transport.pull(address, items, timeout_s=10)
    assert [r.outcome for r in results] == [Outcome.OK] * 3
    for i, buf in enumerate(bufs):
        assert np.array_equal(buf, chunk_bytes(SEED, i, size))
    # the connection is reused for a second pull
    results = transport.pull(address, items[:1], timeout_s=10)
    assert results[0].outcome is Outcome.OK


def test_missing_key_is_reported_and_stream_stays_in_sync(spawn, transport):
    _, address = peer(spawn, 1024, 2)
    a, da = split_dest(1024, 2)
    b, db = split_dest(1024, 2)
    results = transport.pull(address, [PullItem(key_of(99), da), PullItem(key_of(1), db)], 5)
    assert [r.outcome for r in results] == [Outcome.MISSING, Outcome.OK]
    assert np.array_equal(b, chunk_bytes(SEED, 1, 1024))


def test_size_mismatch_fails_without_hanging(spawn, transport):
    _, address = peer(spawn, 1024, 1)
    _, dest = split_dest(512, 1)
    (r,) = transport.pull(address, [PullItem(key_of(0), dest)], 5)
    assert r.outcome is Outcome.FAILED and "expected 512" in r.reason


def test_dead_peer_fails_within_deadline(spawn, transport):
    proc, address = peer(spawn, 1024, 1)
    proc.kill()
    proc.wait()
    _, dest = split_dest(1024, 1)
    t0 = time.monotonic()
    (r,) = transport.pull(address, [PullItem(key_of(0), dest)], 2)
    assert r.outcome is Outcome.FAILED
    assert time.monotonic() - t0 < 3


def test_silent_peer_hits_the_deadline(transport):
    # A listener that accepts and never answers: the pull must give up at its deadline.
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        address = f"127.0.0.1:{srv.getsockname()[1]}"
        _, dest = split_dest(1024, 1)
        t0 = time.monotonic()
        (r,) = transport.pull(address, [PullItem(key_of(0), dest)], 0.5)
        assert r.outcome is Outcome.FAILED and "deadline" in r.reason
        assert time.monotonic() - t0 < 2
    finally:
        srv.close()


def test_malformed_request_gets_an_error_and_server_keeps_serving(spawn, transport):
    _, address = peer(spawn, 1024, 1)
    host, port = address.rsplit(":", 1)
    for garbage in [b"\xff\xff\xff\xff", struct.pack("<I", 5) + b"hello", b"\x00"]:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(garbage)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            s.recv(64)  # an error header or EOF, never a hang
    buf, dest = split_dest(1024, 1)
    (r,) = transport.pull(address, [PullItem(key_of(0), dest)], 5)
    assert r.outcome is Outcome.OK
    assert np.array_equal(buf, chunk_bytes(SEED, 0, 1024))
