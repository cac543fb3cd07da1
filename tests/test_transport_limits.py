"""The data-plane server under hostile load: caps on connections (waiting for a handshake and
authenticated), handshake and response deadlines, an accept loop that survives failures,
pin caps, health. Real sockets on loopback; the flood comes from another process."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from p2pkv.store import ChunkStore
from p2pkv.transport import wire
from p2pkv.transport.accept import ServerLimits
from p2pkv.transport.base import Outcome, PullItem
from p2pkv.transport.peer import PeerTransport
from p2pkv.transport.server import Server
from tests.conftest import wait_for_file, wait_until
from tests.peer_process import chunk_bytes, key_of

SEED = 5
FLOOD = 600  # sockets that never handshake: more than ServerLimits().max_handshaking


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _dest(size: int):
    buf = np.zeros(size, dtype=np.uint8)
    return buf, (memoryview(buf),)


def _pull_and_check(transport: PeerTransport, address: str, size: int, n: int,
                    timeout_s: float) -> float:
    bufs, items = [], []
    for i in range(n):
        buf, dest = _dest(size)
        bufs.append(buf)
        items.append(PullItem(key_of(i), dest))
    t0 = time.monotonic()
    results = transport.pull(address, items, timeout_s)
    elapsed = time.monotonic() - t0
    assert [r.outcome for r in results] == [Outcome.OK] * n, [r.reason for r in results]
    for i, buf in enumerate(bufs):
        assert np.array_equal(buf, chunk_bytes(SEED, i, size))
    return elapsed


def test_unauthenticated_flood_does_not_stop_a_real_puller(spawn, tmp_path: Path):
    size, n = 65_536, 4
    holder, address = spawn(["-m", "tests.peer_process", "ready", str(size), str(n),
                             str(SEED)], "ready")
    baseline = _fds(holder.pid)
    pooled = PeerTransport(bind_host="127.0.0.1")
    try:
        _pull_and_check(pooled, address, size, n, 5.0)  # its connection is made before
        # from another loopback address, as from another host (same-address floods: below)
        flooder, _ = spawn(["-m", "tests.flood_process", "flood", address, str(FLOOD),
                            "127.0.0.2"], "flood")
        worst, peak = 0.0, 0
        t_end = time.monotonic() + 8.0
        pulls = 0
        while time.monotonic() < t_end:
            worst = max(worst, _pull_and_check(pooled, address, size, n, 5.0))
            if pulls % 4 == 0:  # and a new connection through the flood, now and then
                fresh = PeerTransport(bind_host="127.0.0.1")
                try:
                    worst = max(worst, _pull_and_check(fresh, address, size, n, 5.0))
                finally:
                    fresh.close()
            peak = max(peak, _fds(holder.pid))
            pulls += 1
            time.sleep(0.05)
        opened = int(wait_for_file(tmp_path / "flood.opened", flooder))
        assert opened > FLOOD  # the server did close flood sockets, and they came back
        assert holder.poll() is None
        assert worst < 5.0
        # bounded: at most max_handshaking sockets in their handshake, plus a few
        assert peak <= baseline + ServerLimits().max_handshaking + 16, (baseline, peak)
        flooder.kill()
        flooder.wait()
        deadline = time.monotonic() + ServerLimits().handshake_s + 5
        while _fds(holder.pid) > baseline + 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _fds(holder.pid) <= baseline + 8
        _pull_and_check(pooled, address, size, n, 5.0)
    finally:
        pooled.close()


# -- in-process servers with small limits -------------------------------------------------


def _store(n: int, size: int = 1024, shared: bool = False) -> ChunkStore:
    store = ChunkStore(size, max(n, 1), shared=shared)
    for i in range(n):
        w = store.reserve(key_of(i))
        np.frombuffer(w.view, dtype=np.uint8)[:] = chunk_bytes(SEED, i, size)
        store.commit(w)
    return store


@pytest.fixture
def serve():
    made: list = []

    def _serve(store: ChunkStore, **kw) -> tuple[Server, str]:
        info = wire.PeerInfo(shm_path=store.shm_path, shm_ident=store.shm_ident,
                             slab_bytes=store.slab_bytes, slot_bytes=store.slot_bytes)
        server = Server(store, "127.0.0.1", None, info, **kw)
        made.append((server, store))
        return server, f"127.0.0.1:{server.port}"

    yield _serve
    for server, store in made:
        server.close()
        store.close()


def _raw(address: str, source: str = "") -> socket.socket:
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5,
                                 source_address=(source, 0) if source else None)
    s.settimeout(5)
    return s


def _read(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            got = s.recv(n - len(buf))
        except (ConnectionResetError, TimeoutError):
            break
        if not got:
            break
        buf += got
    return buf


def _authenticated(address: str) -> socket.socket:
    s = _raw(address)
    _, nonce_s = wire.unpack_hello(_read(s, wire.HELLO_BYTES))
    s.sendall(wire.pack_proof(b"n" * wire.NONCE_BYTES, bytes(wire.MAC_BYTES)))
    status, _, n = wire.unpack_verdict(_read(s, wire.VERDICT_BYTES))
    assert status == wire.Status.OK
    _read(s, n)
    return s


def test_handshake_caps_drop_the_flood_and_a_real_peer_gets_through(serve):
    limits = ServerLimits(max_handshaking=4, handshaking_per_address=3, max_connections=8,
                          handshake_s=30)
    server, address = serve(_store(1), limits=limits)
    silent = [_raw(address, source="127.0.0.3") for _ in range(10)]
    # one address: 3 at most (waiting for both: the selector thread counts a refusal before
    # the handshake that replaced it)
    assert wait_until(lambda: server.health().refused >= 7 and server.health().handshaking == 3), \
        server.health()
    client = PeerTransport()
    try:
        buf, dest = _dest(1024)
        (r,) = client.pull(address, [PullItem(key_of(0), dest)], 5)
        assert r.outcome is Outcome.OK
        # from the puller's own address too: the oldest handshakes go, the new one stays
        silent += [_raw(address) for _ in range(6)]
        assert wait_until(lambda: server.health().refused >= 12
                     and server.health().handshaking == 4), server.health()
        fresh = PeerTransport()
        try:
            (r,) = fresh.pull(address, [PullItem(key_of(0), dest)], 5)
            assert r.outcome is Outcome.OK and np.array_equal(buf,
                                                              chunk_bytes(SEED, 0, 1024))
            assert wait_until(lambda: server.health().connections == 2)  # both pools' idle ones
            h = server.health()
            assert h.alive and h.saturated
        finally:
            fresh.close()
    finally:
        client.close()
        for s in silent:
            s.close()


def test_connection_cap_accepts_and_closes(serve):
    server, address = serve(_store(1), limits=ServerLimits(max_handshaking=2,
                                                           max_connections=3))
    held = [_authenticated(address) for _ in range(3)]
    assert wait_until(lambda: server.health().connections == 3)
    try:  # accepted, then reset at once: no hello (or the reset beats connect() itself)
        assert _read(_raw(address), wire.HELLO_BYTES) == b""
    except ConnectionResetError:
        pass
    assert wait_until(lambda: server.health().refused == 1)
    assert server.health().saturated
    held.pop().close()
    assert wait_until(lambda: server.health().connections == 2)
    _authenticated(address).close()  # room again
    for s in held:
        s.close()


def test_silent_connection_is_cut_at_the_handshake_deadline(serve):
    server, address = serve(_store(1), limits=ServerLimits(handshake_s=0.5))
    s = _raw(address)
    assert len(_read(s, wire.HELLO_BYTES)) == wire.HELLO_BYTES
    t0 = time.monotonic()
    assert _read(s, 1) == b""
    assert time.monotonic() - t0 < 3
    assert wait_until(lambda: server.health().expired == 1 and server.health().handshaking == 0)


def test_accept_loop_survives_failing_thread_starts(serve):
    failures = []

    def start_thread(target):
        if len(failures) < 3:
            failures.append(1)
            raise RuntimeError("can't start new thread")
        import threading
        threading.Thread(target=target, daemon=True).start()

    server, address = serve(_store(1), start_thread=start_thread)
    for _ in range(3):
        client = PeerTransport()
        try:
            _, dest = _dest(1024)
            (r,) = client.pull(address, [PullItem(key_of(0), dest)], 5)
            assert r.outcome is Outcome.FAILED
        finally:
            client.close()
    client = PeerTransport()
    try:
        buf, dest = _dest(1024)
        (r,) = client.pull(address, [PullItem(key_of(0), dest)], 5)
        assert r.outcome is Outcome.OK and np.array_equal(buf, chunk_bytes(SEED, 0, 1024))
    finally:
        client.close()
    h = server.health()
    assert h.alive and h.thread_failures == 3 and h.loop_errors == 0


def _pin(s: socket.socket, keys: list[int]) -> list[wire.PinHeader]:
    s.sendall(wire.encode_request(wire.Pin([bytes(key_of(i)) for i in keys])))
    table = _read(s, wire.PIN_HEADER_BYTES * len(keys))
    assert len(_read(s, wire.TAG_BYTES)) == wire.TAG_BYTES  # the reply's MAC (v4)
    n = wire.PIN_HEADER_BYTES
    return [wire.unpack_pin(table[i * n:(i + 1) * n]) for i in range(len(keys))]


def test_pins_are_capped_per_peer_and_per_connection(serve):
    server, address = serve(_store(8, shared=True),
                            limits=ServerLimits(pins_per_peer=3, pins_per_conn=4))
    a, b = _authenticated(address), _authenticated(address)
    got = _pin(a, [0, 1, 2, 3, 4][:4])
    assert [h.status for h in got] == [wire.Status.OK] * 3 + [wire.Status.MISSING]
    assert [h.status for h in _pin(b, [5])] == [wire.Status.MISSING]  # the peer's cap
    assert server.health().pins_refused == 2
    a.sendall(wire.encode_request(wire.Release([(got[0].slot, got[0].generation)])))
    assert wait_until(lambda: _pin(b, [5])[0].status is wire.Status.OK)
    # over the per-connection cap: a bad request, and the connection is closed
    b.sendall(wire.encode_request(wire.Pin([bytes(key_of(i)) for i in range(4)])))
    status, _, _ = wire.unpack_item(_read(b, wire.ITEM_HEADER_BYTES))
    assert status is wire.Status.BAD_REQUEST
    assert len(_read(b, wire.TAG_BYTES)) == wire.TAG_BYTES  # the reply's MAC (v4)
    assert _read(b, 1) == b""
    a.close()  # every pin of a closed connection goes back: all of the peer's cap is free
    c = _authenticated(address)
    assert wait_until(lambda: server.health().connections == 1)
    assert [h.status for h in _pin(c, [0, 1, 2])] == [wire.Status.OK] * 3
    c.close()


def test_a_reader_that_stops_is_cut_at_the_response_deadline(serve):
    size = 32 << 20  # far more than the socket buffers hold
    store = _store(1, size=size)
    server, address = serve(store, limits=ServerLimits(response_s=1.0))
    s = _authenticated(address)
    assert wait_until(lambda: server.health().connections == 1)
    s.sendall(wire.encode_request(wire.Pull([bytes(key_of(0))])))  # and never reads
    t0 = time.monotonic()
    assert wait_until(lambda: server.health().connections == 0, 5.0)
    assert time.monotonic() - t0 < 4
    # the chunk was unpinned: a new key can evict it from the one-slot store
    assert store.reserve(key_of(1)) is not None
    s.close()


# -- same host: the slab a PeerInfo names ---------------------------------------------------


def _fifo_fd(tmp_path: Path) -> int:
    """A FIFO nobody writes to, open here (so /proc/<us>/fd/<n> names it): opening that
    path for reading without O_NONBLOCK would block for ever."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def test_a_peer_info_naming_a_fifo_or_any_other_path_is_refused_without_blocking(tmp_path):
    from p2pkv.transport.shm import host_id, open_peer_slab

    fifo = _fifo_fd(tmp_path)
    zero = os.open("/dev/zero", os.O_RDONLY)
    plain = tmp_path / "plain"
    plain.write_bytes(b"\0" * 4096)
    try:
        st = os.stat(plain)
        cases = {
            f"/proc/{os.getpid()}/fd/{fifo}": "not a regular file",
            f"/proc/{os.getpid()}/fd/{zero}": "not a regular file",
            str(plain): "is not /proc/<pid>/fd/<n>",
            f"/proc/{os.getpid()}/fd/../../self/environ": "is not /proc/<pid>/fd/<n>",
        }
        for path, why in cases.items():
            info = wire.PeerInfo(host_id=host_id(), shm_path=path,
                                 shm_ident=f"{st.st_dev}:{st.st_ino}", slab_bytes=4096,
                                 slot_bytes=1024)
            t0 = time.monotonic()
            slab, reason = open_peer_slab(info, host_id())
            assert slab is None and why in reason, (path, reason)
            assert time.monotonic() - t0 < 1
    finally:
        os.close(fifo)
        os.close(zero)


def test_a_holder_naming_a_fifo_is_pulled_from_over_tcp_within_the_deadline(tmp_path):
    from p2pkv.transport.choose import make_transport
    from p2pkv.transport.shm import host_id

    fifo = _fifo_fd(tmp_path)
    store = _store(2)
    info = wire.PeerInfo(host_id=host_id(), shm_path=f"/proc/{os.getpid()}/fd/{fifo}",
                         shm_ident="0:0", slab_bytes=2048, slot_bytes=1024)
    server = Server(store, "127.0.0.1", None, info)
    puller = make_transport("shm", bind_host="127.0.0.1")
    try:
        buf, dest = _dest(1024)
        t0 = time.monotonic()
        (r,) = puller.pull(f"127.0.0.1:{server.port}", [PullItem(key_of(1), dest)], 3)
        assert r.outcome is Outcome.OK and np.array_equal(buf, chunk_bytes(SEED, 1, 1024))
        assert time.monotonic() - t0 < 3 and puller.counters.tcp == 1
    finally:
        puller.close()
        server.close()
        store.close()
        os.close(fifo)


# -- binding ------------------------------------------------------------------------------


def test_no_secret_means_loopback_only_like_the_directory():
    from p2pkv.errors import ConfigError
    from p2pkv.transport.choose import is_loopback_host, make_transport

    assert all(map(is_loopback_host, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback_host, ["0.0.0.0", "", "10.0.0.1", "::", "node-1"]))
    for host in ("0.0.0.0", "10.0.0.1"):
        with pytest.raises(ConfigError, match="without a cluster secret"):
            make_transport("tcp", bind_host=host)  # refused before anything binds
    make_transport("tcp", bind_host="127.0.0.1").close()


# -- logs under a flood -------------------------------------------------------------------


def test_refusals_are_logged_rate_limited_whatever_the_peer_sends(serve, caplog):
    import secrets

    server, address = serve(_store(1))
    caplog.set_level("WARNING", logger="p2pkv.transport.accept")
    for _ in range(40):  # each with another random "version" and MAC
        s = _raw(address)
        _read(s, wire.HELLO_BYTES)
        s.sendall(secrets.token_bytes(wire.PROOF_BYTES))
        _read(s, 1)
        s.close()
    assert wait_until(lambda: server.health().failed_handshakes == 40)
    refused = [r for r in caplog.records if "refused a data-plane peer" in r.getMessage()]
    assert 1 <= len(refused) <= 2, [r.getMessage() for r in refused]


def test_rate_limited_log_counts_what_it_held_back(caplog):
    import logging

    from p2pkv.ratelog import RateLimitedLog

    now = [0.0]
    log = RateLimitedLog(logging.getLogger("p2pkv.test"), interval_s=10, clock=lambda: now[0])
    caplog.set_level("INFO", logger="p2pkv.test")
    assert log.info("a", "one %s", 1) and not log.info("a", "two") and log.info("b", "other")
    now[0] = 11
    assert log.info("a", "three")
    assert [r.getMessage() for r in caplog.records] == [
        "one 1", "other", "three (and 1 more like it in the last 10 s)"]


def test_fault_bench_catches_a_corrupted_chunk_and_returns_no_wrong_bytes():
    from p2pkv.bench.faults import _case

    row = _case("corrupt", 1.0, None, corrupt=3)
    assert row.sent > 0 and row.caught > 0 and row.wrong == 0 and row.failed == 0


# -- a reused address ---------------------------------------------------------------------


@pytest.mark.parametrize("served, ours, ok", [
    ("model-b", "model-a", False),  # the address is now another namespace's instance
    ("model-a", "model-a", True),
    ("", "model-a", True),  # a holder from before PeerInfo.namespace: not checked
])
def test_a_holder_of_another_namespace_is_refused(served, ours, ok):
    from p2pkv.keys import Namespace

    store = _store(1)
    server = Server(store, "127.0.0.1", None, wire.PeerInfo(namespace=served))
    puller = PeerTransport(namespace=Namespace(ours))
    try:
        buf, dest = _dest(1024)
        (r,) = puller.pull(f"127.0.0.1:{server.port}", [PullItem(key_of(0), dest)], 3)
        if ok:
            assert r.outcome is Outcome.OK and np.array_equal(buf, chunk_bytes(SEED, 0, 1024))
        else:
            assert r.outcome is Outcome.FAILED and "serves namespace model-b" in r.reason
    finally:
        puller.close()
        server.close()
        store.close()
