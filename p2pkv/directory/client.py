"""Client of the p2pkv directory: one DEALER socket that never blocks its caller.

Used by the connector's worker side (register, publish, report: the client keeps the
registration alive by itself), its scheduler side (lookups polled once per engine step), the
router (:class:`FeedSubscriber`) and ``p2pkv status`` (:meth:`DirectoryClient.call`).

Sends use NOBLOCK on a socket with ``IMMEDIATE`` set: while the directory is unreachable
messages are dropped and counted in ``dropped`` instead of queueing; a lookup then ends as None
at its deadline, and lost publishes are repaired by a full snapshot once the directory answers.

Threads. NOTE: the socket is guarded by ``_lock`` and only ever used under it (a lock is the
full memory barrier ZeroMQ asks for when a socket changes threads); nothing blocks on the
network while holding it except :meth:`wait_lookup` (at most its ``max_wait_s``, which the
connector keeps at milliseconds) and slices of :meth:`call` (≤ 50 ms each). Once
:meth:`register` was called, a *keeper* thread wakes a few times per heartbeat interval, takes
the lock, drains replies and sends heartbeats, Register and snapshots as the registration's
state machine says. Callers (vLLM's threads) thus never wait for the keeper beyond one
non-blocking drain.

Registration state machine (driven by replies, under the lock)::

    UNREGISTERED --Register sent--> REGISTERING --RegisterReply--> REGISTERED (send snapshot)
    REGISTERED --reply with another directory_epoch / UNKNOWN_INSTANCE--> UNREGISTERED
    REGISTERED --SEQ_GAP or a dropped publish--> REGISTERED, snapshot resent
    REGISTERING --PROBE_MISMATCH--> REFUSED (retried every REFUSED_RETRY_INTERVALS)
    any --STALE_EPOCH--> REFUSED for good (a newer process of this instance runs)
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Union

import msgspec
import zmq

from p2pkv.directory import auth, protocol
from p2pkv.directory.protocol import (
    MAX_KEYS_PER_MESSAGE, ChunksChanged, Error, FeedEvent, Heartbeat, InstanceInfo,
    InstanceJoined, InstanceLeft, Lookup, LookupReply, ProtocolError, Publish, Register,
    RegisterReply, Reply, Report, Request, Snapshot, SnapshotReply, Status, Unregister,
)
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from p2pkv.secret import ClusterSecret
from p2pkv.slices import KVSlice

logger = logging.getLogger(__name__)


class Pending:
    """Type of :data:`PENDING`: the lookup is still in flight, ask again later."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PENDING"


PENDING: Final = Pending()

LookupResult = Union[LookupReply, Pending, None]

SEND_HWM = 1000
"""Messages queued towards a connected directory before further sends are dropped."""

ZMTP_HEARTBEAT_IVL_MS = 1000
ZMTP_HEARTBEAT_TIMEOUT_MS = 3 * ZMTP_HEARTBEAT_IVL_MS
"""A connection silent this long is dropped by ZeroMQ, so sends stop queueing into it."""

RECONNECT_IVL_MAX_MS = 250
"""Reconnect attempts back off to this; bounds how soon a restarted directory is found."""

DEFAULT_HEARTBEAT_S = 1.0
"""Until a RegisterReply says otherwise: Register retry interval and heartbeat interval."""

REFUSED_RETRY_INTERVALS = 10
"""A probe-mismatch refusal is retried this many heartbeat intervals later (the odd one out
may leave the namespace)."""

RESULT_GRACE_S = 30.0
"""How long an arrived but never polled lookup reply is kept after its deadline."""

_PURGE_ABOVE = 1024
_MAX_WARNED_REASONS = 128
_CALL_SLICE_S = 0.05


class RegState(enum.Enum):
    UNREGISTERED = "unregistered"
    REGISTERING = "registering"
    REGISTERED = "registered"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Registration:
    """Who this client registers as. One per client (the connector's worker rank)."""

    instance: InstanceId
    epoch: int
    namespace: Namespace
    address: str
    """Data-plane "host:port" of this instance's transport server."""
    probe: str = ""
    """Hash-seed probe (see ``p2pkv.vllm.connector.probe_hash``); must match the namespace's."""
    capabilities: tuple[str, ...] = ()
    """E.g. transport names the data plane speaks."""
    engine: str = ""
    """The vLLM engine this worker rank belongs to ("" = ``instance``)."""
    slice: KVSlice | None = None
    """What this rank holds of each chunk (None = the whole model)."""
    spec: str = ""
    """The namespace's fields in clear (``NamespaceSpec.describe``)."""


@dataclass(slots=True)
class _Lookup:
    deadline: float
    done: bool = False
    reply: LookupReply | None = None


@dataclass(slots=True)
class _RegistrationState:
    reg: Registration
    state: RegState = RegState.UNREGISTERED
    rid: int = 0
    """rid of the last Register sent; replies to older requests cannot change the state."""
    directory_epoch: int = 0
    next_attempt: float = 0.0
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    next_heartbeat: float = 0.0
    seq: int = 0
    """Last Publish seq sent (successfully queued)."""
    snapshot_rid: int = 0
    need_snapshot: bool = False
    keys: set[ChunkKey] = field(default_factory=set)
    counters: dict[str, int] | None = None
    refused_reason: str | None = None


class DirectoryClient:
    """Talks to one directory endpoint; see the module docstring for threads and blocking."""

    def __init__(self, endpoint: str, *, secret: ClusterSecret | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 thread_init: Callable[[], None] | None = None) -> None:
        self.endpoint = endpoint
        self._clock = clock
        self._thread_init = thread_init
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        for option, value in ((zmq.LINGER, 0), (zmq.SNDHWM, SEND_HWM), (zmq.IMMEDIATE, 1),
                              (zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_IVL_MS),
                              (zmq.HEARTBEAT_TIMEOUT, ZMTP_HEARTBEAT_TIMEOUT_MS),
                              (zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS),
                              (zmq.MAXMSGSIZE, 4 * protocol.MAX_MESSAGE_BYTES)):
            self._socket.setsockopt(option, value)
        if secret is not None:
            auth.secure_client_socket(self._socket, secret)
        self._socket.connect(endpoint)
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._lookups: dict[int, _Lookup] = {}
        self._warned: set[str] = set()
        self._reg: _RegistrationState | None = None
        self._keeper: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self.dropped = 0
        """Messages not sent because the directory was unreachable or its queue full."""
        self.bad_replies = 0
        """Replies that did not decode."""
        self.directory_epoch: int | None = None
        """``directory_epoch`` of the last reply; a change means the directory restarted."""
        self.resyncs = 0
        """Full snapshots sent (after registering, a seq gap or a dropped publish)."""

    # -- registration (worker side) ---------------------------------------------------------

    def register(self, registration: Registration, wait_connected_s: float = 0.0) -> None:
        """Become ``registration`` and stay registered: the keeper thread registers,
        heartbeats, and re-registers and republishes after a directory restart. Blocks only
        up to ``wait_connected_s`` for the connection (start-up: registers sooner)."""
        with self._lock:
            if wait_connected_s > 0:
                self._socket.poll(_ms(wait_connected_s), zmq.POLLOUT)
            self._reg = _RegistrationState(registration)
            self._maintain(self._clock())
        if self._keeper is None:
            self._keeper = threading.Thread(target=self._keep, name="p2pkv-directory",
                                            daemon=True)
            self._keeper.start()

    @property
    def state(self) -> RegState:
        return self._reg.state if self._reg is not None else RegState.UNREGISTERED

    @property
    def refused_reason(self) -> str | None:
        """Why the directory refused this instance (None unless REFUSED)."""
        return self._reg.refused_reason if self._reg is not None else None

    def published_keys(self) -> int:
        return len(self._reg.keys) if self._reg is not None else 0

    def publish(self, added: Iterable[ChunkKey] = (), removed: Iterable[ChunkKey] = ()) -> None:
        """Record the store's changes and send them (one message per MAX_KEYS_PER_MESSAGE).

        While not registered only the record changes: the snapshot after (re-)registration
        carries everything. Never blocks.
        """
        added, removed = list(added), list(removed)
        with self._lock:
            r = self._reg
            if r is None:
                raise RuntimeError("publish() before register()")
            r.keys.update(added)
            r.keys.difference_update(removed)
            self._drain()
            if r.state is RegState.REGISTERED and not r.need_snapshot:
                self._send_publish(r, added, removed, reset=False)
            if r.need_snapshot:
                self._send_snapshot(r)

    def report(self, counters: Mapping[str, int]) -> None:
        """Send connector counters (shown by ``p2pkv status``); kept and resent after a
        re-registration. Never blocks."""
        with self._lock:
            r = self._reg
            if r is None:
                return
            r.counters = dict(counters)
            self._drain()
            if r.state is RegState.REGISTERED:
                self._send(Report(instance=r.reg.instance, counters=r.counters))

    def unregister(self) -> None:
        """Leave (on clean shutdown): the keeper stops and the directory drops our keys."""
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=2.0)
        with self._lock:
            if self._reg is not None and not self._closed:
                self._send(Unregister(instance=self._reg.reg.instance))
                self._reg = None

    # -- lookups (scheduler side) -----------------------------------------------------------

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until a send would not be dropped."""
        with self._lock:
            return bool(self._socket.poll(_ms(timeout_s), zmq.POLLOUT))

    def start_lookup(self, namespace: Namespace, keys: Sequence[ChunkKey],
                     timeout_s: float) -> int:
        """Ask who holds the leading run of ``keys``; returns a rid for :meth:`poll_lookup`.

        Keys past MAX_KEYS_PER_MESSAGE are not looked up. A dropped send still returns a
        rid, whose lookup then ends as None at once.
        """
        with self._lock:
            now = self._clock()
            if len(self._lookups) > _PURGE_ABOVE:
                self._purge(now)
            self._drain()
            rid = self._send(Lookup(namespace=namespace, keys=list(keys[:MAX_KEYS_PER_MESSAGE])))
            if rid < 0:
                rid = next(self._rids)
                self._lookups[rid] = _Lookup(deadline=now, done=True)
            else:
                self._lookups[rid] = _Lookup(deadline=now + timeout_s)
            return rid

    def poll_lookup(self, rid: int) -> LookupResult:
        """The LookupReply, PENDING, or None (failed, deadline passed, or unknown rid).

        Never blocks. A final result (reply or None) is returned once; the rid is then
        forgotten.
        """
        with self._lock:
            self._drain()
            return self._lookup_result(rid)

    def wait_lookup(self, rid: int, max_wait_s: float) -> LookupResult:
        """Like :meth:`poll_lookup` but waits up to ``max_wait_s`` for the reply."""
        with self._lock:
            give_up = self._clock() + max_wait_s
            while True:
                self._drain()
                result = self._lookup_result(rid)
                if result is not PENDING:
                    return result
                now = self._clock()
                if now >= give_up:
                    return PENDING
                # Waking at the lookup's deadline lets the next round report None.
                wake = min(give_up, self._lookups[rid].deadline)
                self._socket.poll(_ms(wake - now), zmq.POLLIN)

    def _lookup_result(self, rid: int) -> LookupResult:
        entry = self._lookups.get(rid)
        if entry is None:
            return None
        if entry.done:
            del self._lookups[rid]
            return entry.reply
        if self._clock() >= entry.deadline:
            del self._lookups[rid]
            return None
        return PENDING

    # -- blocking calls (CLI, tests, FeedSubscriber) ----------------------------------------

    def call(self, msg: Request, timeout_s: float) -> Reply | None:
        """Send ``msg`` and wait for its reply (an Error reply included); None at the deadline."""
        replies = self.call_parts(msg, timeout_s)
        return replies[0] if replies else None

    def call_parts(self, msg: Request, timeout_s: float) -> list[Reply]:
        """Like :meth:`call` for requests answered in parts (Snapshot): every reply with the
        request's rid up to one with ``last=True`` (or an Error); [] at the deadline."""
        deadline = self._clock() + timeout_s
        rid = -1
        got: list[Reply] = []
        while True:
            with self._lock:
                if rid < 0:
                    rid = self._send(msg, count_drop=False)
                for reply in self._drain():
                    if reply.rid == rid:
                        got.append(reply)
                        if not isinstance(reply, SnapshotReply) or reply.last:
                            return got
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return []
                self._socket.poll(_ms(min(remaining, _CALL_SLICE_S)),
                                  zmq.POLLIN if rid >= 0 else zmq.POLLOUT)

    def close(self) -> None:
        """Stop the keeper and close the socket. Idempotent."""
        self._stop.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(timeout=2.0)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._socket.close(linger=0)
            self._context.term()

    # -- keeper -----------------------------------------------------------------------------

    def _keep(self) -> None:
        if self._thread_init is not None:
            self._thread_init()
        while True:
            r = self._reg
            tick = min(max((r.heartbeat_s if r else DEFAULT_HEARTBEAT_S) / 4, 0.01), 0.25)
            if self._stop.wait(tick):
                return
            with self._lock:
                if self._closed:
                    return
                try:
                    self._drain()
                    self._maintain(self._clock())
                except Exception:  # noqa: BLE001 - the keeper must outlive a bug in one tick
                    logger.exception("p2pkv directory client: keeper tick failed")

    def _maintain(self, now: float) -> None:
        """Advance the registration state machine (under the lock)."""
        r = self._reg
        if r is None:
            return
        if r.state is RegState.REGISTERED:
            if r.need_snapshot:
                self._send_snapshot(r)
            if now >= r.next_heartbeat:
                r.next_heartbeat = now + r.heartbeat_s
                self._send(Heartbeat(instance=r.reg.instance, epoch=r.reg.epoch, seq=r.seq))
            return
        if now < r.next_attempt:
            return
        reg = r.reg
        rid = self._send(Register(instance=reg.instance, epoch=reg.epoch,
                                  namespace=reg.namespace, address=reg.address,
                                  probe=reg.probe, capabilities=list(reg.capabilities),
                                  engine=reg.engine, slice=reg.slice, spec=reg.spec))
        if rid >= 0:
            r.next_attempt = now + r.heartbeat_s
            r.rid = rid
            if r.state is not RegState.REFUSED:
                r.state = RegState.REGISTERING

    def _on_reply(self, reply: Reply) -> None:
        r = self._reg
        if r is None:
            return
        now = self._clock()
        if r.state is RegState.REGISTERED and reply.directory_epoch != r.directory_epoch:
            logger.info("p2pkv: directory %s restarted (epoch %s -> %s); registering %s again",
                        self.endpoint, r.directory_epoch, reply.directory_epoch, r.reg.instance)
            self._reregister(r, now)
        if reply.rid == r.rid and r.state in (RegState.REGISTERING, RegState.REFUSED):
            if isinstance(reply, RegisterReply):
                was_refused = r.state is RegState.REFUSED
                r.state = RegState.REGISTERED
                r.refused_reason = None
                r.directory_epoch = reply.directory_epoch
                r.heartbeat_s = max(0.01, reply.heartbeat_ms / 1000)
                r.next_heartbeat = now + r.heartbeat_s
                logger.log(logging.WARNING if was_refused else logging.INFO,
                           "p2pkv: %s registered with directory %s (namespace %s, %d keys)",
                           r.reg.instance, self.endpoint, r.reg.namespace, len(r.keys))
                self._send_snapshot(r)
                if r.counters is not None:
                    self._send(Report(instance=r.reg.instance, counters=r.counters))
            elif isinstance(reply, Error):
                self._refused(r, reply, now)
            return
        if not isinstance(reply, Error) or reply.rid < r.rid:
            return  # answers to requests of an older registration say nothing about this one
        if reply.status == Status.STALE_EPOCH:
            self._refused(r, reply, now)
        elif reply.status in (Status.UNKNOWN_INSTANCE, Status.WRONG_NAMESPACE):
            if r.state is RegState.REGISTERED:
                logger.info("p2pkv: directory forgot %s (%s); registering again",
                            r.reg.instance, reply.reason)
                self._reregister(r, now)
        elif reply.status == Status.SEQ_GAP and reply.rid > r.snapshot_rid:
            logger.info("p2pkv: %s", reply.reason)
            r.need_snapshot = True
            self._maintain(now)

    def _reregister(self, r: _RegistrationState, now: float) -> None:
        r.state = RegState.UNREGISTERED
        r.next_attempt = now
        self._maintain(now)

    def _refused(self, r: _RegistrationState, reply: Error, now: float) -> None:
        first = r.state is not RegState.REFUSED
        r.state = RegState.REFUSED
        r.refused_reason = reply.reason
        if reply.status == Status.STALE_EPOCH:
            r.next_attempt = float("inf")
        elif reply.status == Status.PROBE_MISMATCH:
            r.next_attempt = now + REFUSED_RETRY_INTERVALS * r.heartbeat_s
        else:
            r.state = RegState.UNREGISTERED
            r.next_attempt = now + r.heartbeat_s
        if first and r.state is RegState.REFUSED:
            logger.error("p2pkv: the directory REFUSED instance %s (%s): %s. This instance "
                         "will get no remote KV hits and share nothing until that is fixed.",
                         r.reg.instance, reply.status, reply.reason)
        elif r.state is RegState.UNREGISTERED:
            self._warn_once(f"directory refused Register ({reply.status}): {reply.reason}")

    def _send_snapshot(self, r: _RegistrationState) -> None:
        """Send the whole key set: a reset Publish, then the rest in batches."""
        if not self._socket.poll(0, zmq.POLLOUT):
            r.need_snapshot = True
            return
        self.resyncs += 1
        r.need_snapshot = False
        keys = list(r.keys)
        first = self._send_publish(r, keys, (), reset=True)
        if first >= 0:
            r.snapshot_rid = first
        logger.debug("p2pkv: snapshot of %d keys for %s", len(keys), r.reg.instance)

    def _send_publish(self, r: _RegistrationState, added: list[ChunkKey],
                      removed: Sequence[ChunkKey], reset: bool) -> int:
        """Send in messages within MAX_KEYS_PER_MESSAGE; returns the first rid (-1: dropped,
        and a snapshot is due)."""
        removed = list(removed)
        first = -2
        while first == -2 or added or removed:
            batch_added = added[:MAX_KEYS_PER_MESSAGE]
            batch_removed = removed[:MAX_KEYS_PER_MESSAGE - len(batch_added)]
            added, removed = added[len(batch_added):], removed[len(batch_removed):]
            rid = self._send(Publish(instance=r.reg.instance, namespace=r.reg.namespace,
                                     added=batch_added, removed=batch_removed,
                                     seq=r.seq + 1, reset=reset and first == -2))
            if rid < 0:
                r.need_snapshot = True
                return -1
            r.seq += 1
            if first == -2:
                first = rid
        return first

    # -- socket -----------------------------------------------------------------------------

    def _send(self, msg: Request, count_drop: bool = True) -> int:
        rid = next(self._rids)
        try:
            self._socket.send(protocol.encode(msgspec.structs.replace(msg, rid=rid)),
                              zmq.NOBLOCK)
        except zmq.Again:
            if count_drop:
                self.dropped += 1
                logger.debug("directory %s unreachable: dropped %s", self.endpoint,
                             type(msg).__name__)
            return -1
        return rid

    def _drain(self) -> list[Reply]:
        """Receive every reply already here, without blocking; returns them in order."""
        replies: list[Reply] = []
        while True:
            try:
                data = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return replies
            try:
                reply = protocol.decode(data)
            except ProtocolError as e:
                self.bad_replies += 1
                self._warn_once(f"undecodable reply from the directory: {e}")
                continue
            if not isinstance(reply, Reply.__args__):  # type: ignore[attr-defined]
                self.bad_replies += 1
                continue
            self._note_epoch(reply.directory_epoch)
            self._dispatch(reply)
            replies.append(reply)

    def _dispatch(self, reply: Reply) -> None:
        entry = self._lookups.get(reply.rid)
        if entry is not None and not entry.done:
            if self._clock() < entry.deadline:
                entry.done = True
                entry.reply = reply if isinstance(reply, LookupReply) else None
        self._on_reply(reply)
        if isinstance(reply, Error) and reply.status not in (Status.SEQ_GAP,
                                                             Status.UNKNOWN_INSTANCE):
            self._warn_once(f"directory refused a request ({reply.status}): {reply.reason}")

    def _note_epoch(self, epoch: int) -> None:
        if self.directory_epoch is not None and epoch != self.directory_epoch:
            logger.info("directory %s restarted (epoch %s -> %s)", self.endpoint,
                        self.directory_epoch, epoch)
        self.directory_epoch = epoch

    def _warn_once(self, message: str) -> None:
        if message in self._warned:
            return
        if len(self._warned) >= _MAX_WARNED_REASONS:
            logger.debug("%s", message)
            return
        self._warned.add(message)
        logger.warning("%s", message)

    def _purge(self, now: float) -> None:
        """Forget lookups nobody will poll: in flight past their deadline, or answered and
        unpolled well past it."""
        for rid, entry in list(self._lookups.items()):
            if now >= entry.deadline + (RESULT_GRACE_S if entry.done else 0.0):
                del self._lookups[rid]


class FeedSubscriber:
    """Follows the directory's change feed and keeps a replica of who holds what.

    Clone pattern: subscribe first, then fetch a Snapshot (state as of feed event
    ``feed_seq``), then apply events with a higher seq. A seq gap (events dropped by a slow
    subscriber's queue, or a subscription that raced the snapshot) or a new directory epoch
    triggers a fresh snapshot. Not thread-safe: one thread calls :meth:`poll`.
    """

    def __init__(self, endpoint: str, *, secret: ClusterSecret | None = None) -> None:
        self._secret = secret
        self._client = DirectoryClient(endpoint, secret=secret)
        self._sub: zmq.Socket | None = None
        self._feed_endpoint = ""
        self.seq = 0
        self.directory_epoch = 0
        self.instances: dict[InstanceId, InstanceInfo] = {}
        self.holdings: dict[InstanceId, set[ChunkKey]] = {}
        self.namespaces: dict[InstanceId, Namespace] = {}
        self.resyncs = 0

    def sync(self, timeout_s: float = 5.0) -> bool:
        """(Re)build the replica from a Snapshot; False if the directory did not answer."""
        if self._sub is None:
            first = self._client.call_parts(Snapshot(), timeout_s)
            if not first or not isinstance(first[0], SnapshotReply):
                return False
            self._connect(first[0].feed_endpoint)
        parts = self._client.call_parts(Snapshot(), timeout_s)
        if not parts or not all(isinstance(p, SnapshotReply) for p in parts):
            return False
        self.resyncs += 1
        head = parts[0]
        assert isinstance(head, SnapshotReply)
        if head.feed_endpoint != self._feed_endpoint:
            self._connect(head.feed_endpoint)
        self.seq, self.directory_epoch = head.feed_seq, head.directory_epoch
        self.instances = {i.instance: i for i in head.instances}
        self.namespaces = {i.instance: i.namespace for i in head.instances}
        self.holdings = {i.instance: set() for i in head.instances}
        for part in parts:
            assert isinstance(part, SnapshotReply)
            for h in part.holdings:
                self.holdings.setdefault(h.instance, set()).update(h.keys)
        return True

    def poll(self, timeout_s: float = 0.0) -> list[FeedEvent]:
        """Apply the events that arrived (waiting up to ``timeout_s`` for the first); returns
        them. Resyncs by itself on a gap."""
        if self._sub is None and not self.sync():
            return []
        assert self._sub is not None
        applied: list[FeedEvent] = []
        wait = _ms(timeout_s) if timeout_s > 0 else 0
        while self._sub.poll(wait, zmq.POLLIN):
            wait = 0
            try:
                event = protocol.decode_event(self._sub.recv(zmq.NOBLOCK))
            except (ProtocolError, zmq.Again):
                continue
            if event.directory_epoch == self.directory_epoch and event.seq <= self.seq:
                continue  # already in the snapshot
            if event.directory_epoch != self.directory_epoch or event.seq != self.seq + 1:
                logger.info("feed gap (have %s/%s, got %s/%s): resyncing", self.directory_epoch,
                            self.seq, event.directory_epoch, event.seq)
                self.sync()
                continue
            self._apply(event)
            applied.append(event)
        return applied

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until feed events are ready, without applying them (a
        caller can then apply them with ``poll(0)`` under its own lock)."""
        if self._sub is None:
            return False
        return bool(self._sub.poll(_ms(timeout_s), zmq.POLLIN))

    def holders(self, namespace: Namespace, key: ChunkKey) -> list[InstanceId]:
        return sorted(i for i, keys in self.holdings.items()
                      if key in keys and self.namespaces.get(i) == namespace)

    def close(self) -> None:
        if self._sub is not None:
            self._sub.close(linger=0)
        self._client.close()

    def _connect(self, feed_endpoint: str) -> None:
        if self._sub is not None:
            self._sub.close(linger=0)
        sub = self._client._context.socket(zmq.SUB)  # noqa: SLF001 - same context, same owner
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.MAXMSGSIZE, 4 * protocol.MAX_MESSAGE_BYTES)
        if self._secret is not None:
            auth.secure_client_socket(sub, self._secret)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(feed_endpoint)
        self._sub, self._feed_endpoint = sub, feed_endpoint

    def _apply(self, event: FeedEvent) -> None:
        self.seq = event.seq
        match event:
            case InstanceJoined():
                self.namespaces[event.instance] = event.namespace
                self.holdings[event.instance] = set()
                self.instances[event.instance] = InstanceInfo(
                    instance=event.instance, namespace=event.namespace, address=event.address,
                    epoch=event.epoch, chunks=0)
            case InstanceLeft():
                for table in (self.namespaces, self.holdings, self.instances):
                    table.pop(event.instance, None)
            case ChunksChanged():
                keys = self.holdings.setdefault(event.instance, set())
                if event.reset:
                    keys.clear()
                keys.update(event.added)
                keys.difference_update(event.removed)


def _ms(seconds: float) -> int:
    """A zmq poll timeout in ms, at least 1 so a tiny positive wait does not mean 'forever'."""
    return max(1, int(seconds * 1000 + 0.999))
