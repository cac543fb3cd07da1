"""The directory service: one ZeroMQ ROUTER loop in front of a DirectoryIndex.

Run by ``p2pkv directory`` and ``python -m p2pkv.directory`` (``cli.run_directory`` owns the
process: signals, ready file, metrics) and in-process by tests and benches. One thread, one
loop with named steps: ``poll -> handle requests -> answer ZAP -> track subscribers ->
send a snapshot part -> purge expired leases -> sweep departed members' keys``. A Snapshot is answered one part per loop
turn, between request batches, so that a huge one never holds lookups back; within a batch
Lookups are answered ahead of other connections' writes (``_handle_batch``). Every state change is also published on the change feed (an XPUB
socket, events numbered from 1; a late subscriber asks for a Snapshot and applies events with
a higher seq, as in the ZeroMQ guide's Clone pattern). Bad input from the network is answered
with an Error when a reply is possible, counted, and never raises.

Liveness constants derive from each other: an instance heartbeats every
``heartbeat_interval_s`` and expires after ``heartbeat_interval_s * liveness`` of silence.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from bisect import bisect_left
from dataclasses import dataclass, field

import msgspec
import zmq

from p2pkv.directory import auth, protocol
from p2pkv.directory.index import DirectoryIndex, HoldingsCursor, Member
from p2pkv.directory.protocol import (
    LOOKUP_BUCKETS_S, MAX_KEYS_PER_MESSAGE, PROTOCOL_VERSION, BeatRefusal, ChunksChanged, Error,
    FeedEvent, Heartbeat, Heartbeats, HeartbeatsReply, Holding,
    InstanceInfo, InstanceJoined, InstanceLeft, Lookup, LookupReply, Ok, ProtocolError, Publish, Register,
    RegisterReply, Reply, Report, Snapshot, SnapshotReply, Stats, StatsReply, Status, Unregister,
)
from p2pkv.directory.refusals import RecentRefusals
from p2pkv.errors import ConfigError, DirectoryIndexError
from p2pkv.secret import ClusterSecret

logger = logging.getLogger(__name__)

POLL_INTERVAL_MS = 100
"""Longest the loop sleeps before it looks at its stop event and the leases again."""

MAX_BATCH = 1000
"""Most messages handled per poll wake-up, so a flood cannot starve the other steps."""

HARD_FRAME_LIMIT = 4 * protocol.MAX_MESSAGE_BYTES
"""ZeroMQ disconnects a peer sending a frame above this (uncounted: no reply is possible).
Frames between MAX_MESSAGE_BYTES and this get a counted Error reply."""

SNAPSHOT_KEYS_PER_PART = MAX_KEYS_PER_MESSAGE // 2
MAX_SNAPSHOTS_IN_FLIGHT = 16
"""Snapshots being sent at once; more are refused (OVER_QUOTA: the subscriber retries)."""

REFUSAL_MEMORY_INTERVALS = 3 * protocol.REFUSED_RETRY_INTERVALS
"""A refused registration is listed in Stats this many heartbeat intervals (at least
MIN_REFUSAL_MEMORY_S) after its latest refusal: longer than a refused client's retry period,
so an instance that keeps trying stays visible, and one that gave up drops out."""
MIN_REFUSAL_MEMORY_S = 60.0

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
AUTH_WARNING_INTERVAL_S = 10.0
"""At most one warning this often about messages dropped for their key (a flood logs one)."""
_BAD_INPUT = frozenset({Status.BAD_REQUEST, Status.VERSION, Status.INTERNAL})


@dataclass(frozen=True, slots=True)
class ServerConfig:
    bind: str = "tcp://127.0.0.1:0"
    feed_bind: str = ""
    """Change-feed endpoint; default: the bind host on a free port."""
    secret: ClusterSecret | None = None
    """With a secret: CURVE on both sockets, only members get in. Without: loopback only."""
    insecure_any_address: bool = False
    heartbeat_interval_s: float = protocol.HEARTBEAT_INTERVAL_S
    liveness: int = protocol.HEARTBEAT_LIVENESS
    max_registrations_per_connection: int = protocol.MAX_REGISTRATIONS_PER_CONNECTION
    """A member's quota of instance ids (a simulated fleet on one socket needs more)."""
    lookups_first: bool = True
    """Answer Lookups ahead of other connections' writes read before them (``_handle_batch``);
    False: every message in the order read (for comparison: ``p2pkv bench trace
    --lookups-in-arrival-order``)."""

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0 or self.liveness < 1:
            raise ConfigError("heartbeat interval must be positive and liveness at least 1")
        if self.max_registrations_per_connection < 1:
            raise ConfigError("max_registrations_per_connection must be at least 1")
        for endpoint in (self.bind, self.feed_bind or self.bind):
            auth.check_bind(endpoint, self.secret, self.insecure_any_address)

    @property
    def lease_s(self) -> float:
        return self.heartbeat_interval_s * self.liveness

    @property
    def refusal_memory_s(self) -> float:
        return max(MIN_REFUSAL_MEMORY_S, self.heartbeat_interval_s * REFUSAL_MEMORY_INTERVALS)


@dataclass(slots=True)
class ServerCounters:
    lookups: int = 0
    keys_looked_up: int = 0
    keys_hit: int = 0
    publishes: int = 0
    heartbeats: int = 0
    expirations: int = 0
    rejected: int = 0
    """Bad input: undecodable, wrong version, wrong frame count, internal error."""
    auth_refused: int = 0
    lookup_buckets: list[int] = field(default_factory=lambda: [0] * (len(LOOKUP_BUCKETS_S) + 1))
    """Lookups by handling time (decode, index, encode, send), per LOOKUP_BUCKETS_S bound
    and one above the last."""
    lookup_seconds: float = 0.0


class DirectoryServer:
    """Binds on construction (``.endpoint``, ``.feed_endpoint`` are the real addresses);
    :meth:`serve` runs the loop.

    Not thread-safe: construct, then call :meth:`serve` from one thread and stop it through
    the event; :meth:`close` after serve returns. Counters may be read from other threads
    (metrics): ints, replaced atomically under the GIL.
    """

    def __init__(self, config: ServerConfig, *, clock: Callable[[], float] = time.monotonic,
                 directory_epoch: int | None = None,
                 wall_clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.config = config
        self._clock = clock
        self._wall_clock_ns = wall_clock_ns
        self._context = zmq.Context()
        self._zap: zmq.Socket | None = None
        self._callers: auth.Callers | None = None
        try:
            if config.secret is not None:
                self._zap = self._context.socket(zmq.REP)
                self._zap.bind(ZAP_ENDPOINT)
                self._callers = auth.Callers(config.secret)
            self._socket = self._bound(zmq.ROUTER, config.bind, auth.ROUTER_DOMAIN)
            # NOTE: clients choose a random routing id and keep it across reconnects; the
            # id that registered an instance owns it (index.Member.owner), and a reconnect
            # must hand the id over to the new connection, not refuse it.
            self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
            self._feed = self._bound(zmq.XPUB, config.feed_bind or _port0(self.endpoint),
                                     auth.FEED_DOMAIN)
            self.feed_endpoint: str = self._feed.getsockopt_string(zmq.LAST_ENDPOINT)
        except (zmq.ZMQError, ConfigError):
            self._context.destroy(linger=0)
            raise
        # Wall-clock nanoseconds: distinct across restarts and increasing, so a client can tell
        # that the directory it talks to lost its state.
        self.directory_epoch: int = (directory_epoch if directory_epoch is not None
                                     else time.time_ns())
        self.index = DirectoryIndex(
            config.lease_s, max_registrations=config.max_registrations_per_connection)
        self.counters = ServerCounters()
        self.refusals: Counter[str] = Counter()
        """Error replies by status (metrics)."""
        self._refused = RecentRefusals(config.refusal_memory_s)
        self.feed_seq = 0
        self._subscribers = 0
        self._next_purge = 0.0
        self._snapshots: deque[_SnapshotJob] = deque()
        self._next_auth_warning = 0.0

    def _bound(self, kind: int, endpoint: str, domain: bytes) -> zmq.Socket:
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
        if self.config.secret is not None:
            auth.secure_server_socket(sock, self.config.secret, domain)
        sock.bind(endpoint)
        return sock

    @property
    def secure(self) -> bool:
        return self.config.secret is not None

    def serve(self, stop: threading.Event) -> None:
        """Answer requests until ``stop`` is set (checked at least every POLL_INTERVAL_MS)."""
        logger.info("directory serving on %s, feed %s (epoch %s, lease %.1f s = %g s x %d, %s)",
                    self.endpoint, self.feed_endpoint, self.directory_epoch,
                    self.config.lease_s, self.config.heartbeat_interval_s, self.config.liveness,
                    "CURVE, members only" if self.secure else
                    "UNAUTHENTICATED: anyone who can reach it may use it")
        poller = zmq.Poller()
        for sock in (self._socket, self._feed, self._zap):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        while not stop.is_set():
            busy = self._snapshots or self.index.sweeping
            ready = dict(poller.poll(0 if busy else POLL_INTERVAL_MS))
            if self._zap is not None and self._zap in ready:
                self._answer_zap()
            if self._feed in ready:
                self._track_subscribers()
            if self._socket in ready:
                self._handle_batch()
            self._send_snapshot_part()
            self._purge_expired()
            self._sweep()
        logger.info("directory on %s stopping", self.endpoint)

    def close(self) -> None:
        """Close the sockets and the context."""
        self._context.destroy(linger=0)

    # -- steps ------------------------------------------------------------------------------

    def _handle_batch(self) -> None:
        """Up to MAX_BATCH messages: each Lookup is answered as soon as it is read, ahead of
        the writes (publishes, heartbeats, registrations, ...) read before it, unless its own
        connection sent one of them: a connection's messages are handled in its order, so a
        client always sees its own writes. Writes wait in ``inbox`` and are handled one at a
        time, reading what arrived in between first. A Lookup of a connection with no write
        waiting thus waits for at most the one write being handled when it arrives.

        With ``ServerConfig.lookups_first`` off, every message in the order read (as before)."""
        inbox: deque[tuple[list[bytes], auth.Caller | None]] = deque()
        writers: Counter[bytes] = Counter()
        """Writes in ``inbox`` per connection (routing id)."""
        budget = self._read(inbox, writers, MAX_BATCH)
        while inbox:
            frames, caller = inbox.popleft()
            if not self._is_lookup(frames):
                writers[frames[0]] -= 1
            self._answer(frames, caller)
            if budget and self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                budget = self._read(inbox, writers, budget)

    def _read(self, inbox: deque[tuple[list[bytes], auth.Caller | None]],
              writers: Counter[bytes], budget: int) -> int:
        """Receive up to ``budget`` messages already here: Lookups of connections without a
        write in ``inbox`` are answered at once, the rest queue there. Returns the budget
        left."""
        while budget > 0:
            caller: auth.Caller | None = None
            try:
                if self._callers is None:
                    frames = self._socket.recv_multipart(zmq.NOBLOCK)
                else:
                    parts = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    frames = [part.bytes for part in parts]
                    caller = self._caller(frames[0], parts[-1])
            except zmq.Again:
                return budget
            budget -= 1
            if caller is None and self._callers is not None:
                continue
            if not self.config.lookups_first:
                self._answer(frames, caller)
            elif self._is_lookup(frames) and not writers[frames[0]]:
                self._answer(frames, caller)
            else:
                if not self._is_lookup(frames):
                    writers[frames[0]] += 1
                inbox.append((frames, caller))
        return 0

    @staticmethod
    def _is_lookup(frames: list[bytes]) -> bool:
        return protocol.is_lookup(frames[-1])

    def _answer(self, frames: list[bytes], caller: auth.Caller | None) -> None:
        """Handle one message and send its replies (Lookups timed for ``lookup_buckets``)."""
        t0 = time.perf_counter()
        envelope, replies = self._handle_frames(frames, caller)
        for reply in replies:
            self._send(envelope, reply)
        if replies and isinstance(replies[0], LookupReply):
            took = time.perf_counter() - t0
            c = self.counters
            c.lookup_buckets[bisect_left(LOOKUP_BUCKETS_S, took)] += 1
            c.lookup_seconds += took

    def _answer_zap(self) -> None:
        """ZAP (RFC 27) inside the loop: the member key gets in (user id ``member``), and on
        the ROUTER any other CURVE key, with the key as user id: whose key it is is checked
        per message (``_caller``), since ZAP is not told the client's routing id."""
        assert self._zap is not None and self._callers is not None
        while True:
            try:
                frames = self._zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            request_id = frames[1] if len(frames) > 1 else b""
            domain = frames[2] if len(frames) > 2 else b""
            mechanism = frames[5] if len(frames) > 5 else b""
            user = self._callers.zap_user(domain, mechanism, frames[6] if len(frames) > 6
                                          else b"")
            if user is None:
                self.counters.auth_refused += 1
                address = frames[3].decode(errors="replace") if len(frames) > 3 else "?"
                logger.warning("refused a %s connection from %s: not a cluster member "
                               "(wrong or no secret)", mechanism.decode(errors="replace"),
                               address)
            self._zap.send_multipart([b"1.0", request_id, b"400" if user is None else b"200",
                                      b"not a cluster member" if user is None else b"OK",
                                      (user or "").encode(), b""])

    def _caller(self, rid: bytes, frame: zmq.Frame) -> auth.Caller | None:
        """Who sent ``frame`` (its ZAP user id, checked against the instance its routing id
        names); None, counted and logged, for a key that is nobody's: dropped unanswered."""
        assert self._callers is not None
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            user = ""
        caller = self._callers.caller(rid, user if isinstance(user, str) else "")
        if caller is None:
            self.counters.auth_refused += 1
            now = self._clock()
            if now >= self._next_auth_warning:
                self._next_auth_warning = now + AUTH_WARNING_INTERVAL_S
                logger.warning("dropped a message from a connection whose key is neither the "
                               "members' nor that of the instance its routing id names "
                               "(%s): not a cluster member", auth.routing_instance(rid))
        return caller

    def _track_subscribers(self) -> None:
        while True:
            try:
                msg = self._feed.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                self._subscribers += 1
            elif msg[:1] == b"\x00":
                self._subscribers = max(0, self._subscribers - 1)

    def _purge_expired(self) -> None:
        now = self._clock()
        if now < self._next_purge:
            return
        self._next_purge = now + protocol.tick_s(self.config.heartbeat_interval_s)
        for member in self.index.expire(now):
            self.counters.expirations += 1
            logger.info("lease of %s epoch %s expired (%d keys dropped)", member.instance,
                        member.epoch, member.chunks)
            self._left(member, "expired")

    def _sweep(self) -> None:
        """A step of removing the keys of members gone (``DirectoryIndex.sweep``)."""
        if self.index.sweeping:
            self.index.sweep()

    # -- requests ---------------------------------------------------------------------------

    def _handle_frames(self, frames: list[bytes], caller: auth.Caller | None = None
                       ) -> tuple[list[bytes], list[Reply]]:
        """Split the ROUTER envelope and answer the body (``caller``: see :meth:`_handle`)."""
        # DEALER peers send [body]; REQ peers send ["", body]. ROUTER prepends the identity.
        if len(frames) == 2:
            envelope, body = frames[:1], frames[1]
        elif len(frames) == 3 and frames[1] == b"":
            envelope, body = frames[:2], frames[2]
        else:
            return frames[:1], [self._refuse(0, Status.BAD_REQUEST,
                                             f"expected one message frame, got {len(frames) - 1}")]
        if len(body) > protocol.MAX_MESSAGE_BYTES:
            return envelope, [self._refuse(0, Status.BAD_REQUEST, f"message of {len(body)} "
                                           f"bytes exceeds {protocol.MAX_MESSAGE_BYTES}")]
        try:
            return envelope, self._handle(body, owner=frames[0], envelope=envelope,
                                          caller=caller)
        except Exception:  # noqa: BLE001 - one bad message must never stop the directory
            logger.exception("internal error handling a message")
            return envelope, [self._refuse(0, Status.INTERNAL, "internal error in the directory")]

    def _handle(self, body: bytes, owner: bytes = b"", envelope: list[bytes] | None = None,
                caller: auth.Caller | None = None) -> list[Reply]:
        """Answer one message from the connection whose ROUTER identity is ``owner``.

        ``caller``: whose CURVE key sent it (None: a directory without a secret, where
        anyone may do anything). Messages that change instance ``i`` need ``i``'s key (or
        its engine's, for a rank ``i/<n>``): NOT_THIS_INSTANCE otherwise, before the
        connection binding is even looked at; registrations count against the credential's
        quota, not the connection's."""
        try:
            msg = protocol.decode(body)
        except ProtocolError as e:
            header = protocol.peek_header(body)
            if header is None:
                return [self._refuse(0, Status.BAD_REQUEST, str(e))]
            v, rid = header
            rid = rid if 0 <= rid < 2**63 else 0
            if v != PROTOCOL_VERSION:
                return [self._refuse(rid, Status.VERSION, protocol.version_mismatch_reason(v))]
            return [self._refuse(rid, Status.BAD_REQUEST, str(e))]
        if msg.v != PROTOCOL_VERSION:
            return [self._refuse(msg.rid, Status.VERSION, protocol.version_mismatch_reason(msg.v))]
        rid = msg.rid
        now = self._clock()
        if caller is not None and isinstance(msg, _WRITES) and not caller.may_act_as(
                msg.instance):
            return [self._refuse(rid, Status.NOT_THIS_INSTANCE, _not_this_instance(
                caller, msg.instance))]
        quota = (caller.credential.encode() if caller is not None and caller.credential
                 else owner)
        try:
            match msg:
                case Lookup():
                    return [self._lookup(msg, now)]
                case Publish():
                    self.index.publish(msg.instance, msg.namespace, msg.seq, msg.reset,
                                       msg.added, msg.removed, now, epoch=msg.epoch,
                                       owner=owner, lease_s=msg.lease_ms / 1000)
                    self.counters.publishes += 1
                    self._emit(ChunksChanged(
                        seq=0, directory_epoch=0, instance=msg.instance,
                        namespace=msg.namespace, added=msg.added, removed=msg.removed,
                        reset=msg.reset))
                case Heartbeat():
                    self.counters.heartbeats += 1
                    self.index.heartbeat(msg.instance, msg.epoch, msg.seq, now, owner=owner)
                case Heartbeats():
                    return [self._heartbeats(msg, now, owner, caller)]
                case Register():
                    return [self._register(msg, now, owner, quota,
                                           caller.key if caller is not None else "")]
                case Report():
                    self.index.set_counters(msg.instance, msg.counters, now, epoch=msg.epoch,
                                            owner=owner)
                case Stats():
                    return [self._stats(rid, now)]
                case Snapshot():
                    return self._snapshot(envelope or [owner], rid, now)
                case Unregister():
                    member = self.index.unregister(msg.instance, msg.epoch, now, owner=owner)
                    if member is not None:
                        self._left(member, "unregistered")
                case _:
                    return [self._refuse(rid, Status.BAD_REQUEST,
                                         f"{type(msg).__name__} is not a request")]
        except DirectoryIndexError as e:
            return [self._refuse(rid, e.status, str(e), e.retry_after_s)]
        return [Ok(rid=rid, directory_epoch=self.directory_epoch)]

    def _register(self, msg: Register, now: float, owner: bytes, quota: bytes, key: str = ""
                  ) -> RegisterReply:
        try:
            ahead_s = (msg.epoch - self._wall_clock_ns()) / 1e9
            if ahead_s > protocol.MAX_EPOCH_AHEAD_S:
                raise DirectoryIndexError(
                    Status.BAD_REQUEST, f"epoch {msg.epoch} is {ahead_s:.0f} s ahead of the "
                    f"directory's clock (at most {protocol.MAX_EPOCH_AHEAD_S:.0f} s): epochs "
                    "are wall-clock nanoseconds (time.time_ns())")
            outcome = self.index.register(msg.instance, msg.epoch, msg.namespace, msg.address,
                                          msg.probe, msg.capabilities, now, owner=owner,
                                          quota=quota, engine=msg.engine, slice=msg.slice, spec=msg.spec,
                                          key=key)
        except DirectoryIndexError as e:
            if self._refused.remember(msg, e.status, str(e), now):
                logger.warning("refused to register %s at %s: %s", msg.instance, msg.address, e)
            raise
        self._refused.forget(msg.instance)
        if outcome.replaced is not None:
            self._left(outcome.replaced, "replaced")
        if outcome.joined:
            self._emit(InstanceJoined(seq=0, directory_epoch=0, instance=msg.instance,
                                      epoch=msg.epoch, namespace=msg.namespace,
                                      address=msg.address, engine=msg.engine,
                                      slice=msg.slice))
        return RegisterReply(rid=msg.rid, directory_epoch=self.directory_epoch,
                             heartbeat_ms=int(self.config.heartbeat_interval_s * 1000),
                             liveness=self.config.liveness)

    def _heartbeats(self, msg: Heartbeats, now: float, owner: bytes,
                    caller: auth.Caller | None = None) -> HeartbeatsReply:
        """Each entry as its own Heartbeat; the refused ones are listed (and counted). With
        credentials, an entry for an instance the caller may not act as is refused alone
        (NOT_THIS_INSTANCE), as its own Heartbeat would be."""
        refused = []
        for i, beat in enumerate(msg.beats):
            if caller is not None and not caller.may_act_as(beat.instance):
                err = self._refuse(msg.rid, Status.NOT_THIS_INSTANCE,
                                   _not_this_instance(caller, beat.instance))
                refused.append(BeatRefusal(i, err.status, err.reason, err.retry_after_ms))
                continue
            try:
                self.index.heartbeat(beat.instance, beat.epoch, beat.seq, now, owner=owner)
            except DirectoryIndexError as e:
                err = self._refuse(msg.rid, e.status, str(e), e.retry_after_s)
                refused.append(BeatRefusal(i, err.status, err.reason, err.retry_after_ms))
        self.counters.heartbeats += len(msg.beats)
        return HeartbeatsReply(rid=msg.rid, directory_epoch=self.directory_epoch,
                               refused=refused)

    def _lookup(self, msg: Lookup, now: float) -> LookupReply:
        holders = self.index.lookup(msg.namespace, msg.keys, now)
        c = self.counters
        c.lookups += 1
        c.keys_looked_up += len(msg.keys)
        c.keys_hit += holders[0].run if holders else 0
        return LookupReply(rid=msg.rid, directory_epoch=self.directory_epoch, holders=holders)

    def _stats(self, rid: int, now: float) -> StatsReply:
        c = self.counters
        return StatsReply(rid=rid, directory_epoch=self.directory_epoch,
                          instances=self.index.instances(now), lookups=c.lookups,
                          keys_looked_up=c.keys_looked_up, keys_hit=c.keys_hit,
                          rejected=c.rejected, chunks=self.index.num_chunks,
                          expirations=c.expirations, heartbeats=c.heartbeats,
                          publishes=c.publishes, feed_seq=self.feed_seq,
                          feed_endpoint=self.feed_endpoint, secure=self.secure,
                          refused=self._refused.recent(now),
                          lookup_buckets=list(c.lookup_buckets))

    def _snapshot(self, envelope: list[bytes], rid: int, now: float) -> list[Reply]:
        """Queue a snapshot: its parts go out one per loop turn (``_send_snapshot_part``)."""
        if len(self._snapshots) >= MAX_SNAPSHOTS_IN_FLIGHT:
            return [self._refuse(rid, Status.OVER_QUOTA, f"{len(self._snapshots)} snapshots "
                                 "are being sent; ask again")]
        self._snapshots.append(_SnapshotJob(envelope, rid, self.feed_seq,
                                            self.index.instances(now), self.index.holdings()))
        return []

    def _send_snapshot_part(self) -> None:
        """One part (at most SNAPSHOT_KEYS_PER_PART keys) of the oldest snapshot in flight.

        NOTE: parts after the first show the state when they are built, not as of the
        snapshot's ``feed_seq``: the subscriber applies every event after ``feed_seq`` on
        top, and applying joins, leaves and key changes again is idempotent, so the replica
        ends up the same. A member gone or replaced since is skipped (its events say so);
        members without keys are only in ``instances``."""
        if not self._snapshots:
            return
        job = self._snapshots[0]
        holdings = [Holding(m.instance, m.namespace, keys)
                    for m, keys in job.cursor.next_part(SNAPSHOT_KEYS_PER_PART)]
        last = job.cursor.done
        self._send(job.envelope, SnapshotReply(
            rid=job.rid, directory_epoch=self.directory_epoch, feed_seq=job.feed_seq,
            feed_endpoint=self.feed_endpoint, instances=job.instances if job.first else [],
            holdings=holdings, last=last))
        job.first = False
        if last:
            self._snapshots.popleft()

    # -- feed and replies -------------------------------------------------------------------

    def _left(self, member: Member, why: str) -> None:
        self._emit(InstanceLeft(seq=0, directory_epoch=0, instance=member.instance,
                                epoch=member.epoch, why=why))

    def _emit(self, event: FeedEvent) -> None:
        # NOTE: seq advances even with no subscriber, so a Snapshot's feed_seq always names
        # the state it shows; encoding is skipped then (the costly part).
        self.feed_seq += 1
        if not self._subscribers:
            return
        event = _with_seq(event, self.feed_seq, self.directory_epoch)
        try:
            self._feed.send(protocol.encode(event), zmq.NOBLOCK)
        except zmq.Again:
            pass  # XPUB drops for slow subscribers; they see the seq gap and resync

    def _refuse(self, rid: int, status: str, reason: str, retry_after_s: float = 0.0
                ) -> Error:
        self.refusals[status] += 1
        if status in _BAD_INPUT:
            self.counters.rejected += 1
        logger.debug("refused request %s (%s): %s", rid, status, reason)
        return Error(rid=rid, directory_epoch=self.directory_epoch, status=status,
                     reason=reason[:4096], retry_after_ms=max(0, int(retry_after_s * 1000)))

    def _send(self, envelope: list[bytes], reply: Reply) -> None:
        try:
            # NOTE: a ROUTER drops (does not block on) replies to a peer whose queue is full
            # or that is gone; NOBLOCK guards against anything else.
            self._socket.send_multipart([*envelope, protocol.encode(reply)], zmq.NOBLOCK)
        except zmq.Again:
            logger.debug("dropped a reply to a slow or gone client")


@dataclass(slots=True)
class _SnapshotJob:
    """A Snapshot being answered part by part: who asked, the state's head (as of
    ``feed_seq``) and the cursor over the members' keys."""

    envelope: list[bytes]
    rid: int
    feed_seq: int
    instances: list[InstanceInfo]
    cursor: HoldingsCursor
    first: bool = True


_WRITES = (Register, Publish, Heartbeat, Report, Unregister)
"""Requests that change an instance's state (each names its ``instance``)."""


def _not_this_instance(caller: auth.Caller, instance: str) -> str:
    if caller.credential is None:
        return (f"the members' shared key may only look up (Lookup, Stats, Snapshot), not act "
                f"as instance {instance}: give the instance its credential file "
                f"(credential_file, written by the launcher or `p2pkv credential`) or the "
                f"cluster secret")
    return (f"this connection holds the credential of instance {caller.credential}, which "
            f"may act only as {caller.credential} and its ranks {caller.credential}/<n>, not "
            f"as {instance}")


def _with_seq(event: FeedEvent, seq: int, epoch: int) -> FeedEvent:
    return msgspec.structs.replace(event, seq=seq, directory_epoch=epoch)


def _port0(endpoint: str) -> str:
    """The same host as ``endpoint`` on a free port (for the feed's default)."""
    if endpoint.startswith("tcp://"):
        return endpoint.rsplit(":", 1)[0] + ":0"
    return endpoint + ".feed"
