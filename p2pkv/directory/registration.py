"""The directory client's registration state machine: pure, no sockets, no threads, no clock.

Owned by :class:`~p2pkv.directory.client.DirectoryClient`, which drives it under its lock:
replies and time go in (``on_reply``, ``on_tick``, ``now`` arguments), and every method that
may want to talk returns the requests to send, in order, with ``rid`` 0. The client stamps
each with a rid and sends it, then says what happened: :meth:`RegistrationMachine.on_sent`
for each request queued (with its rid), :meth:`~RegistrationMachine.on_dropped` once for the
first one that was not (the client sends none after it: a socket that refused one request
refuses the next). Tests drive it the same way, without sockets
(``tests/test_directory_registration.py``).

States (``RegState``)::

    UNREGISTERED --Register sent--> REGISTERING --RegisterReply--> REGISTERED (send snapshot)
    REGISTERED --reply with another directory_epoch / UNKNOWN_INSTANCE--> UNREGISTERED
    REGISTERED --SEQ_GAP or a dropped publish--> REGISTERED, snapshot resent
    REGISTERING --PROBE_MISMATCH--> REFUSED (retried every REFUSED_RETRY_INTERVALS)
    REGISTERING --INSTANCE_TAKEN--> REFUSED (retried when the other connection's lease
                                    lapses: Error.retry_after_ms)
    REGISTERING --NOT_THIS_INSTANCE--> REFUSED (our key may not act as this instance: a
                                    wrong credential file; retried every
                                    REFUSED_RETRY_INTERVALS)
    any --STALE_EPOCH--> REFUSED (a newer process of this instance runs; retried every
                                  REFUSED_RETRY_INTERVALS, in case that one was a forgery
                                  and its lease lapsed)
    REGISTERED --INSTANCE_TAKEN--> UNREGISTERED (register again, and be told when)

The machine keeps the registration's whole key set (what the store holds), so that any
snapshot, after (re-)registering or a lost publish, can carry everything.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from p2pkv.directory.protocol import (
    HEARTBEAT_INTERVAL_S, MAX_KEYS_PER_MESSAGE, MAX_LEASE_MS, MIN_HEARTBEAT_S,
    REFUSED_RETRY_INTERVALS, Error, Heartbeat, Publish, Register, RegisterReply, Reply, Report,
    Request, Status, Unregister, tick_s,
)
from p2pkv.directory.tiers import apply_publish
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from p2pkv.slices import KVSlice

logger = logging.getLogger(__name__)

_MAX_WARNED_REASONS = 128


class RegState(enum.Enum):
    UNREGISTERED = "unregistered"
    REGISTERING = "registering"
    REGISTERED = "registered"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Registration:
    """Who a client registers as. One per client (the connector's worker rank)."""

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


def _always() -> bool:
    return True


class RegistrationMachine:
    """One registration kept alive; see the module docstring for how it is driven.

    ``can_send`` says whether the link would take a request now; it is asked only before
    building a snapshot (the whole key set), so that a directory that is down costs no
    snapshot per tick. ``peer`` names the directory in log lines.
    """

    def __init__(self, registration: Registration, *,
                 can_send: Callable[[], bool] = _always, peer: str = "the directory") -> None:
        self.registration = registration
        self._can_send = can_send
        self._peer = peer
        self.state = RegState.UNREGISTERED
        self.refused_reason: str | None = None
        """Why the directory refused this instance (None unless REFUSED)."""
        self.directory_epoch = 0
        """``directory_epoch`` of the RegisterReply that registered us."""
        self.heartbeat_s = HEARTBEAT_INTERVAL_S
        """Register retry and heartbeat interval (the directory's, once registered)."""
        self.seq = 0
        """Seq of the last Publish handed out (the Heartbeat carries it)."""
        self.resyncs = 0
        """Full snapshots queued (after registering, a seq gap or a dropped publish)."""
        self.keys: set[ChunkKey] = set()
        self._leased: dict[ChunkKey, float] = {}
        """Keys of ``keys`` published as leased (issue 14), and when (time.monotonic) each
        lease ends: a snapshot names them leased for what is left."""
        self._counters: dict[str, int] | None = None
        self._rid = 0
        """rid of the last Register queued; replies to older requests cannot change the state."""
        self._snapshot_rid = 0
        self._queued_seq = 0
        """Seq of the last Publish queued; below ``seq`` only until on_sent/on_dropped."""
        self._need_snapshot = False
        self._next_attempt = 0.0
        self._next_heartbeat = 0.0
        self._warned: set[str] = set()

    @property
    def tick_s(self) -> float:
        """How often the owner should call :meth:`on_tick`."""
        return tick_s(self.heartbeat_s)

    # -- inputs -----------------------------------------------------------------------------

    def on_tick(self, now: float) -> list[Request]:
        """Time passed: Register (retry), the due heartbeat, a due snapshot."""
        if self.state is RegState.REGISTERED:
            out: list[Request] = self._snapshot() if self._need_snapshot else []
            if now >= self._next_heartbeat:
                self._next_heartbeat = now + self.heartbeat_s
                reg = self.registration
                out.append(Heartbeat(instance=reg.instance, epoch=reg.epoch, seq=self.seq))
            return out
        if now < self._next_attempt:
            return []
        reg = self.registration
        return [Register(instance=reg.instance, epoch=reg.epoch, namespace=reg.namespace,
                         address=reg.address, probe=reg.probe,
                         capabilities=list(reg.capabilities), engine=reg.engine,
                         slice=reg.slice, spec=reg.spec)]

    def on_reply(self, reply: Reply, now: float) -> list[Request]:
        """Any reply from the directory (to any request of the owner's)."""
        reg = self.registration
        if self.state is RegState.REGISTERED and reply.directory_epoch != self.directory_epoch:
            logger.info("p2pkv: directory %s restarted (epoch %s -> %s); registering %s again",
                        self._peer, self.directory_epoch, reply.directory_epoch, reg.instance)
            return self._reregister(now)
        if reply.rid == self._rid and self.state in (RegState.REGISTERING, RegState.REFUSED):
            if isinstance(reply, RegisterReply):
                return self._registered(reply, now)
            if isinstance(reply, Error):
                self._refused(reply, now)
            return []
        if not isinstance(reply, Error) or reply.rid < self._rid:
            return []  # answers to requests of an older registration say nothing about this one
        if reply.status == Status.STALE_EPOCH:
            self._refused(reply, now)
        elif reply.status in (Status.UNKNOWN_INSTANCE, Status.WRONG_NAMESPACE,
                              Status.INSTANCE_TAKEN):
            if self.state is RegState.REGISTERED:
                logger.info("p2pkv: directory forgot %s (%s); registering again",
                            reg.instance, reply.reason)
                return self._reregister(now)
        elif reply.status == Status.SEQ_GAP and reply.rid > self._snapshot_rid:
            logger.info("p2pkv: %s", reply.reason)
            self._need_snapshot = True
            return self.on_tick(now)
        return []

    def publish(self, added: Iterable[ChunkKey] = (),
                removed: Iterable[ChunkKey] = (), *, lease_s: float = 0.0) -> list[Request]:
        """The store gained ``added`` and lost ``removed``: record them, and send them (one
        message per MAX_KEYS_PER_MESSAGE) while registered; otherwise the snapshot after
        (re-)registration carries them. ``lease_s`` > 0: ``added`` are in leased paged
        blocks for that long (``Publish.lease_ms``; a snapshot names them so for what is left)."""
        added, removed = list(added), list(removed)
        self.keys.update(added)
        self.keys.difference_update(removed)
        apply_publish(self._leased, added, removed,
                      time.monotonic() + lease_s if lease_s > 0 else None)
        if self._need_snapshot:
            return self._snapshot()
        if self.state is RegState.REGISTERED:
            return self._publishes(added, removed, reset=False,
                                   lease_ms=max(1, int(lease_s * 1000)) if lease_s > 0 else 0)
        return []

    def report(self, counters: Mapping[str, int]) -> list[Request]:
        """Connector counters: kept (and resent after a re-registration), sent if registered."""
        self._counters = dict(counters)
        if self.state is RegState.REGISTERED:
            reg = self.registration
            return [Report(instance=reg.instance, counters=self._counters, epoch=reg.epoch)]
        return []

    def leave(self) -> Unregister:
        """The Unregister to send on a clean shutdown (the machine is done after it). It
        names this process's epoch: it can never unregister a successor."""
        return Unregister(instance=self.registration.instance, epoch=self.registration.epoch)

    def on_sent(self, msg: Request, now: float) -> None:
        """``msg`` (with the rid it went out with) was queued towards the directory."""
        if isinstance(msg, Register):
            self._rid = msg.rid
            self._next_attempt = now + self.heartbeat_s
            if self.state is not RegState.REFUSED:
                self.state = RegState.REGISTERING
        elif isinstance(msg, Publish):
            self._queued_seq = msg.seq
            if msg.reset:
                self._snapshot_rid = msg.rid
                self.resyncs += 1
                logger.debug("p2pkv: snapshot of %d keys for %s", len(self.keys),
                             self.registration.instance)

    def on_dropped(self) -> None:
        """The first request of the last batch not yet reported by :meth:`on_sent` was not
        queued, and none after it was sent. A lost Publish makes a snapshot due; a lost
        Register is retried at the next tick (its retry time only moves once one is queued);
        a lost Heartbeat or Report is simply the next one's job."""
        if self.seq != self._queued_seq:
            self.seq = self._queued_seq
            self._need_snapshot = True

    # -- transitions ------------------------------------------------------------------------

    def _registered(self, reply: RegisterReply, now: float) -> list[Request]:
        was_refused = self.state is RegState.REFUSED
        self.state = RegState.REGISTERED
        self.refused_reason = None
        self.directory_epoch = reply.directory_epoch
        self.heartbeat_s = max(MIN_HEARTBEAT_S, reply.heartbeat_ms / 1000)
        self._next_heartbeat = now + self.heartbeat_s
        reg = self.registration
        logger.log(logging.WARNING if was_refused else logging.INFO,
                   "p2pkv: %s registered with directory %s (namespace %s, %d keys)",
                   reg.instance, self._peer, reg.namespace, len(self.keys))
        out = self._snapshot()
        if self._counters is not None:
            out.append(Report(instance=reg.instance, counters=self._counters, epoch=reg.epoch))
        return out

    def _reregister(self, now: float) -> list[Request]:
        self.state = RegState.UNREGISTERED
        self._next_attempt = now
        return self.on_tick(now)

    def _refused(self, reply: Error, now: float) -> None:
        first = self.state is not RegState.REFUSED
        self.state = RegState.REFUSED
        self.refused_reason = reply.reason
        if reply.status == Status.INSTANCE_TAKEN:
            # NOTE: a little after the other lease would lapse, so that it has lapsed
            self._next_attempt = now + reply.retry_after_ms / 1000 + self.heartbeat_s / 2
        elif reply.status in (Status.STALE_EPOCH, Status.PROBE_MISMATCH,
                              Status.NOT_THIS_INSTANCE):
            self._next_attempt = now + REFUSED_RETRY_INTERVALS * self.heartbeat_s
        else:
            self.state = RegState.UNREGISTERED
            self._next_attempt = now + self.heartbeat_s
        if first and self.state is RegState.REFUSED:
            logger.error("p2pkv: the directory REFUSED instance %s (%s): %s. This instance "
                         "will get no remote KV hits and share nothing until that is fixed.",
                         self.registration.instance, reply.status, reply.reason)
        elif self.state is RegState.UNREGISTERED:
            self._warn_once(f"directory refused Register ({reply.status}): {reply.reason}")

    # -- messages ---------------------------------------------------------------------------

    def _snapshot(self) -> list[Request]:
        """The whole key set: a reset Publish, then the rest in batches (none while the link
        is down: the snapshot stays due)."""
        if not self._can_send():
            self._need_snapshot = True
            return []
        self._need_snapshot = False
        now = time.monotonic()
        by_end: dict[int, list[ChunkKey]] = {}
        for k, until in list(self._leased.items()):
            if until <= now:
                del self._leased[k]  # ended: the holder republishes or unpublishes it
            else:
                by_end.setdefault(max(1, int((until - now) * 1000)), []).append(k)
        leased = set(self._leased)
        out = self._publishes([k for k in self.keys if k not in leased], [], reset=True)
        for ms, keys in sorted(by_end.items()):
            out.extend(self._publishes(keys, [], reset=False, lease_ms=ms))
        return out

    def _publishes(self, added: list[ChunkKey], removed: Sequence[ChunkKey],
                   reset: bool, lease_ms: int = 0) -> list[Request]:
        """Publishes within MAX_KEYS_PER_MESSAGE (at least one: an empty reset still resets),
        numbered on from ``seq``."""
        removed = list(removed)
        reg = self.registration
        out: list[Request] = []
        while not out or added or removed:
            batch_added = added[:MAX_KEYS_PER_MESSAGE]
            batch_removed = removed[:MAX_KEYS_PER_MESSAGE - len(batch_added)]
            added, removed = added[len(batch_added):], removed[len(batch_removed):]
            self.seq += 1
            out.append(Publish(instance=reg.instance, namespace=reg.namespace,
                               added=batch_added, removed=batch_removed, seq=self.seq,
                               reset=reset and not out, epoch=reg.epoch,
                               lease_ms=min(lease_ms, MAX_LEASE_MS)))
        return out

    def _warn_once(self, message: str) -> None:
        if message in self._warned or len(self._warned) >= _MAX_WARNED_REASONS:
            logger.debug("%s", message)
            return
        self._warned.add(message)
        logger.warning("%s", message)
