"""TCP transport against a real peer process on loopback."""

from __future__ import annotations

import socket
import struct
import time

import numpy as np
import pytest

from p2pkv.transport import wire
from p2pkv.transport.base import Outcome, PullItem
from p2pkv.transport.peer import PeerTransport
from tests.peer_process import chunk_bytes, key_of

SEED = 7


@pytest.fixture
def transport():
    t = PeerTransport(bind_host="127.0.0.1")
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


def _handshake(address: str, secret_key: bytes | None = None) -> socket.socket:
    """A raw client that does the handshake itself (so tests can send anything after it)."""
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    s.settimeout(5)
    _, nonce_s = wire.unpack_hello(_read(s, wire.HELLO_BYTES))
    nonce_c = b"n" * wire.NONCE_BYTES
    s.sendall(wire.pack_proof(nonce_c, wire.mac(secret_key, b"c", nonce_s, nonce_c)))
    return s


def _read(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            got = s.recv(n - len(buf))
        except ConnectionResetError:  # closed with our unread bytes in its buffer
            break
        if not got:
            break
        buf += got
    return buf


def _verdict(s: socket.socket) -> wire.PeerInfo | None:
    status, _, n = wire.unpack_verdict(_read(s, wire.VERDICT_BYTES))
    return wire.decode_info(_read(s, n)) if status == wire.Status.OK else None


def test_wrong_secret_is_refused_before_any_chunk_byte(spawn):
    import os
    os.environ["P2PKV_TEST_SECRET"] = "the-right-secret-0123456789"
    try:
        _, address = peer(spawn, 1024, 1)
    finally:
        del os.environ["P2PKV_TEST_SECRET"]
    with _handshake(address, b"w" * 32) as s:
        assert _verdict(s) is None  # AUTH_FAILED
        try:
            s.sendall(wire.encode_request(wire.Pull([bytes(key_of(0))])))
        except OSError:
            pass
        assert _read(s, 1024) == b""  # closed: not one byte of the chunk


@pytest.mark.parametrize("garbage", [
    b"\xff\xff\xff\xff",  # absurd length
    struct.pack("<I", 5) + b"hello",  # not msgpack
    wire.encode_request(wire.Release([(0, 1)])),  # releases a pin it never took
    wire.encode_request(wire.Pin([b"k" * 32])),  # same-host request to a tcp-only holder
])
def test_malformed_request_gets_an_error_and_server_keeps_serving(spawn, transport, garbage):
    _, address = peer(spawn, 1024, 1)
    for hello_garbage in [b"\x00", b"GET / HTTP/1.0\r\n\r\n" * 8]:  # not even a handshake
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(hello_garbage)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            _read(s, 4096)  # a hello, a refusal or EOF, never a hang
    with _handshake(address) as s:
        assert _verdict(s) is not None
        s.sendall(garbage)
        status, _, _ = wire.unpack_item(_read(s, wire.ITEM_HEADER_BYTES))
        assert status is wire.Status.BAD_REQUEST
        assert len(_read(s, wire.TAG_BYTES)) == wire.TAG_BYTES  # the reply's MAC (v4)
        assert _read(s, 1) == b""
    buf, dest = split_dest(1024, 1)
    (r,) = transport.pull(address, [PullItem(key_of(0), dest)], 5)
    assert r.outcome is Outcome.OK
    assert np.array_equal(buf, chunk_bytes(SEED, 0, 1024))
