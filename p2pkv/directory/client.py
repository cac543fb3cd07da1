"""Client of the p2pkv directory: one DEALER socket that never blocks its caller.

Used by the connector's worker side (register, publish, report: the client keeps the
registration alive by itself), its scheduler side (lookups polled once per engine step),
``FeedSubscriber`` (feed.py, for its Snapshots) and ``p2pkv status`` (:meth:`DirectoryClient.call`).
What registering means (states, snapshots, re-registration) is ``registration.py``'s pure
state machine; this module is the socket, the lookups and the calls around it.

Sends use NOBLOCK on a socket with ``IMMEDIATE`` set: while the directory is unreachable
messages are dropped instead of queueing; a lookup then ends as None at its deadline, and
lost publishes are repaired by a full snapshot once the directory answers.

Threads. NOTE: the socket (and the registration machine) are guarded by ``_lock`` and only
ever used under it (a lock is the full memory barrier ZeroMQ asks for when a socket changes
threads); nothing blocks on the network while holding it except :meth:`wait_lookup` (at most
its ``max_wait_s``, which the connector keeps at milliseconds) and slices of :meth:`call`
(≤ 50 ms each). Once :meth:`register` was called, a *keeper* thread wakes a few times per
heartbeat interval (``protocol.tick_s``), takes the lock, drains replies and sends what the
registration machine asks for. Callers (vLLM's threads) thus never wait for the keeper
beyond one non-blocking drain.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import msgspec
import zmq

from p2pkv.directory import auth, protocol
from p2pkv.directory.lookups import PENDING, LookupResult, Lookups, Pending
from p2pkv.directory.protocol import (
    HEARTBEAT_INTERVAL_S, MAX_KEYS_PER_MESSAGE, Error, Lookup, ProtocolError, Reply, Request,
    SnapshotReply, Status,
)
from p2pkv.directory.registration import RegistrationMachine, Registration, RegState
from p2pkv.errors import ConfigError
from p2pkv.keys import ChunkKey, Namespace
from p2pkv.secret import ClusterSecret

__all__ = ["PENDING", "DirectoryClient", "LookupResult", "Pending", "RegState", "Registration",
           "poll_ms", "wait_readable"]

logger = logging.getLogger(__name__)

SEND_HWM = 1000
"""Messages queued towards a connected directory before further sends are dropped."""

ZMTP_HEARTBEAT_IVL_MS = 1000
ZMTP_HEARTBEAT_TIMEOUT_MS = 3 * ZMTP_HEARTBEAT_IVL_MS
"""A connection silent this long is dropped by ZeroMQ, so sends stop queueing into it."""

RECONNECT_IVL_MAX_MS = 250
"""Reconnect attempts back off to this; bounds how soon a restarted directory is found."""

_MAX_WARNED_REASONS = 128
_CALL_SLICE_S = 0.05
WAIT_ANY_SLICE_S = 0.005
"""Longest :func:`wait_readable` holds its clients' locks (their keepers wait meanwhile)."""
_DEFAULT_TICK_S = protocol.tick_s(HEARTBEAT_INTERVAL_S)


class DirectoryClient:
    """Talks to one directory endpoint; see the module docstring for threads and blocking.

    ``context``: a ZeroMQ context to open the socket in (its owner terminates it); by default
    the client owns one.

    Keys (a CURVE directory): ``credential`` (an instance's, from its credential file: it
    may register that instance and its ranks), else with ``secret`` the members' shared key,
    which only reads; a client holding the ``secret`` derives the registering instance's own
    key in :meth:`register` (reopening its socket). Neither: no CURVE (a loopback directory).
    """

    def __init__(self, endpoint: str, *, secret: ClusterSecret | None = None,
                 credential: auth.Credential | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 thread_init: Callable[[], None] | None = None,
                 context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self._clock = clock
        self._thread_init = thread_init
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._secret = secret if credential is None else None
        self._credential = (credential if credential is not None else
                            auth.member_credential(secret) if secret is not None else None)
        self._socket = self._open()
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._lookups = Lookups()
        self._warned: set[str] = set()
        self._reg: RegistrationMachine | None = None
        self._keeper: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self.directory_epoch: int | None = None
        """``directory_epoch`` of the last reply; a change means the directory restarted."""

    def _open(self) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        # NOTE: a random routing id of our own, kept across reconnects (the server hands it
        # over): the connection that registered an instance owns it for its lease, and
        # nobody else can guess the id to act as us. It names our credential's instance,
        # whose key the server then expects (auth.routing_id).
        cred = self._credential
        sock.setsockopt(zmq.ROUTING_ID, auth.routing_id(cred.instance if cred else None))
        for option, value in ((zmq.LINGER, 0), (zmq.SNDHWM, SEND_HWM), (zmq.IMMEDIATE, 1),
                              (zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_IVL_MS),
                              (zmq.HEARTBEAT_TIMEOUT, ZMTP_HEARTBEAT_TIMEOUT_MS),
                              (zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS),
                              (zmq.MAXMSGSIZE, 4 * protocol.MAX_MESSAGE_BYTES)):
            sock.setsockopt(option, value)
        if cred is not None:
            auth.secure_client_socket(sock, cred)
        sock.connect(self.endpoint)
        return sock

    # -- registration (worker side) ---------------------------------------------------------

    def register(self, registration: Registration, wait_connected_s: float = 0.0) -> None:
        """Become ``registration`` and stay registered: the keeper thread registers,
        heartbeats, and re-registers and republishes after a directory restart. Blocks only
        up to ``wait_connected_s`` for the connection (start-up: registers sooner).

        Raises ConfigError if this client's credential may not act as the instance."""
        with self._lock:
            cred = self._credential
            if cred is not None and not (cred.instance is not None and auth.covers(
                    cred.instance, registration.instance)):
                if self._secret is None:
                    raise ConfigError(
                        f"cannot register instance {registration.instance} with "
                        + (f"the credential of instance {cred.instance}" if cred.instance
                           else "the members' shared key (read-only)")
                        + ": give it its own credential file or the cluster secret")
                # NOTE: lookups in flight on the old socket are lost (they end as None).
                self._credential = auth.instance_credential(self._secret,
                                                            registration.instance)
                self._socket.close(linger=0)
                self._socket = self._open()
            if wait_connected_s > 0:
                self._socket.poll(poll_ms(wait_connected_s), zmq.POLLOUT)
            self._reg = RegistrationMachine(registration, can_send=self._writable,
                                            peer=self.endpoint)
            self._send_all(self._reg.on_tick(self._clock()))
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

    @property
    def resyncs(self) -> int:
        """Full snapshots sent (after registering, a seq gap or a dropped publish)."""
        return self._reg.resyncs if self._reg is not None else 0

    def publish(self, added: Iterable[ChunkKey] = (), removed: Iterable[ChunkKey] = (), *,
                lease_s: float = 0.0) -> None:
        """Record the store's changes and send them (one message per MAX_KEYS_PER_MESSAGE).
        ``lease_s`` > 0: ``added`` are served from leased paged blocks for that long, not
        from the store (the directory's lookups say so: ``Holder.tier``, issue 14).

        While not registered only the record changes: the snapshot after (re-)registration
        carries everything. Never blocks.
        """
        with self._lock:
            if self._reg is None:
                raise RuntimeError("publish() before register()")
            self._drain()
            self._send_all(self._reg.publish(added, removed, lease_s=lease_s))

    def report(self, counters: Mapping[str, int]) -> None:
        """Send connector counters (shown by ``p2pkv status``); kept and resent after a
        re-registration. Never blocks."""
        with self._lock:
            if self._reg is None:
                return
            self._drain()
            self._send_all(self._reg.report(counters))

    def unregister(self) -> None:
        """Leave (on clean shutdown): the keeper stops and the directory drops our keys."""
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=2.0)
        with self._lock:
            if self._reg is not None and not self._closed:
                self._send(self._reg.leave())
                self._reg = None

    # -- lookups (scheduler side) -----------------------------------------------------------

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until a send would not be dropped."""
        with self._lock:
            return bool(self._socket.poll(poll_ms(timeout_s), zmq.POLLOUT))

    def start_lookup(self, namespace: Namespace, keys: Sequence[ChunkKey],
                     timeout_s: float) -> int:
        """Ask who holds the leading run of ``keys``; returns a rid for :meth:`poll_lookup`.

        Keys past MAX_KEYS_PER_MESSAGE are not looked up. A dropped send still returns a
        rid, whose lookup then ends as None at once.
        """
        with self._lock:
            now = self._clock()
            self._drain()
            rid = self._send(Lookup(namespace=namespace, keys=list(keys[:MAX_KEYS_PER_MESSAGE])))
            if rid < 0:
                rid = next(self._rids)
                self._lookups.dropped(rid, now)
            else:
                self._lookups.start(rid, now + timeout_s, now)
            return rid

    def poll_lookup(self, rid: int) -> LookupResult:
        """The LookupReply, PENDING, or None (failed, deadline passed, or unknown rid).

        Never blocks. A final result (reply or None) is returned once; the rid is then
        forgotten.
        """
        with self._lock:
            self._drain()
            return self._lookups.result(rid, self._clock())

    def wait_lookup(self, rid: int, max_wait_s: float) -> LookupResult:
        """Like :meth:`poll_lookup` but waits up to ``max_wait_s`` for the reply."""
        with self._lock:
            give_up = self._clock() + max_wait_s
            while True:
                self._drain()
                now = self._clock()
                result = self._lookups.result(rid, now)
                if result is not PENDING:
                    return result
                if now >= give_up:
                    return PENDING
                # Waking at the lookup's deadline lets the next round report None.
                wake = min(give_up, self._lookups.deadline(rid))
                self._socket.poll(poll_ms(wake - now), zmq.POLLIN)

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
                    rid = self._send(msg)
                for reply in self._drain():
                    if reply.rid == rid:
                        got.append(reply)
                        if not isinstance(reply, SnapshotReply) or reply.last:
                            return got
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return []
                self._socket.poll(poll_ms(min(remaining, _CALL_SLICE_S)),
                                  zmq.POLLIN if rid >= 0 else zmq.POLLOUT)

    def close(self) -> None:
        """Stop the keeper and close the socket (and the context, if the client owns it).
        Idempotent."""
        self._stop.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(timeout=2.0)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._socket.close(linger=0)
            if self._own_context:
                self._context.term()

    # -- keeper -----------------------------------------------------------------------------

    def _keep(self) -> None:
        if self._thread_init is not None:
            self._thread_init()
        while True:
            r = self._reg
            if self._stop.wait(r.tick_s if r is not None else _DEFAULT_TICK_S):
                return
            with self._lock:
                if self._closed:
                    return
                try:
                    self._drain()
                    if self._reg is not None:
                        self._send_all(self._reg.on_tick(self._clock()))
                except Exception:  # noqa: BLE001 - the keeper must outlive a bug in one tick
                    logger.exception("p2pkv directory client: keeper tick failed")

    # -- socket -----------------------------------------------------------------------------

    def _send_all(self, msgs: list[Request]) -> None:
        """Send the registration machine's requests in order, telling it what went out; stop
        at the first one dropped."""
        reg = self._reg
        assert reg is not None
        now = self._clock()
        for msg in msgs:
            rid = self._send(msg)
            if rid < 0:
                reg.on_dropped()
                return
            reg.on_sent(msgspec.structs.replace(msg, rid=rid), now)

    def _send(self, msg: Request) -> int:
        """Queue ``msg`` with a fresh rid; returns the rid, or -1 if it was dropped."""
        rid = next(self._rids)
        try:
            self._socket.send(protocol.encode(msgspec.structs.replace(msg, rid=rid)),
                              zmq.NOBLOCK)
        except zmq.Again:
            logger.debug("directory %s unreachable: dropped %s", self.endpoint,
                         type(msg).__name__)
            return -1
        return rid

    def _writable(self) -> bool:
        return bool(self._socket.poll(0, zmq.POLLOUT))

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
                self._warn_once(f"undecodable reply from the directory: {e}")
                continue
            if not isinstance(reply, Reply.__args__):  # type: ignore[attr-defined]
                logger.debug("directory %s sent a %s, not a reply", self.endpoint,
                             type(reply).__name__)
                continue
            self._note_epoch(reply.directory_epoch)
            self._dispatch(reply)
            replies.append(reply)

    def _dispatch(self, reply: Reply) -> None:
        now = self._clock()
        self._lookups.on_reply(reply)
        if self._reg is not None:
            self._send_all(self._reg.on_reply(reply, now))
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


def wait_readable(clients: Sequence[DirectoryClient], timeout_s: float) -> None:
    """Block until a reply is readable on any of ``clients``' sockets, for at most
    ``timeout_s`` and at most WAIT_ANY_SLICE_S (callers loop): a sharded lookup waits for
    several processes at once without polling them in turn.

    NOTE: each client's lock is held while its socket is polled (the socket is used only
    under it); the locks are taken in one order (by id) and only here more than one at a
    time, so this cannot deadlock with a keeper or a publisher, which hold one."""
    timeout_s = min(timeout_s, WAIT_ANY_SLICE_S)
    if timeout_s <= 0:
        return
    ordered = sorted(set(clients), key=id)
    held: list[DirectoryClient] = []
    try:
        for c in ordered:
            c._lock.acquire()  # noqa: SLF001 - same module's class
            held.append(c)
        poller = zmq.Poller()
        for c in held:
            if not c._closed:  # noqa: SLF001
                poller.register(c._socket, zmq.POLLIN)  # noqa: SLF001
        if poller.sockets:
            poller.poll(poll_ms(timeout_s))
        else:
            time.sleep(timeout_s)
    finally:
        for c in reversed(held):
            c._lock.release()  # noqa: SLF001


def poll_ms(seconds: float) -> int:
    """A zmq poll timeout in ms, at least 1 so a tiny positive wait does not mean 'forever'."""
    return max(1, int(seconds * 1000 + 0.999))
