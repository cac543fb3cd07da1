"""The authenticated data plane (wire v4): session keys, MACs on every request and reply
header, keyed chunk digests, namespaces named in requests. An attacker on the path is played
by a relay on loopback that changes, replays or records bytes between a real puller and a
real holder; every attack ends in a clear error or a dropped-and-counted connection, never a
wrong byte in a destination or a dead server.
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from p2pkv.errors import ConfigError, TransportError
from p2pkv.keys import Namespace
from p2pkv.secret import ClusterSecret, derive
from p2pkv.store import ChunkStore
from p2pkv.transport import session as sess
from p2pkv.transport import wire
from p2pkv.transport.base import Outcome, PullItem
from p2pkv.transport.conn import connect_session
from p2pkv.transport.peer import PeerTransport
from p2pkv.transport.server import Server
from p2pkv.transport.session import Session
from p2pkv.transport.sockio import parse_address, recv_exact
from tests.conftest import wait_until
from tests.peer_process import chunk_bytes, key_of

SEED = 11
SIZE = 64 << 10
KEY = derive(ClusterSecret(b"the-cluster-secret-for-auth-tests"), "data-plane")


def _store(n: int, size: int = SIZE) -> ChunkStore:
    store = ChunkStore(size, n)
    for i in range(n):
        w = store.reserve(key_of(i))
        np.frombuffer(w.view, dtype=np.uint8)[:] = chunk_bytes(SEED, i, size)
        store.commit(w)
    return store


class Holder:
    """An in-process holder with a secret, and the length of its side of the handshake."""

    def __init__(self, n: int = 4, namespace: str = "ns", key: bytes | None = KEY,
                 epoch: int = 0) -> None:
        self.store = _store(n)
        self.info = wire.PeerInfo(host_id="holder-host", slab_bytes=self.store.slab_bytes,
                                  slot_bytes=self.store.slot_bytes, namespace=namespace,
                                  epoch=epoch)
        self.server = Server(self.store, "127.0.0.1", key, self.info)
        self.address = f"127.0.0.1:{self.server.port}"
        self.handshake_bytes = (wire.HELLO_BYTES + wire.VERDICT_BYTES
                                + len(wire.encode_info(self.info)))

    def close(self) -> None:
        self.server.close()
        self.store.close()


class Relay:
    """An attacker on the path: relays connections to ``upstream`` and, on the first one,
    flips the byte at ``flip`` = (direction, offset after the handshake) once; records what
    the puller sent after its handshake; ``inject`` writes bytes to the holder as if they
    came from the puller."""

    def __init__(self, upstream: str, holder_handshake: int,
                 flip: tuple[str, int] | None = None) -> None:
        self._upstream = parse_address(upstream)
        self._skip = {"c2s": wire.PROOF_BYTES, "s2c": holder_handshake}
        self._flip = flip
        self.sent_by_puller = bytearray()
        self.received_by_puller = bytearray()
        self._upstream_socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            up = socket.create_connection(self._upstream)
            self._upstream_socks.append(up)
            first = len(self._upstream_socks) == 1
            threading.Thread(target=self._pump, args=(down, up, "c2s", first),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, "s2c", first),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str,
              first: bool) -> None:
        pos = -self._skip[direction]  # offset after the handshake of the next byte
        try:
            while data := src.recv(1 << 16):
                data = bytearray(data)
                if first and self._flip and self._flip[0] == direction and \
                        pos <= self._flip[1] < pos + len(data):
                    data[self._flip[1] - pos] ^= 0x01
                    self._flip = None
                if first and direction == "c2s" and pos + len(data) > 0:
                    self.sent_by_puller += data[max(0, -pos):]
                if first and direction == "s2c":
                    self.received_by_puller += data
                pos += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def inject(self, data: bytes) -> None:
        self._upstream_socks[0].sendall(data)

    def close(self) -> None:
        self._listener.close()
        for s in self._upstream_socks:
            s.close()


@pytest.fixture
def holder():
    h = Holder()
    yield h
    h.close()


def _client(chunk_digest: str = "keyed", key: bytes | None = KEY) -> PeerTransport:
    return PeerTransport(key=key, namespace=Namespace("ns"), chunk_digest=chunk_digest)


def _pull(t: PeerTransport, address: str, keys: list[int], size: int = SIZE, epoch: int = 0):
    bufs = [np.zeros(size, dtype=np.uint8) for _ in keys]
    items = [PullItem(key_of(k), (memoryview(b[: size // 3]), memoryview(b[size // 3:])))
             for k, b in zip(keys, bufs)]
    return t.pull(address, items, 5.0, epoch), bufs


def test_keyed_pull_returns_the_right_bytes_and_auto_keys_only_other_hosts(holder):
    for mode, keyed in [("keyed", True), ("auto", True), ("xxh3", False)]:
        # the holder says it is on "holder-host": not this host, so auto keys it
        t = _client(mode)
        try:
            results, bufs = _pull(t, holder.address, [0, 99, 2, 3])
            assert [r.outcome for r in results] == [Outcome.OK, Outcome.MISSING, Outcome.OK,
                                                    Outcome.OK]
            for k, b in zip([0, 2, 3], [bufs[0], bufs[2], bufs[3]]):
                assert np.array_equal(b, chunk_bytes(SEED, k, SIZE))
            (conn,) = t.pool.idle()
            assert conn.keyed is keyed and conn.session.requests == 1
            results, _ = _pull(t, holder.address, [1])  # the next request on the connection
            assert results[0].outcome is Outcome.OK
        finally:
            t.close()
    assert holder.server.health().bad_macs == 0


def test_auto_keeps_xxh3_for_a_holder_on_this_host():
    from p2pkv.transport.shm import host_id
    store = _store(1)
    info = wire.PeerInfo(host_id=host_id(), namespace="ns")
    server = Server(store, "127.0.0.1", KEY, info)
    t = _client("auto")
    try:
        results, _ = _pull(t, f"127.0.0.1:{server.port}", [0])
        assert results[0].outcome is Outcome.OK
        assert t.pool.idle()[0].keyed is False
    finally:
        t.close()
        server.close()
        store.close()


def test_keyed_needs_a_secret():
    with pytest.raises(ConfigError):
        _client("keyed", key=None)
    with pytest.raises(ConfigError):
        _client("sha1")


@pytest.mark.parametrize("offset, what", [(9, "nbytes"), (20, "digest"),
                                          (4 * wire.ITEM_HEADER_BYTES + 3, "header MAC")])
def test_a_tampered_reply_header_fails_the_pull_not_the_holder(holder, offset, what):
    relay = Relay(holder.address, holder.handshake_bytes, flip=("s2c", offset))
    t = _client("xxh3")  # the unkeyed path relies on the header MAC alone for its digests
    try:
        results, bufs = _pull(t, relay.address, [0, 1, 2, 3])
        assert all(r.outcome is Outcome.FAILED and "MAC" in r.reason for r in results), what
        results, bufs = _pull(t, relay.address, [0, 1])  # a new connection, untouched
        assert [r.outcome for r in results] == [Outcome.OK] * 2
        assert np.array_equal(bufs[1], chunk_bytes(SEED, 1, SIZE))
        assert holder.server.health().alive
    finally:
        t.close()
        relay.close()


@pytest.mark.parametrize("offset", [
    4 * wire.ITEM_HEADER_BYTES + wire.TAG_BYTES + 5,  # the first chunk's bytes
    4 * wire.ITEM_HEADER_BYTES + wire.TAG_BYTES + SIZE + 2,  # the first chunk's tag
    4 * wire.ITEM_HEADER_BYTES + wire.TAG_BYTES + 2 * (SIZE + wire.TAG_BYTES) + 100,
])
@pytest.mark.parametrize("mode", ["keyed", "sealed"])
def test_a_tampered_chunk_is_a_mismatch_on_the_keyed_path(holder, offset, mode):
    relay = Relay(holder.address, holder.handshake_bytes, flip=("s2c", offset))
    t = _client(mode)
    try:
        results, bufs = _pull(t, relay.address, [0, 1, 2, 3])
        bad = (offset - 4 * wire.ITEM_HEADER_BYTES - wire.TAG_BYTES) // (SIZE + wire.TAG_BYTES)
        assert [r.outcome for r in results] == [Outcome.FAILED if i == bad else Outcome.OK
                                                for i in range(4)]
        assert "checksum mismatch" in results[bad].reason
        for i in range(4):
            if i != bad:
                assert np.array_equal(bufs[i], chunk_bytes(SEED, i, SIZE))
    finally:
        t.close()
        relay.close()


def test_a_sealed_pull_returns_the_right_bytes_and_none_cross_in_clear(holder):
    relay = Relay(holder.address, holder.handshake_bytes)
    t = _client("sealed")
    try:
        for _ in range(2):  # two requests on one connection: two nonces
            results, bufs = _pull(t, relay.address, [0, 99, 1])
            assert [r.outcome for r in results] == [Outcome.OK, Outcome.MISSING, Outcome.OK]
            assert np.array_equal(bufs[0], chunk_bytes(SEED, 0, SIZE))
            assert np.array_equal(bufs[2], chunk_bytes(SEED, 1, SIZE))
        (conn,) = t.pool.idle()
        assert conn.sealed and conn.session.requests == 2
        wire_bytes = bytes(relay.received_by_puller)
        assert chunk_bytes(SEED, 0, SIZE).tobytes()[:64] not in wire_bytes
        assert len(wire_bytes) >= 4 * SIZE
    finally:
        t.close()
        relay.close()


def test_a_tampered_request_is_dropped_and_counted(holder):
    # byte 30 after the handshake: inside the first request's msgpack body
    relay = Relay(holder.address, holder.handshake_bytes, flip=("c2s", 30))
    t = _client("keyed")
    try:
        results, _ = _pull(t, relay.address, [0, 1])
        assert all(r.outcome is Outcome.FAILED for r in results)
        assert wait_until(lambda: holder.server.health().bad_macs == 1)
        results, _ = _pull(t, relay.address, [0, 1])
        assert [r.outcome for r in results] == [Outcome.OK] * 2
        h = holder.server.health()
        assert h.alive and h.bad_macs == 1 and h.counters()["server_bad_macs"] == 1
    finally:
        t.close()
        relay.close()


def test_a_request_replayed_on_its_connection_is_dropped_and_counted(holder):
    relay = Relay(holder.address, holder.handshake_bytes)
    t = _client("keyed")
    try:
        results, _ = _pull(t, relay.address, [2])
        assert results[0].outcome is Outcome.OK
        relay.inject(bytes(relay.sent_by_puller))  # request 0 again, as request 1
        assert wait_until(lambda: holder.server.health().bad_macs == 1)
        results, _ = _pull(t, relay.address, [2])  # its pooled connection is gone: fails
        results, bufs = _pull(t, relay.address, [2])  # and a new one serves
        assert results[0].outcome is Outcome.OK
        assert np.array_equal(bufs[0], chunk_bytes(SEED, 2, SIZE))
    finally:
        t.close()
        relay.close()


def _session_to(holder: Holder) -> tuple[socket.socket, Session]:
    sock, info, session = connect_session(parse_address(holder.address), KEY,
                                          time.monotonic() + 5)
    assert info.namespace == "ns"
    return sock, session


def _closed_unanswered(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_request_replayed_in_another_session_is_dropped_and_counted(holder):
    relay = Relay(holder.address, holder.handshake_bytes)
    t = _client("keyed")
    try:
        results, _ = _pull(t, relay.address, [1])
        assert results[0].outcome is Outcome.OK
        recorded = bytes(relay.sent_by_puller)
    finally:
        t.close()
        relay.close()
    sock, _ = _session_to(holder)
    with sock:
        sock.sendall(recorded)  # request 0, MACed under another connection's key
        assert _closed_unanswered(sock)
    assert wait_until(lambda: holder.server.health().bad_macs == 1)


def test_a_request_under_the_wrong_session_key_is_dropped_and_counted(holder):
    sock, session = _session_to(holder)
    wrong = Session(KEY, b"s" * wire.NONCE_BYTES, b"c" * wire.NONCE_BYTES)
    with sock:
        sock.sendall(sess.encode_request(wrong, wire.Pull([bytes(key_of(0))])))
        assert _closed_unanswered(sock)
    assert wait_until(lambda: holder.server.health().bad_macs == 1)
    # and the right key on a new connection is answered
    sock, session = _session_to(holder)
    with sock:
        sock.sendall(sess.encode_request(session, wire.Pull([bytes(key_of(0))],
                                                            namespace="ns")))
        table = sess.read_reply(sock, session, 0, wire.ITEM_HEADER_BYTES, 1,
                                time.monotonic() + 5)
        assert wire.unpack_item(table).status is wire.Status.OK
        assert recv_exact(sock, SIZE, time.monotonic() + 5) == chunk_bytes(SEED, 0, SIZE).tobytes()


def test_a_request_for_another_namespace_is_refused(holder):
    sock, session = _session_to(holder)
    with sock:
        sock.sendall(sess.encode_request(session, wire.Pull([bytes(key_of(0))],
                                                            namespace="other")))
        with pytest.raises(TransportError, match="WRONG_NAMESPACE"):
            sess.read_reply(sock, session, 0, wire.ITEM_HEADER_BYTES, 1,
                            time.monotonic() + 5)
        assert _closed_unanswered(sock)
    h = holder.server.health()
    assert h.wrong_namespace == 1 and h.alive


def test_a_request_for_another_epoch_is_refused_and_so_is_a_holder_of_another():
    h = Holder(epoch=7)
    try:
        sock, session = _session_to(h)
        with sock:
            sock.sendall(sess.encode_request(session, wire.Pull([bytes(key_of(0))],
                                                                namespace="ns", epoch=6)))
            with pytest.raises(TransportError, match="WRONG_EPOCH"):
                sess.read_reply(sock, session, 0, wire.ITEM_HEADER_BYTES, 1,
                                time.monotonic() + 5)
            assert _closed_unanswered(sock)
        health = h.server.health()
        assert health.wrong_epoch == 1 and health.alive
        assert health.counters()["server_wrong_epoch"] == 1
        t = _client("keyed")
        try:
            # the puller sees the holder's epoch in its PeerInfo: refused before a request
            results, bufs = _pull(t, h.address, [0], epoch=6)
            assert results[0].outcome is Outcome.FAILED and "epoch 7" in results[0].reason
            assert not bufs[0].any()
            # the epoch the directory named, and no epoch at all (not checked), are served
            for epoch in (7, 0):
                results, bufs = _pull(t, h.address, [0], epoch=epoch)
                assert results[0].outcome is Outcome.OK
                assert np.array_equal(bufs[0], chunk_bytes(SEED, 0, SIZE))
        finally:
            t.close()
        assert h.server.health().wrong_epoch == 1
    finally:
        h.close()


def test_a_keyed_pull_without_a_secret_is_a_bad_request():
    h = Holder(key=None)
    try:
        sock, info, session = connect_session(parse_address(h.address), None,
                                              time.monotonic() + 5)
        with sock:
            assert not session.authenticated
            sock.sendall(sess.encode_request(session, wire.Pull([bytes(key_of(0))],
                                                                keyed=True)))
            with pytest.raises(TransportError, match="BAD_REQUEST"):
                sess.read_reply(sock, session, 0, wire.ITEM_HEADER_BYTES, 1,
                                time.monotonic() + 5)
        t = _client("auto", key=None)  # without a secret auto is xxh3
        try:
            results, _ = _pull(t, h.address, [0])
            assert results[0].outcome is Outcome.OK and not t.pool.idle()[0].keyed
        finally:
            t.close()
    finally:
        h.close()


def test_keyed_pulls_from_a_holder_process_parts_and_a_corrupted_chunk(spawn):
    """Across processes: whole chunks, parts of chunks (``Pull.select``), and a chunk that
    changed in the holder's store after it was saved (the keyed tag covers the bytes as
    they are: the holder checks its stored digest too, so the puller still sees a
    mismatch)."""
    from p2pkv.transport.choose import make_transport
    from p2pkv.transport.selection import Selection

    secret = "a-cluster-secret-of-enough-bytes"
    size = 4 * 3 * 1000
    _, address = spawn(["-m", "tests.peer_process", "ready", str(size), "3", str(SEED)],
                       "ready", env={"P2PKV_TEST_SECRET": secret, "P2PKV_TEST_CORRUPT": "1"})
    t = make_transport("tcp", bind_host="127.0.0.1", secret=ClusterSecret(secret.encode()),
                       chunk_digest="keyed")
    try:
        bufs = [np.zeros(size, dtype=np.uint8) for _ in range(3)]
        results = t.pull(address, [PullItem(key_of(i), (memoryview(b),))
                                   for i, b in enumerate(bufs)], 10)
        assert [r.outcome for r in results] == [Outcome.OK, Outcome.FAILED, Outcome.OK]
        assert "checksum" in results[1].reason
        assert np.array_equal(bufs[2], chunk_bytes(SEED, 2, size))
        select = Selection(rows=3, row_bytes=1000, first_row=0, num_rows=3, offset=500,
                           length=250)
        parts = [np.zeros(select.nbytes(size), dtype=np.uint8) for _ in (0, 2)]
        results = t.pull(address, [PullItem(key_of(i), (memoryview(b),), select)
                                   for i, b in zip((0, 2), parts)], 10)
        assert [r.outcome for r in results] == [Outcome.OK] * 2
        for i, b in zip((0, 2), parts):
            whole = chunk_bytes(SEED, i, size)
            assert np.array_equal(b, np.concatenate([whole[a:a + n]
                                                     for a, n in select.ranges(size)]))
        assert t.pool.idle()[0].keyed
    finally:
        t.close()


def test_a_chunk_that_changes_after_its_hash_was_kept_is_a_mismatch(holder):
    t = _client("keyed")
    try:
        results, _ = _pull(t, holder.address, [0, 1])  # hashed and kept by the holder
        assert [r.outcome for r in results] == [Outcome.OK] * 2
        p = holder.store.pin(key_of(1))
        holder.store.slot_view(p.index)[7] ^= 0xFF
        holder.store.unpin(p)
        results, bufs = _pull(t, holder.address, [0, 1])  # from the kept hashes
        assert results[0].outcome is Outcome.OK
        assert np.array_equal(bufs[0], chunk_bytes(SEED, 0, SIZE))
        assert results[1].outcome is Outcome.FAILED and "checksum" in results[1].reason
    finally:
        t.close()


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_a_keyed_pull_from_a_holder_dying_or_stalling_mid_transfer(spawn, sig):
    """The keyed path under the faults of ``test_peer_dying_or_stalling_mid_transfer``:
    no hang past the deadline, and whatever is reported good is good."""
    import os
    import signal

    from p2pkv.transport.choose import make_transport

    secret = "a-cluster-secret-of-enough-bytes"
    size, n = 8 << 20, 24
    proc, address = spawn(["-m", "tests.peer_process", "ready", str(size), str(n), str(SEED)],
                          "ready", env={"P2PKV_TEST_SECRET": secret})
    t = make_transport("tcp", bind_host="127.0.0.1", secret=ClusterSecret(secret.encode()),
                       chunk_digest="keyed")
    signum = getattr(signal, sig)
    try:
        bufs = [np.zeros(size, dtype=np.uint8) for _ in range(n)]
        items = [PullItem(key_of(i), (memoryview(b),)) for i, b in enumerate(bufs)]
        assert t.pull(address, items[:1], 10)[0].outcome is Outcome.OK
        out: list = []
        th = threading.Thread(target=lambda: out.extend(t.pull(address, items, 1.5)))
        t0 = time.monotonic()
        th.start()
        time.sleep(0.03)
        os.kill(proc.pid, signum)
        th.join(10)
        assert not th.is_alive() and time.monotonic() - t0 < 4
        assert len(out) == n and any(r.outcome is Outcome.FAILED for r in out)
        for i, r in enumerate(out):
            if r.outcome is Outcome.OK:
                assert np.array_equal(bufs[i], chunk_bytes(SEED, i, size))
    finally:
        if signum == signal.SIGSTOP:
            os.kill(proc.pid, signal.SIGCONT)
        t.close()


def test_a_chunk_changed_in_the_store_is_a_mismatch_on_a_sealed_pull(holder):
    p = holder.store.pin(key_of(1))
    holder.store.slot_view(p.index)[7] ^= 0xFF
    holder.store.unpin(p)
    t = _client("sealed")
    try:
        results, bufs = _pull(t, holder.address, [0, 1])
        assert results[0].outcome is Outcome.OK
        assert np.array_equal(bufs[0], chunk_bytes(SEED, 0, SIZE))
        assert results[1].outcome is Outcome.FAILED and "checksum" in results[1].reason
    finally:
        t.close()
