"""TCP transport: plain sockets, zero-copy ``recv_into`` straight into destination memory,
and the same-host shared-memory path on the same connection.

The server side lives in :mod:`p2pkv.transport.server`. The client side keeps a small pool of
authenticated connections per peer and puts a deadline on every wait. When the holder's
``PeerInfo`` says it runs on this host and its slab file opens here (and ``same_host`` is on),
chunks are copied straight out of the holder's slab (:mod:`p2pkv.transport.shm`); otherwise
their bytes come over the socket. Framing lives in :mod:`p2pkv.transport.wire`.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from p2pkv.errors import ChecksumMismatch, DeadlineExceeded, TransportError
from p2pkv.store import ChunkStore
from p2pkv.transport import wire
from p2pkv.transport.base import Outcome, PullItem, PullResult, Transport
from p2pkv.transport.server import Server
from p2pkv.transport.shm import MappedSlab, copy_and_digest, host_id, open_peer_slab
from p2pkv.transport.staging import host_pieces, pinned_host, scatter
from p2pkv.transport.sockio import (
    make_blocking,
    parse_address,
    recv_exact,
    recv_views,
    send_views,
)

logger = logging.getLogger(__name__)

CLIENT_IDLE_S = 60.0  # a client reuses an idle connection only this long (< SERVER_IDLE_S)
HASH_STEP = 4 << 20  # bytes received per system call before they are hashed


def _groups(views: Sequence[memoryview], step: int) -> list[list[memoryview]]:
    """``views`` cut into consecutive groups of about ``step`` bytes (pieces split as needed)."""
    out: list[list[memoryview]] = [[]]
    room = step
    for v in views:
        v = v.cast("B") if v.format != "B" or v.ndim != 1 else v
        while v.nbytes:
            if room == 0:
                out.append([])
                room = step
            take = min(room, v.nbytes)
            out[-1].append(v[:take])
            v, room = v[take:], room - take
    return out


@dataclass(slots=True)
class PathCounters:
    """How many pulls went over each path (tests and the benchmark check which one ran)."""

    tcp: int = 0
    shm: int = 0
    ucx: int = 0


class _Conn:
    """One authenticated connection to a holder, with its slab mapped if it is on this host."""

    def __init__(self, sock: socket.socket, info: wire.PeerInfo, slab: MappedSlab | None):
        self.sock, self.info, self.slab = sock, info, slab

    def close(self) -> None:
        self.sock.close()
        if self.slab is not None:
            self.slab.close()


class TcpTransport(Transport):
    name = "tcp"

    def __init__(self, *, bind_host: str = "127.0.0.1", advertise_host: str | None = None,
                 connections_per_peer: int = 2, key: bytes | None = None,
                 same_host: bool = False) -> None:
        """``key``: the data-plane key derived from the cluster secret (None: no auth).
        ``same_host``: serve from a shared slab and copy from same-host holders' slabs."""
        self._bind_host = bind_host
        self._advertise_host = advertise_host or bind_host
        self._max_idle = connections_per_peer
        self._key = key
        self._same_host = same_host
        self._host_id = host_id()
        self._server: Server | None = None
        self._stores: list[ChunkStore] = []
        self._idle: dict[tuple[str, int], list[tuple[_Conn, float]]] = {}
        self._told: set[tuple[str, int]] = set()  # peers whose no-shm reason was logged
        self._lock = threading.Lock()
        self.counters = PathCounters()
        if same_host:
            self.name = "shm"

    def create_store(self, slot_bytes: int, capacity: int) -> ChunkStore:
        store = ChunkStore(slot_bytes, capacity, shared=self._same_host)
        self._stores.append(store)
        return store

    def serve(self, store: ChunkStore) -> str:
        assert self._server is None, "serve() called twice"
        info = wire.PeerInfo(host_id=self._host_id, shm_path=store.shm_path,
                             shm_ident=store.shm_ident,
                             slab_bytes=store.slab_bytes, slot_bytes=store.slot_bytes)
        self._server = self._make_server(store, info)
        address = f"{self._advertise_host}:{self._server.port}"
        logger.info("p2pkv %s transport serving on %s (%s)", self.name, address,
                    "authenticated" if self._key else "UNAUTHENTICATED: no cluster secret")
        return address

    def _make_server(self, store: ChunkStore, info: wire.PeerInfo) -> Server:
        return Server(store, self._bind_host, self._key, info)

    def pull(self, address: str, items: Sequence[PullItem], timeout_s: float) -> list[PullResult]:
        deadline = time.monotonic() + timeout_s
        try:
            peer = parse_address(address)
            conn = self._checkout(peer, deadline)
        except (OSError, TransportError) as e:
            return [PullResult(i.key, Outcome.FAILED, f"connect {address}: {e}") for i in items]
        t_connected = time.monotonic()
        try:
            path, results = self._pull_on(conn, items, deadline)
        except (OSError, TransportError) as e:
            conn.close()
            return [PullResult(i.key, Outcome.FAILED, f"{address}: {e}") for i in items]
        self._checkin(peer, conn)
        logger.debug("pull of %d items from %s (%s): connect %.1f ms, transfer %.1f ms",
                     len(items), address, path, (t_connected - deadline + timeout_s) * 1000,
                     (time.monotonic() - t_connected) * 1000)
        return results

    def _pull_on(self, conn: _Conn, items: Sequence[PullItem], deadline: float
                 ) -> tuple[str, list[PullResult]]:
        """Move the bytes over the best path this connection offers; returns its name."""
        if conn.slab is not None:
            self.counters.shm += 1
            return "shm", self._pull_shared(conn, items, deadline)
        self.counters.tcp += 1
        return "tcp", self._pull_stream(conn.sock, items, deadline)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for store in self._stores:
            store.close()
        with self._lock:
            for conns in self._idle.values():
                for conn, _ in conns:
                    conn.close()
            self._idle.clear()

    # -- the two ways bytes travel ----------------------------------------------------------

    @staticmethod
    def _pull_stream(sock: socket.socket, items: Sequence[PullItem], deadline: float
                     ) -> list[PullResult]:
        headers = request_items(sock, wire.Pull([bytes(i.key) for i in items]), items,
                                deadline)
        results = []
        for item, (status, _, want) in zip(items, headers):
            if status is wire.Status.MISSING:
                results.append(missing(item))
                continue
            if not host_pieces(item.dest):
                # GPU destination: into a pinned host buffer, checked, then one copy up
                staging = pinned_host(item.nbytes)
                got = _recv_hashed(sock, [memoryview(staging)], deadline)
                result = _checked(item, got, want)
                if result.outcome is Outcome.OK:
                    scatter(staging, item.dest)
                results.append(result)
                continue
            # NOTE: one receive per chunk (per HASH_STEP of it), not one for the whole
            # response: measured faster (a single huge MSG_WAITALL receive ran at ~2/3 of the
            # speed on loopback). Each piece is hashed right after it lands, while it is still
            # in cache and while the kernel keeps receiving the next one: the digest then
            # overlaps the transfer instead of adding to it (~15 % of a 64 MiB pull).
            results.append(_checked(item, _recv_hashed(sock, item.dest, deadline), want))
        return results

    @staticmethod
    def _pull_shared(conn: _Conn, items: Sequence[PullItem], deadline: float
                     ) -> list[PullResult]:
        assert conn.slab is not None
        sock, info = conn.sock, conn.info
        send_views(sock, [wire.encode_request(wire.Pin([bytes(i.key) for i in items]))],
                   max(deadline - time.monotonic(), 0.001))
        table = recv_exact(sock, wire.PIN_HEADER_BYTES * len(items), deadline)
        n = wire.PIN_HEADER_BYTES
        headers = [wire.unpack_pin(table[i * n:(i + 1) * n]) for i in range(len(items))]
        pinned = [(slot, gen) for status, _, _, slot, gen in headers
                  if status is wire.Status.OK]
        try:
            results = []
            for item, (status, nbytes, want, slot, _) in zip(items, headers):
                if status is wire.Status.MISSING:
                    results.append(missing(item))
                    continue
                if status is not wire.Status.OK:
                    raise TransportError(f"holder answered {status.name}")
                if nbytes != item.nbytes or nbytes > info.slot_bytes or slot * info.slot_bytes \
                        + nbytes > info.slab_bytes:
                    raise TransportError(f"bad pin reply: slot {slot}, {nbytes} bytes, "
                                         f"expected {item.nbytes}")
                if time.monotonic() > deadline:
                    raise DeadlineExceeded("deadline passed while copying")
                off = slot * info.slot_bytes
                src = conn.slab.array[off:off + nbytes]
                if host_pieces(item.dest):
                    results.append(_checked(item, copy_and_digest(src, item.dest), want))
                    continue
                # GPU destination: DMA straight from the mapped slab, hashed meanwhile
                dma = conn.slab.device_array()[off:off + nbytes]
                good = scatter(dma, item.dest,
                               verify=lambda s=src, w=want: xxhash.xxh3_64_intdigest(s) == w)
                results.append(PullResult(item.key, Outcome.OK) if good else mismatch(item))
        finally:
            if pinned:
                send_views(sock, [wire.encode_request(wire.Release(pinned))],
                           max(deadline - time.monotonic(), 0.001))
        return results

    # -- connections ------------------------------------------------------------------------

    def _checkout(self, peer: tuple[str, int], deadline: float) -> _Conn:
        now = time.monotonic()
        with self._lock:
            conns = self._idle.get(peer, [])
            while conns:
                conn, since = conns.pop()
                if now - since < CLIENT_IDLE_S:
                    return conn
                conn.close()
        sock, info = connect_peer(peer, self._key, deadline)
        try:
            return _Conn(sock, info, self._map_slab(peer, info))
        except BaseException:
            sock.close()
            raise

    def _map_slab(self, peer: tuple[str, int], info: wire.PeerInfo) -> MappedSlab | None:
        if not self._same_host:
            return None
        slab, reason = open_peer_slab(info, self._host_id)
        if slab is None and peer not in self._told:
            self._told.add(peer)
            logger.info("p2pkv: pulling from %s:%s over tcp, not shm: %s", *peer, reason)
        return slab

    def _checkin(self, peer: tuple[str, int], conn: _Conn) -> None:
        with self._lock:
            conns = self._idle.setdefault(peer, [])
            if len(conns) < self._max_idle:
                conns.append((conn, time.monotonic()))
                return
        conn.close()


def _recv_hashed(sock: socket.socket, dest: Sequence[memoryview], deadline: float) -> int:
    """Receive into ``dest``; the xxh3-64 of what arrived."""
    h = xxhash.xxh3_64()
    for group in _groups(dest, HASH_STEP):
        recv_views(sock, group, deadline)
        for v in group:
            h.update(v)
    return h.intdigest()


def connect_peer(peer: tuple[str, int], key: bytes | None, deadline: float
                 ) -> tuple[socket.socket, wire.PeerInfo]:
    """A new authenticated connection to the holder at ``peer`` and its PeerInfo, by
    ``deadline``; raises ``wire.AuthError`` (not a member), DeadlineExceeded, OSError or
    TransportError. Used by ``TcpTransport`` and ``p2pkv doctor``."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("deadline passed before connecting")
    sock = socket.create_connection(peer, timeout=left)
    try:
        make_blocking(sock)
        return sock, client_handshake(sock, key, deadline)
    except BaseException:
        sock.close()
        raise


def client_handshake(sock: socket.socket, key: bytes | None, deadline: float) -> wire.PeerInfo:
    """The client half of the data-plane handshake (see ``wire``) on a connected blocking
    socket; returns the holder's PeerInfo. Raises ``wire.AuthError`` when either side is not
    a member, TransportError/OSError for the rest."""
    auth, nonce_s = wire.unpack_hello(recv_exact(sock, wire.HELLO_BYTES, deadline))
    if key is not None and not auth:
        raise wire.AuthError("peer has no cluster secret: refusing an unauthenticated peer")
    nonce_c = secrets.token_bytes(wire.NONCE_BYTES)
    proof = wire.mac(key, b"c", nonce_s, nonce_c)
    send_views(sock, [wire.pack_proof(nonce_c, proof)], max(deadline - time.monotonic(), 0.001))
    status, proof_s, n = wire.unpack_verdict(recv_exact(sock, wire.VERDICT_BYTES, deadline))
    if status != wire.Status.OK:
        raise wire.AuthError("peer refused us: wrong or missing cluster secret")
    if not secrets.compare_digest(proof_s, wire.mac(key, b"s", nonce_c, nonce_s)):
        raise wire.AuthError("peer failed to prove it holds the cluster secret")
    return wire.decode_info(recv_exact(sock, n, deadline))


def request_items(sock: socket.socket, request: wire.Pull | wire.Send,
                  items: Sequence[PullItem], deadline: float) -> list[tuple[wire.Status, int, int]]:
    """Send a request that is answered with one ItemHeader per item (``Pull``, ``Send``) and
    return the headers, checked against ``items``.

    NOTE: raising closes the connection: the stream cannot be resynchronised."""
    send_views(sock, [wire.encode_request(request)], max(deadline - time.monotonic(), 0.001))
    table = recv_exact(sock, wire.ITEM_HEADER_BYTES * len(items), deadline)
    n = wire.ITEM_HEADER_BYTES
    headers = [wire.unpack_item(table[i * n:(i + 1) * n]) for i in range(len(items))]
    for item, (status, nbytes, _) in zip(items, headers):
        if status not in (wire.Status.OK, wire.Status.MISSING):
            raise TransportError(f"holder answered {status.name}")
        if status is wire.Status.OK and nbytes != item.nbytes:
            raise TransportError(f"chunk of {nbytes} bytes, expected {item.nbytes}")
    return headers


def missing(item: PullItem) -> PullResult:
    return PullResult(item.key, Outcome.MISSING, "holder no longer has it")


def mismatch(item: PullItem) -> PullResult:
    return PullResult(item.key, Outcome.FAILED, str(ChecksumMismatch("checksum mismatch")))


def _checked(item: PullItem, got: int, want: int) -> PullResult:
    return mismatch(item) if got != want else PullResult(item.key, Outcome.OK)
