"""Client of the p2pkv directory: one DEALER socket that never blocks its caller.

Used by the connector's scheduler side (register, publish, lookups polled once per engine
step), the router and ``p2pkv status`` (:meth:`DirectoryClient.call`). Sends use NOBLOCK on a
socket with ``IMMEDIATE`` set: while the directory is unreachable messages are dropped and
counted in ``dropped`` instead of queueing, and a lookup then ends as None at its deadline.
Replies are drained whenever the client is used; Error replies to fire-and-forget requests
are logged once per reason.

NOTE: not thread-safe (a ZeroMQ socket belongs to one thread); give each thread its own.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Union

import msgspec
import zmq

from p2pkv.directory import protocol
from p2pkv.directory.protocol import (
    MAX_KEYS_PER_MESSAGE, Error, Lookup, LookupReply, ProtocolError, Publish, Register, Reply,
    Report, Request, Unregister,
)
from p2pkv.keys import ChunkKey, InstanceId, Namespace

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

HEARTBEAT_IVL_MS = 1000
HEARTBEAT_LIVENESS = 3
HEARTBEAT_TIMEOUT_MS = HEARTBEAT_IVL_MS * HEARTBEAT_LIVENESS
"""A connection silent this long is dropped by ZeroMQ, so sends stop queueing into it."""

RECONNECT_IVL_MAX_MS = 1000

RESULT_GRACE_S = 30.0
"""How long an arrived but never polled lookup reply is kept after its deadline."""

_PURGE_ABOVE = 1024
_MAX_WARNED_REASONS = 128


@dataclass(slots=True)
class _Lookup:
    deadline: float
    done: bool = False
    reply: LookupReply | None = None


class DirectoryClient:
    """Talks to one directory endpoint; see the module docstring for the blocking rules."""

    def __init__(self, endpoint: str, *, context: zmq.Context | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoint = endpoint
        self._clock = clock
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        for option, value in ((zmq.LINGER, 0), (zmq.SNDHWM, SEND_HWM), (zmq.IMMEDIATE, 1),
                              (zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS),
                              (zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS),
                              (zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS),
                              (zmq.MAXMSGSIZE, 4 * protocol.MAX_MESSAGE_BYTES)):
            self._socket.setsockopt(option, value)
        self._socket.connect(endpoint)
        self._rids = itertools.count(1)
        self._lookups: dict[int, _Lookup] = {}
        self._warned: set[str] = set()
        self.dropped = 0
        """Messages not sent because the directory was unreachable or its queue full."""
        self.bad_replies = 0
        """Replies that did not decode."""
        self.directory_epoch: int | None = None
        """``directory_epoch`` of the last reply; a change means the directory restarted."""

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until a send would not be dropped (e.g. before Register)."""
        return bool(self._socket.poll(_ms(timeout_s), zmq.POLLOUT))

    def send_nowait(self, msg: Request) -> int:
        """Send ``msg`` with a fresh rid (its own rid is ignored); returns the rid, or -1 if
        dropped. Never blocks."""
        self._drain()
        return self._send(msg)

    def register(self, instance: InstanceId, epoch: int, namespace: Namespace,
                 address: str) -> int:
        """Fire-and-forget Register; ``address`` is this instance's data-plane "host:port"."""
        return self.send_nowait(Register(instance=instance, epoch=epoch, namespace=namespace,
                                         address=address))

    def publish(self, instance: InstanceId, namespace: Namespace,
                added: Sequence[ChunkKey] = (), removed: Sequence[ChunkKey] = ()) -> int:
        """Fire-and-forget Publish, split into messages of at most MAX_KEYS_PER_MESSAGE keys.

        Returns the rid of the last message (-1 if it was dropped).
        """
        added, removed = list(added), list(removed)
        rid = -1
        while True:
            batch_added = added[:MAX_KEYS_PER_MESSAGE]
            batch_removed = removed[:MAX_KEYS_PER_MESSAGE - len(batch_added)]
            added = added[len(batch_added):]
            removed = removed[len(batch_removed):]
            rid = self.send_nowait(Publish(instance=instance, namespace=namespace,
                                           added=batch_added, removed=batch_removed))
            if not added and not removed:
                return rid

    def report(self, instance: InstanceId, counters: Mapping[str, int]) -> int:
        """Fire-and-forget Report of connector counters (shown by ``p2pkv status``)."""
        return self.send_nowait(Report(instance=instance, counters=dict(counters)))

    def unregister(self, instance: InstanceId) -> int:
        """Fire-and-forget Unregister (on clean shutdown)."""
        return self.send_nowait(Unregister(instance=instance))

    def start_lookup(self, namespace: Namespace, keys: Sequence[ChunkKey],
                     timeout_s: float) -> int:
        """Ask who holds the leading run of ``keys``; returns a rid for :meth:`poll_lookup`.

        Keys past MAX_KEYS_PER_MESSAGE are not looked up. A dropped send still returns a
        rid, whose lookup then ends as None at once.
        """
        now = self._clock()
        if len(self._lookups) > _PURGE_ABOVE:
            self._purge(now)
        rid = self.send_nowait(Lookup(namespace=namespace,
                                      keys=list(keys[:MAX_KEYS_PER_MESSAGE])))
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
        self._drain()
        entry = self._lookups.get(rid)
        if entry is None:
            return None
        if entry.done:
            del self._lookups[rid]
            return entry.reply
        if self._clock() >= entry.deadline:
            del self._lookups[rid]
            logger.debug("lookup %s passed its deadline", rid)
            return None
        return PENDING

    def wait_lookup(self, rid: int, max_wait_s: float) -> LookupResult:
        """Like :meth:`poll_lookup` but waits up to ``max_wait_s`` for the reply."""
        give_up = self._clock() + max_wait_s
        while True:
            result = self.poll_lookup(rid)
            if result is not PENDING:
                return result
            now = self._clock()
            if now >= give_up:
                return PENDING
            # Waking at the lookup's deadline lets the next poll_lookup() report None.
            wake = min(give_up, self._lookups[rid].deadline)
            self._socket.poll(_ms(wake - now), zmq.POLLIN)

    def call(self, msg: Request, timeout_s: float) -> Reply | None:
        """Send ``msg`` and wait for its reply (an Error reply included); None at the deadline.

        Blocking, for the CLI and tests. Unrelated replies that arrive meanwhile are handled
        as usual.
        """
        deadline = self._clock() + timeout_s
        self._drain()
        rid = self._send(msg, count_drop=False)
        while rid < 0:
            remaining = deadline - self._clock()
            if remaining <= 0 or not self._socket.poll(_ms(remaining), zmq.POLLOUT):
                return None
            rid = self._send(msg, count_drop=False)
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0 or not self._socket.poll(_ms(remaining), zmq.POLLIN):
                return None
            for reply in self._drain():
                if reply.rid == rid:
                    return reply

    def close(self) -> None:
        """Close the socket (and the context if this client created it). Idempotent."""
        if self._socket.closed:
            return
        self._socket.close(linger=0)
        if self._own_context:
            self._context.term()

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
            if not isinstance(reply, (protocol.Ok, Error, LookupReply, protocol.StatsReply)):
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
        if isinstance(reply, Error):
            self._warn_once(f"directory refused a request: {reply.reason}")

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


def _ms(seconds: float) -> int:
    """A zmq poll timeout in ms, at least 1 so a tiny positive wait does not mean 'forever'."""
    return max(1, int(seconds * 1000 + 0.999))
