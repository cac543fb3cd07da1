"""Pull once per instance, relay to the sibling ranks: equal slices over the network once.

Where several worker ranks of an instance hold the same slice (MLA's latent KV, the same on
every TP rank; KV heads replicated because ``num_kv_heads < tp``), each of them needs the
same bytes of a remote hit. Only the lowest of them, the *leader*, pulls them from the
holder: into slots of a shared-memory slab it owns (``store.SharedSlab``, an unlinked
/dev/shm file), announces each landed chunk to its *followers* (the sibling ranks on its
host) over a loopback connection, and copies it into its own blocks. A follower copies the
announced slot into its own blocks, checks the digest the leader sent, and says when it is
done (the leader then reuses the slots).

Failures: a chunk the leader could not pull is announced as failed (with its outcome), so
every rank fails the same chunks; a follower whose leader is gone (end of file) or silent
past the load's deadline fails what it has not received; a slot the leader reused early
(a follower slower than ``hold_s``) fails the digest check. vLLM unions the ranks' failed
blocks (``KVOutputAggregator``), so every rank then recomputes the same blocks. A load the
leader has no free slots for is announced as skipped: every rank pulls it itself, as
without a relay.

Rendezvous: every rank calls :func:`join_relay` at ``register_kv_caches``; the ranks swap
:class:`RelayEndpoint` s through an injected ``exchange`` (the connector passes a gather over
vLLM's world group), and followers connect to their leader on the same host. Ranks on
another host than their leader pull for themselves.

The relay's messages (``Msg``) never leave one instance; their version is ``RELAY_VERSION``
(1: first). Used by :class:`p2pkv.vllm.worker.WorkerSide`; unit-tested in
``tests/test_vllm_relay.py`` with real threads and sockets on loopback.
"""

from __future__ import annotations

import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec
import numpy as np

from p2pkv.errors import TransportError
from p2pkv.slices import KVSlice
from p2pkv.store import SharedSlab, shm_room
from p2pkv.transport.shm import MappedSlab, host_id

logger = logging.getLogger(__name__)

RELAY_VERSION = 1
HANDSHAKE_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 1.0
"""A follower that does not take an announcement within this is dropped (it then fails its
pending loads: end of file)."""
FRAME_TIMEOUT_S = 5.0
"""A message begun must end within this (else the connection is broken)."""
_FRAME = struct.Struct("!I")
_MAX_FRAME = 16 << 20


class Hello(msgspec.Struct, tag=True, frozen=True):
    version: int
    rank: int
    token: str


class Welcome(msgspec.Struct, tag=True, frozen=True):
    version: int
    slab_path: str
    slab_ident: str
    slab_bytes: int
    slot_bytes: int


class Relayed(msgspec.Struct, frozen=True):
    """Chunk ``index`` of a load's part: ``nbytes`` in ``slot`` with xxh3-64 ``digest`` when
    ``outcome`` is ``ok``; else the leader's outcome (``missing``/``failed``) and why."""

    index: int
    slot: int
    nbytes: int
    digest: int
    outcome: str
    reason: str = ""


class Landed(msgspec.Struct, tag=True, frozen=True):
    """Chunks of request ``req_id``'s part ``part`` (its index in the rank's sources)."""

    req_id: str
    part: int
    chunks: list[Relayed]


class Skip(msgspec.Struct, tag=True, frozen=True):
    """The leader does not relay ``req_id``: every rank pulls it itself."""

    req_id: str
    reason: str


class Taken(msgspec.Struct, tag=True, frozen=True):
    """A follower is done with ``req_id``'s slots (``chunks`` good, ``nbytes`` copied)."""

    req_id: str
    rank: int
    chunks: int
    nbytes: int


Msg = Hello | Welcome | Landed | Skip | Taken
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Msg)


def _send(sock: socket.socket, msg: Msg) -> None:
    body = _encoder.encode(msg)
    sock.sendall(_FRAME.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int, *, idle_ok: bool) -> bytes:
    """``n`` bytes from ``sock`` (whose timeout is set). TimeoutError only when nothing of
    them came and ``idle_ok``: a frame begun is read to its end (within FRAME_TIMEOUT_S)."""
    buf = bytearray()
    deadline = time.monotonic() + FRAME_TIMEOUT_S
    while len(buf) < n:
        try:
            got = sock.recv(n - len(buf))
        except TimeoutError:
            if (idle_ok and not buf) or time.monotonic() > deadline:
                raise
            continue
        if not got:
            raise ConnectionError("relay peer closed the connection")
        buf += got
    return bytes(buf)


def _recv(sock: socket.socket, *, idle_ok: bool = False) -> Msg:
    """One message; TimeoutError (with ``idle_ok``) when none began within the socket's
    timeout."""
    (n,) = _FRAME.unpack(_recv_exact(sock, _FRAME.size, idle_ok=idle_ok))
    if n > _MAX_FRAME:
        raise ConnectionError(f"relay frame of {n} bytes")
    return _decoder.decode(_recv_exact(sock, n, idle_ok=False))


@dataclass(frozen=True, slots=True)
class RelayEndpoint:
    """What a rank tells the others at start-up: its host, and (a leader) where followers
    connect and the token they must show."""

    rank: int
    host: str
    address: str = ""
    token: str = ""


Exchange = Callable[[RelayEndpoint], Sequence[RelayEndpoint]]
"""Every rank passes its own endpoint and gets every rank's (a collective: all ranks call it)."""


def relay_leader(slices: Sequence[KVSlice], rank: int) -> int:
    """The lowest rank holding ``rank``'s slice: the one that pulls it for the others."""
    return list(slices).index(slices[rank])


def has_replicas(slices: Sequence[KVSlice]) -> bool:
    """Some ranks hold equal slices (MLA, replicated KV heads): a relay is worth joining."""
    return len(set(slices)) < len(slices)


@dataclass(slots=True)
class _Hold:
    slots: list[int]
    waiting: set[int]
    expires: float


@dataclass(slots=True)
class _Follower:
    rank: int
    sock: socket.socket
    lock: threading.Lock = field(default_factory=threading.Lock)


class RelayLeader:
    """The leader's slab of ``capacity`` slots of ``slot_bytes``, its listener, its followers."""

    def __init__(self, slot_bytes: int, capacity: int, *, hold_s: float,
                 bind_host: str = "127.0.0.1", clock: Callable[[], float] = time.monotonic
                 ) -> None:
        if slot_bytes <= 0 or capacity <= 0:
            raise ValueError("slot_bytes and capacity must be positive")
        self.slot_bytes, self.capacity = slot_bytes, capacity
        self._slab = SharedSlab(slot_bytes * capacity)
        self._array = np.frombuffer(self._slab.map, dtype=np.uint8)
        self.token = secrets.token_hex(16)
        self._hold_s = hold_s
        self._clock = clock
        self._lock = threading.Lock()  # guards the fields below
        self._free = list(range(capacity - 1, -1, -1))
        self._holds: dict[str, _Hold] = {}
        self._followers: dict[int, _Follower] = {}
        self.chunks_relayed = 0  # chunk parts followers took good (Taken)
        self.bytes_relayed = 0
        self._closed = False
        self._listener = socket.create_server((bind_host, 0))
        self._listener.settimeout(0.5)
        host, port = self._listener.getsockname()[:2]
        self.address = f"{host}:{port}"
        self._thread = threading.Thread(target=self._accept_loop, name="p2pkv-relay",
                                        daemon=True)
        self._thread.start()

    @property
    def followers(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._followers)

    def view(self, slot: int, nbytes: int) -> memoryview:
        assert 0 <= slot < self.capacity and nbytes <= self.slot_bytes
        off = slot * self.slot_bytes
        return memoryview(self._array[off:off + nbytes]).cast("B")

    def acquire(self, req_id: str, n: int, followers: Sequence[int]) -> list[int] | None:
        """``n`` slots for ``req_id``, held until every one of ``followers`` took it (or
        ``hold_s``); None when not enough are free."""
        with self._lock:
            now = self._clock()
            for req, hold in list(self._holds.items()):
                if hold.expires <= now:
                    self._release(req)
            if n > len(self._free) or req_id in self._holds:
                return None
            slots = [self._free.pop() for _ in range(n)]
            self._holds[req_id] = _Hold(slots, set(followers), now + self._hold_s)
            return slots

    def announce(self, msg: Landed | Skip, followers: Sequence[int]) -> None:
        """Send ``msg`` to ``followers``; one that cannot take it is dropped."""
        for rank in followers:
            with self._lock:
                f = self._followers.get(rank)
            if f is None:
                continue
            try:
                with f.lock:
                    _send(f.sock, msg)
            except OSError as e:
                logger.warning("p2pkv relay: rank %d did not take an announcement (%s); "
                               "dropped", rank, e)
                self._drop(f)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            followers = list(self._followers.values())
        self._listener.close()
        for f in followers:
            f.sock.close()
        self._thread.join(timeout=2.0)
        self._slab.close()

    # -- background -----------------------------------------------------------------------

    def _release(self, req_id: str) -> None:
        hold = self._holds.pop(req_id, None)
        if hold is not None:
            self._free.extend(hold.slots)

    def _taken(self, msg: Taken) -> None:
        with self._lock:
            hold = self._holds.get(msg.req_id)
            if hold is None or msg.rank not in hold.waiting:
                return
            hold.waiting.discard(msg.rank)
            self.chunks_relayed += max(msg.chunks, 0)
            self.bytes_relayed += max(msg.nbytes, 0)
            if not hold.waiting:
                self._release(msg.req_id)

    def _drop(self, f: _Follower) -> None:
        with self._lock:
            if self._followers.get(f.rank) is f:
                del self._followers[f.rank]
            for req, hold in list(self._holds.items()):
                hold.waiting.discard(f.rank)
                if not hold.waiting:
                    self._release(req)
        f.sock.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            try:
                sock.settimeout(HANDSHAKE_TIMEOUT_S)
                hello = _recv(sock)
                if (not isinstance(hello, Hello) or hello.version != RELAY_VERSION
                        or not secrets.compare_digest(hello.token, self.token)):
                    raise ConnectionError(f"bad relay hello {type(hello).__name__}")
                f = _Follower(hello.rank, sock)
                with self._lock:
                    if self._closed:
                        raise ConnectionError("closed")
                    old = self._followers.get(hello.rank)
                    self._followers[hello.rank] = f
                if old is not None:
                    self._drop(old)
                _send(sock, Welcome(RELAY_VERSION, self._slab.path, self._slab.ident,
                                    self.slot_bytes * self.capacity, self.slot_bytes))
                sock.settimeout(SEND_TIMEOUT_S)
            except (OSError, ValueError, msgspec.DecodeError) as e:
                logger.warning("p2pkv relay: refused a follower (%s)", e)
                sock.close()
                continue
            threading.Thread(target=self._read_loop, args=(f,), daemon=True,
                             name=f"p2pkv-relay-{f.rank}").start()
            logger.info("p2pkv relay: rank %d follows (slab of %d slots of %d B)", f.rank,
                        self.capacity, self.slot_bytes)

    def _read_loop(self, f: _Follower) -> None:
        while True:
            try:
                msg = _recv(f.sock, idle_ok=True)
            except TimeoutError:
                continue  # idle: a follower speaks only when done with a load
            except (OSError, ValueError, msgspec.DecodeError):
                break
            if isinstance(msg, Taken) and msg.rank == f.rank:
                self._taken(msg)
        self._drop(f)


@dataclass(slots=True)
class Collected:
    """What a follower got for one load: ``skipped`` (pull it yourself: why), else per part
    the announced chunks by index; ``why``: why the others are missing (gone, deadline)."""

    skipped: str = ""
    parts: list[dict[int, Relayed]] = field(default_factory=list)
    why: str = ""


class RelayFollower:
    """A follower's connection to its leader and read-only mapping of the leader's slab."""

    def __init__(self, rank: int, address: str, token: str, *,
                 timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
        self.rank = rank
        host, _, port = address.rpartition(":")
        self._sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        try:
            _send(self._sock, Hello(RELAY_VERSION, rank, token))
            welcome = _recv(self._sock)
            if not isinstance(welcome, Welcome) or welcome.version != RELAY_VERSION:
                raise ConnectionError(f"bad relay welcome {type(welcome).__name__}")
            self.slab = MappedSlab(welcome.slab_path, welcome.slab_ident, welcome.slab_bytes,
                                   welcome.slot_bytes)
        except BaseException:
            self._sock.close()
            raise
        # NOTE: one timeout for both directions: the reader treats it as idle, the sender
        # as a leader that takes nothing (close ends the reader)
        self._sock.settimeout(SEND_TIMEOUT_S)
        self._closing = False
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._inbox: dict[str, list[Landed | Skip]] = {}
        self._arrived: dict[str, float] = {}
        self.alive = True
        self._thread = threading.Thread(target=self._read_loop, name="p2pkv-relay-in",
                                        daemon=True)
        self._thread.start()

    def slot(self, slot: int, nbytes: int) -> np.ndarray:
        off = slot * self.slab.slot_bytes
        if not 0 <= slot or nbytes > self.slab.slot_bytes or off + nbytes > self.slab.nbytes:
            raise ValueError(f"relay slot {slot} of {nbytes} B outside the slab")
        return self.slab.array[off:off + nbytes]

    def collect(self, req_id: str, parts: int, chunks: int, deadline: float) -> Collected:
        """Wait until the leader announced every chunk of every part of ``req_id`` (or
        skipped it), until it is gone, or until ``deadline``."""
        out = Collected(parts=[{} for _ in range(parts)])
        with self._lock:
            while True:
                for msg in self._inbox.pop(req_id, ()):
                    if isinstance(msg, Skip):
                        out.skipped = msg.reason or "skipped"
                    elif 0 <= msg.part < parts:
                        out.parts[msg.part].update(
                            (c.index, c) for c in msg.chunks if 0 <= c.index < chunks)
                self._arrived.pop(req_id, None)
                if out.skipped or all(len(p) == chunks for p in out.parts):
                    break
                if not self.alive:
                    out.why = "the relay rank is gone"
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    out.why = "the relay rank announced nothing before the deadline"
                    break
                self._changed.wait(left)
            self._purge()
        return out

    def taken(self, req_id: str, chunks: int, nbytes: int) -> None:
        try:
            with self._send_lock:
                _send(self._sock, Taken(req_id, self.rank, chunks, nbytes))
        except OSError as e:
            logger.warning("p2pkv relay: could not tell the leader (%s)", e)

    def close(self) -> None:
        self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=2.0)
        self.slab.close()

    def _purge(self) -> None:
        """Drop announcements nobody collected for a minute (a load this rank never ran)."""
        now = time.monotonic()
        for req, t in list(self._arrived.items()):
            if now - t > 60.0:
                self._inbox.pop(req, None)
                del self._arrived[req]

    def _read_loop(self) -> None:
        try:
            while True:
                try:
                    msg = _recv(self._sock, idle_ok=True)
                except TimeoutError:
                    continue
                if isinstance(msg, (Landed, Skip)):
                    with self._lock:
                        self._inbox.setdefault(msg.req_id, []).append(msg)
                        self._arrived.setdefault(msg.req_id, time.monotonic())
                        self._changed.notify_all()
        except (OSError, ValueError, msgspec.DecodeError):
            pass
        with self._lock:
            self.alive = False
            self._changed.notify_all()
        if not self._closing:
            logger.warning("p2pkv relay: rank %d lost its leader; its loads pull for "
                           "themselves from now on", self.rank)


@dataclass(frozen=True, slots=True)
class RelaySetup:
    """What the connector gives a worker so that it can join its relay at registration:
    every rank's slice, the rendezvous, and the leader's slab size."""

    slices: tuple[KVSlice, ...]
    exchange: Exchange
    relay_bytes: int
    bind_host: str = "127.0.0.1"


def join_relay(setup: RelaySetup, rank: int, *, slot_bytes: int, hold_s: float
               ) -> RelayLeader | RelayFollower | None:
    """Join this rank's relay (every rank must call it: the exchange is a collective). A
    leader gets its slab and listener, a follower on its leader's host its connection; None
    for a rank without siblings, or where the relay cannot be set up (then it pulls for
    itself, as without a relay)."""
    slices = setup.slices
    leader_rank = relay_leader(slices, rank)
    siblings = [r for r in range(len(slices)) if slices[r] == slices[rank]]
    leader: RelayLeader | None = None
    if leader_rank == rank and len(siblings) > 1 and setup.relay_bytes > 0:
        capacity = min(setup.relay_bytes, shm_room() // 2) // slot_bytes
        if capacity <= 0:
            logger.warning("p2pkv relay: no room for a relay slab of one %d B chunk in "
                           "/dev/shm; every rank of %s pulls for itself", slot_bytes,
                           slices[rank])
        else:
            try:
                leader = RelayLeader(slot_bytes, capacity, hold_s=hold_s,
                                     bind_host=setup.bind_host)
            except OSError as e:
                logger.warning("p2pkv relay: cannot start (%s); every rank pulls for itself",
                               e)
    me = RelayEndpoint(rank, host_id(), leader.address if leader else "",
                       leader.token if leader else "")
    everyone = {e.rank: e for e in setup.exchange(me)}
    if leader is not None:
        return leader
    if leader_rank == rank:
        return None
    boss = everyone.get(leader_rank)
    if boss is None or not boss.address:
        return None
    if boss.host != me.host:
        logger.info("p2pkv relay: rank %d's leader (rank %d) runs on another host; it pulls "
                    "for itself", rank, leader_rank)
        return None
    try:
        follower = RelayFollower(rank, boss.address, boss.token)
    except (OSError, ValueError, msgspec.DecodeError, TransportError) as e:
        logger.warning("p2pkv relay: rank %d cannot follow rank %d (%s); it pulls for "
                       "itself", rank, leader_rank, e)
        return None
    logger.info("p2pkv relay: rank %d takes %s from rank %d's pulls", rank, slices[rank],
                leader_rank)
    return follower
