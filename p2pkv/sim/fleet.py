"""Many simulated instances registered on one directory over one DEALER socket.

``p2pkv bench trace`` needs a thousand registrations with real leases, publishes and
lookups; a :class:`~p2pkv.directory.client.DirectoryClient` per instance (a socket, a
context and a keeper thread each) does not scale to that. A :class:`Fleet` speaks the same
protocol (``directory/protocol.py`` messages) for all of its instances from one socket and
one thread: it registers each, heartbeats each on its own phase, publishes with per-instance
sequence numbers, and repairs what the directory reports as the real client does
(``unknown_instance`` or a new ``directory_epoch``: register again and resend a snapshot;
``seq_gap``: resend a snapshot). Not thread-safe: the replay loop calls :meth:`service`
between requests.

Heartbeats (issue 15): by default the members' heartbeats due together go out as one
``Heartbeats`` message (up to ``MAX_BEATS_PER_MESSAGE`` entries; a member due within
``BATCH_AHEAD`` of its interval joins the batch early, so batches grow instead of one per
phase), and each entry's answer is handled as its own Heartbeat's would be
(``protocol.split_heartbeats_reply``). A directory that does not know the message
(``protocol.heartbeats_unsupported``) gets single Heartbeats from then on, as does a fleet
made with ``batch_heartbeats=False``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec
import zmq

from p2pkv.directory import auth, protocol
from p2pkv.directory.protocol import (
    MAX_KEYS_PER_MESSAGE, Error, Heartbeat, Heartbeats, Lookup, LookupReply, Publish,
    Register, RegisterReply, Reply, Request, Status, Unregister,
)
from p2pkv.errors import P2PKVError
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from p2pkv.secret import ClusterSecret

logger = logging.getLogger(__name__)

HWM = 200_000
"""Queued messages per direction (a whole fleet registers at once)."""

BATCH_AHEAD = 0.125
"""With batched heartbeats, a member whose heartbeat is due within this fraction of its
interval goes in the batch being sent (early: its lease is liveness intervals long)."""


class FleetError(P2PKVError):
    """The directory did not accept the fleet in time."""


@dataclass(slots=True)
class _Member:
    instance: InstanceId
    registered: bool = False
    seq: int = 0
    heartbeat_s: float = 1.0
    generation: int = 0
    """Bumped at each registration, so heartbeat slots of an earlier one are dropped."""


@dataclass(slots=True)
class FleetStats:
    """Traffic of one fleet, counted at its socket."""

    sent: int = 0
    sent_bytes: int = 0
    received: int = 0
    received_bytes: int = 0
    by_kind: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    lookup_rtts: list[float] = field(default_factory=list)
    lookups_failed: int = 0
    registrations: int = 0
    snapshots: int = 0
    beats: int = 0
    """Heartbeats sent: single Heartbeat messages plus the entries of Heartbeats."""


class Fleet:
    """Registrations of ``instances`` in ``namespace``; ``keys_of(i)`` is instance i's whole
    key set (what a snapshot resends)."""

    def __init__(self, endpoint: str, namespace: Namespace, instances: Sequence[InstanceId],
                 *, keys_of: Callable[[int], list[ChunkKey]], address_of: Callable[[int], str],
                 epoch: int | None = None, secret: ClusterSecret | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 batch_heartbeats: bool = True) -> None:
        self.endpoint = endpoint
        self.batch_heartbeats = batch_heartbeats
        """Send due heartbeats as one Heartbeats (off after a directory refused it)."""
        self.namespace = namespace
        self._keys_of = keys_of
        self._address_of = address_of
        self._clock = clock
        self._epoch = epoch if epoch is not None else time.time_ns()
        self._members = [_Member(i) for i in instances]
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        for option, value in ((zmq.LINGER, 0), (zmq.SNDHWM, HWM), (zmq.RCVHWM, HWM),
                              (zmq.IMMEDIATE, 1), (zmq.RECONNECT_IVL_MAX, 250),
                              (zmq.MAXMSGSIZE, 4 * protocol.MAX_MESSAGE_BYTES)):
            self._socket.setsockopt(option, value)
        if secret is not None:
            auth.secure_client_socket(self._socket, secret)
        self._socket.connect(endpoint)
        self._rids = itertools.count(1)
        self._pending: dict[int, tuple[int, str]] = {}
        """rid -> (member index, request kind) for replies that change a member's state."""
        self._batches: dict[int, tuple[Heartbeats, list[int]]] = {}
        """rid -> a Heartbeats in flight and its entries' member indices."""
        self._lookups: dict[int, LookupReply | None] = {}
        # NOTE: a heap (due time first): members register at different times, and in arrival
        # order one late registration would hold back every beat queued behind it.
        self._heartbeats: list[tuple[float, int, int]] = []
        self._unregistered: set[int] = set(range(len(self._members)))
        self._retry_at = 0.0
        self.directory_epoch = 0
        self.restarted_at = float("-inf")
        """When a reply first showed a new directory epoch (the directory restarted empty)."""
        self.stats = FleetStats()
        self.last_lookup_s = 0.0

    def __len__(self) -> int:
        return len(self._members)

    @property
    def registered(self) -> int:
        return len(self._members) - len(self._unregistered)

    # -- life cycle -------------------------------------------------------------------------

    def start(self, timeout_s: float) -> None:
        """Register every member; raises FleetError unless all are registered in time."""
        deadline = self._clock() + timeout_s
        self._socket.poll(int(timeout_s * 1000), zmq.POLLOUT)
        while self._unregistered:
            now = self._clock()
            if now > deadline:
                raise FleetError(f"{len(self._unregistered)} of {len(self._members)} "
                                 f"registrations not accepted by {self.endpoint} in "
                                 f"{timeout_s} s")
            self.service(wait_s=min(0.05, deadline - now))

    def close(self, unregister: bool = True) -> None:
        if unregister:
            for m in self._members:
                if m.registered:
                    self._send(Unregister(instance=m.instance, epoch=self._epoch))
        self._socket.close(linger=0)
        self._context.term()

    # -- traffic ----------------------------------------------------------------------------

    def service(self, wait_s: float = 0.0) -> None:
        """Handle replies (waiting up to ``wait_s`` for the first), send due heartbeats and
        registrations."""
        if wait_s > 0:
            self._socket.poll(max(1, int(wait_s * 1000)), zmq.POLLIN)
        self._drain()
        now = self._clock()
        hb = self._heartbeats
        due: list[int] = []
        while hb and hb[0][0] <= now:
            _, idx, generation = heapq.heappop(hb)
            m = self._members[idx]
            if not m.registered or generation != m.generation:
                continue
            due.append(idx)
        if due and self.batch_heartbeats:
            # the members due soon join this batch
            while hb and hb[0][0] <= now + BATCH_AHEAD * self._members[hb[0][1]].heartbeat_s:
                _, idx, generation = heapq.heappop(hb)
                m = self._members[idx]
                if m.registered and generation == m.generation:
                    due.append(idx)
        if self.batch_heartbeats:
            self._send_batches(due)
        else:
            for idx in due:
                self._send_heartbeat(idx)
        for idx in due:
            m = self._members[idx]
            heapq.heappush(hb, (now + m.heartbeat_s, idx, m.generation))
        if self._unregistered and now >= self._retry_at:
            self._retry_at = now + 1.0
            for idx in sorted(self._unregistered):
                self._register(idx)

    def publish(self, idx: int, added: list[ChunkKey], removed: list[ChunkKey]) -> None:
        """Member ``idx``'s store gained ``added`` and lost ``removed``."""
        m = self._members[idx]
        if not m.registered or not (added or removed):
            return  # the snapshot after (re-)registration carries it
        self._publish(idx, added, removed, reset=False)

    def lookup(self, keys: Sequence[ChunkKey], timeout_s: float) -> LookupReply | None:
        """Who holds the leading run of ``keys``; None at the deadline. Services the fleet
        while it waits; the round trip is recorded in ``stats.lookup_rtts``."""
        t0 = time.perf_counter()
        rid = self.start_lookup(keys)
        if rid < 0:
            self.stats.lookups_failed += 1
            return None
        deadline = self._clock() + timeout_s
        while True:
            reply = self.poll_lookup(rid)
            if reply is not None:
                self.last_lookup_s = time.perf_counter() - t0
                self.stats.lookup_rtts.append(self.last_lookup_s)
                return reply
            left = deadline - self._clock()
            if left <= 0:
                self.cancel_lookup(rid)
                self.stats.lookups_failed += 1
                return None
            self._socket.poll(max(1, int(left * 1000)), zmq.POLLIN)

    def start_lookup(self, keys: Sequence[ChunkKey]) -> int:
        """Send a Lookup; its rid, or -1 if it could not be sent (directory unreachable)."""
        rid = self._send(Lookup(namespace=self.namespace, keys=list(keys[:MAX_KEYS_PER_MESSAGE])))
        if rid >= 0:
            self._lookups[rid] = None
        return rid

    def poll_lookup(self, rid: int) -> LookupReply | None:
        """The reply if it arrived (then forgotten), else None. Never blocks."""
        self._drain()
        reply = self._lookups.get(rid)
        if reply is not None:
            del self._lookups[rid]
        return reply

    def cancel_lookup(self, rid: int) -> None:
        self._lookups.pop(rid, None)

    @property
    def socket(self) -> zmq.Socket:
        """For a caller's poller only (waiting on several fleets)."""
        return self._socket

    # -- internals --------------------------------------------------------------------------

    def _send_heartbeat(self, idx: int) -> None:
        m = self._members[idx]
        rid = self._send(Heartbeat(instance=m.instance, epoch=self._epoch, seq=m.seq))
        if rid >= 0:
            self.stats.beats += 1
            self._pending[rid] = (idx, "hb")

    def _send_batches(self, due: list[int]) -> None:
        if not due:
            return
        beats = [Heartbeat(instance=self._members[i].instance, epoch=self._epoch,
                           seq=self._members[i].seq) for i in due]
        start = 0
        for msg in protocol.batch_heartbeats(beats):
            members = due[start:start + len(msg.beats)]
            start += len(members)
            rid = self._send(msg)
            if rid >= 0:
                self.stats.beats += len(members)
                self._batches[rid] = (msgspec.structs.replace(msg, rid=rid), members)

    def _on_batch_reply(self, reply: Reply, sent: Heartbeats, members: list[int]) -> None:
        if protocol.heartbeats_unsupported(reply):
            logger.info("directory %s does not take batched heartbeats: sending them one by "
                        "one", self.endpoint)
            self.batch_heartbeats = False
            for idx in members:
                if self._members[idx].registered:
                    self._send_heartbeat(idx)
            return
        try:
            answers = protocol.split_heartbeats_reply(sent, reply)
        except protocol.ProtocolError:
            self.stats.errors["undecodable"] += 1
            return
        for idx, (_, answer) in zip(members, answers):
            self._on_member_reply(idx, "hb", answer)

    def _register(self, idx: int) -> None:
        m = self._members[idx]
        rid = self._send(Register(instance=m.instance, epoch=self._epoch,
                                  namespace=self.namespace, address=self._address_of(idx)))
        if rid >= 0:
            self._pending[rid] = (idx, "reg")

    def _publish(self, idx: int, added: list[ChunkKey], removed: list[ChunkKey],
                 reset: bool) -> None:
        m = self._members[idx]
        first = True
        while first or added or removed:
            a = added[:MAX_KEYS_PER_MESSAGE]
            r = removed[:MAX_KEYS_PER_MESSAGE - len(a)]
            added, removed = added[len(a):], removed[len(r):]
            rid = self._send(Publish(instance=m.instance, namespace=self.namespace, added=a,
                                     removed=r, seq=m.seq + 1, reset=reset and first,
                                     epoch=self._epoch))
            if rid < 0:
                self._forget(idx)  # lost: register and snapshot again
                return
            m.seq += 1
            self._pending[rid] = (idx, "pub")
            first = False

    def _snapshot(self, idx: int) -> None:
        self.stats.snapshots += 1
        self._publish(idx, list(self._keys_of(idx)), [], reset=True)

    def _forget(self, idx: int) -> None:
        m = self._members[idx]
        m.registered = False
        self._unregistered.add(idx)
        self._retry_at = 0.0

    def _on_reply(self, reply) -> None:
        if reply.directory_epoch != self.directory_epoch:
            if self.directory_epoch:
                self.restarted_at = self._clock()
                logger.info("directory %s restarted: registering %d instances again",
                            self.endpoint, len(self._members))
                for idx in range(len(self._members)):
                    self._forget(idx)
            self.directory_epoch = reply.directory_epoch
        if isinstance(reply, LookupReply):
            if reply.rid in self._lookups:
                self._lookups[reply.rid] = reply
            return
        batch = self._batches.pop(reply.rid, None)
        if batch is not None:
            self._on_batch_reply(reply, *batch)
            return
        pending = self._pending.pop(reply.rid, None)
        if isinstance(reply, Error) and reply.rid in self._lookups:
            self._lookups.pop(reply.rid)
            self.stats.lookups_failed += 1
        if pending is None:
            return
        self._on_member_reply(*pending, reply)

    def _on_member_reply(self, idx: int, kind: str, reply: Reply) -> None:
        m = self._members[idx]
        if isinstance(reply, RegisterReply) and kind == "reg":
            if not m.registered:
                m.registered = True
                m.generation += 1
                m.heartbeat_s = max(0.01, reply.heartbeat_ms / 1000)
                self._unregistered.discard(idx)
                self.stats.registrations += 1
                # NOTE: each member's heartbeat phase is spread over one interval.
                phase = m.heartbeat_s * (idx % 64) / 64
                heapq.heappush(self._heartbeats, (self._clock() + phase, idx, m.generation))
                self._snapshot(idx)
        elif isinstance(reply, Error):
            self.stats.errors[reply.status] += 1
            if reply.status in (Status.UNKNOWN_INSTANCE, Status.WRONG_NAMESPACE):
                self._forget(idx)
            elif reply.status == Status.SEQ_GAP and m.registered:
                self._snapshot(idx)
            elif kind == "reg":
                self._retry_at = self._clock() + 1.0

    def _send(self, msg: Request) -> int:
        rid = next(self._rids)
        data = protocol.encode(msgspec.structs.replace(msg, rid=rid))
        try:
            self._socket.send(data, zmq.NOBLOCK)
        except zmq.Again:
            self.stats.errors["dropped"] += 1
            return -1
        s = self.stats
        s.sent += 1
        s.sent_bytes += len(data)
        s.by_kind[type(msg).__name__] += 1
        return rid

    def _drain(self) -> None:
        s = self.stats
        while True:
            try:
                data = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            s.received += 1
            s.received_bytes += len(data)
            try:
                reply = protocol.decode(data)
            except protocol.ProtocolError:
                s.errors["undecodable"] += 1
                continue
            self._on_reply(reply)
