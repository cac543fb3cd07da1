"""The data plane's server: serves one ChunkStore to authenticated peers over TCP.

Made and owned by ``PeerTransport.serve``. The listening socket and every handshake (HMAC
challenge-response, then this holder's ``PeerInfo``) run in one selector thread
(``transport/accept.py``, with the caps on connections); each authenticated connection gets a
thread that answers its requests one at a time, each checked against the connection's
``session.Session`` (its MAC, its number on the connection, the namespace it names): ``Pull``
streams the chunks' bytes (``transport/stream.py``), ``Pin``/``Release`` let a same-host peer
copy them out of the shared slab itself (``transport/shm.py``), ``Send`` answers the headers
here and sends the bytes over UCX to the puller's worker (``transport/ucx.py``; only when this
holder has a ``UcxEngine``). Every chunk being read stays pinned in the store (its refcount)
until the read is done; pins a connection holds are released when it ends, however it ends, and
are capped per connection and per peer address (``ServerLimits``). ``health()`` says whether
the server still accepts and whether it has had to turn peers away (the worker reports it to
the directory, ``p2pkv doctor`` shows it).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import xxhash

from p2pkv.affinity import widen_cpu_affinity
from p2pkv.errors import BadRequest, TransportError
from p2pkv.ratelog import RateLimitedLog
from p2pkv.keys import ChunkKey
from p2pkv.store import ChunkStore, PinnedChunk
from p2pkv.transport import session as sess
from p2pkv.transport import sealed, stream, wire
from p2pkv.transport.accept import Acceptor, ServerLimits
from p2pkv.transport.base import ServerHealth
from p2pkv.transport.identity import Identity
from p2pkv.transport.leased import LeasedChunks, LeasedRead
from p2pkv.transport.selection import Selection, cut
from p2pkv.transport.session import Session
from p2pkv.transport.sockio import recv_exact, send_views

if TYPE_CHECKING:
    from p2pkv.transport.ucx import UcxEngine

logger = logging.getLogger(__name__)

StartThread = Callable[[Callable[[], None]], None]
"""Starts a serving thread running the given function (injected by tests to make it fail)."""


class _WrongNamespace(BadRequest):
    """A request names another namespace than this holder's."""


class _WrongEpoch(BadRequest):
    """A request names another instance epoch than this holder's."""


class _BadMac(TransportError):
    """A request failed its MAC: the connection is dropped, unanswered."""


def start_daemon_thread(target: Callable[[], None]) -> None:
    threading.Thread(target=target, name="p2pkv-tcp-serve", daemon=True).start()


class Server:
    def __init__(self, store: ChunkStore, bind_host: str, key: bytes | None,
                 info: wire.PeerInfo, ucx: UcxEngine | None = None, *,
                 limits: ServerLimits = ServerLimits(),
                 start_thread: StartThread = start_daemon_thread,
                 leased: LeasedChunks | None = None, identity: Identity | None = None
                 ) -> None:
        """``leased``: chunks served from outside the store (a lease on vLLM's paged blocks,
        ``transport/leased.py``): a Pull of a key not in the store reads them in place; a
        Pin or Send (which read store slots) copies them into the store first.
        ``identity``: the instance key pair the handshake proves (``info.identity`` must
        name its public half; None: it names none)."""
        assert (identity.public if identity else b"") == info.identity
        self._store = store
        self._leased = leased
        self._namespace = info.namespace
        self._epoch = info.epoch
        self._hashes = stream.ChunkHashes()
        self._ucx = ucx
        self._limits = limits
        self._pins_per_peer = limits.pins_per_peer or max(64, store.capacity // 2)
        self._start_thread = start_thread
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._pins_by_peer: dict[str, int] = {}
        self._lock = threading.Lock()  # guards the two above and the counters below
        self._thread_failures = 0
        self._pins_refused = 0
        self._bad_macs = 0
        self._wrong_namespace = 0
        self._wrong_epoch = 0
        self._log = RateLimitedLog(logger)
        self._acceptor = Acceptor(bind_host, key, wire.encode_info(info), limits,
                                  hand_over=self._hand_over,
                                  authenticated=lambda: len(self._conns),
                                  identity=identity)
        self.port = self._acceptor.port

    def health(self) -> ServerHealth:
        c = self._acceptor.counters
        with self._lock:
            conns, thread_failures, pins_refused = (len(self._conns), self._thread_failures,
                                                    self._pins_refused)
            bad_macs, wrong_namespace = self._bad_macs, self._wrong_namespace
            wrong_epoch = self._wrong_epoch
        recent = time.monotonic() - c.last_turned_away < self._limits.saturated_window_s
        return ServerHealth(alive=self._acceptor.alive and not self._closed, saturated=recent,
                            handshaking=self._acceptor.handshaking, connections=conns,
                            refused=c.refused + c.dropped, expired=c.expired,
                            failed_handshakes=c.failed, thread_failures=thread_failures,
                            pins_refused=pins_refused, loop_errors=c.loop_errors,
                            bad_macs=bad_macs, wrong_namespace=wrong_namespace,
                            wrong_epoch=wrong_epoch)

    def close(self) -> None:
        """Stop accepting and cut every open connection: a closed server serves nothing."""
        self._acceptor.close()
        with self._lock:
            self._closed = True
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _hand_over(self, conn: socket.socket, session: Session) -> None:
        """An authenticated connection from the acceptor: give it a serving thread."""
        with self._lock:
            if self._closed:
                conn.close()
                return
            self._conns.add(conn)
        try:
            self._start_thread(lambda: self._serve_conn(conn, session))
        except Exception as e:  # noqa: BLE001 - RuntimeError("can't start new thread"), ...
            with self._lock:
                self._conns.discard(conn)
                self._thread_failures += 1
            conn.close()
            self._log.warning("thread", "p2pkv data-plane server: cannot start a thread for "
                              "a connection (%s): closed it", e)

    def _serve_conn(self, conn: socket.socket, session: Session) -> None:
        widen_cpu_affinity()
        pins: list[PinnedChunk] = []
        peer = _peer_host(conn)
        try:
            self._serve_requests(conn, session, peer, pins)
        except _BadMac as e:
            with self._lock:
                self._bad_macs += 1
            self._log.warning("bad-mac", "p2pkv: dropped a data-plane connection from %s: %s",
                              _peer_name(conn), e)
        except (TransportError, OSError):
            pass  # idle timeout, slow reader or peer gone: nothing to report
        finally:
            for p in pins:
                self._store.unpin(p)
            with self._lock:
                self._conns.discard(conn)
                self._unclaim(peer, len(pins))
            conn.close()

    def _serve_requests(self, conn: socket.socket, session: Session, peer: str,
                        pins: list[PinnedChunk]) -> None:
        limits = self._limits
        while not self._closed:
            prefix = recv_exact(conn, wire.LEN_BYTES, time.monotonic() + limits.idle_s)
            number = session.next_number()
            try:
                n = wire.request_length(prefix)
                data = recv_exact(conn, n, time.monotonic() + limits.request_s)
                tag, body = data[:wire.TAG_BYTES], data[wire.TAG_BYTES:]
                if not session.verify(sess.REQUEST, number, tag, body):
                    # NOTE: no answer: the stream is not to be trusted any more, and a
                    # forger learns nothing from a reply
                    raise _BadMac(f"request {number} failed its MAC (tampered, replayed, "
                                  "or from another session)")
                req = wire.decode_request(body)
                if not isinstance(req, wire.Release) and req.namespace and \
                        self._namespace and req.namespace != self._namespace:
                    raise _WrongNamespace(f"request for namespace {req.namespace!r}, this "
                                          f"holder serves {self._namespace!r}")
                if not isinstance(req, wire.Release) and req.epoch and self._epoch and \
                        req.epoch != self._epoch:
                    raise _WrongEpoch(f"request for instance epoch {req.epoch}, this holder "
                                      f"is epoch {self._epoch}")
                if isinstance(req, wire.Pull):
                    self._send_chunks(conn, session, number, req)
                elif isinstance(req, wire.Pin):
                    self._pin_chunks(conn, session, number, peer, req, pins)
                elif isinstance(req, wire.Send):
                    self._send_over_ucx(conn, session, number, req)
                else:
                    self._release(peer, req.pins, pins)
            except BadRequest as e:
                status = wire.Status.BAD_REQUEST
                if isinstance(e, _WrongNamespace):
                    status = wire.Status.WRONG_NAMESPACE
                    with self._lock:
                        self._wrong_namespace += 1
                elif isinstance(e, _WrongEpoch):
                    status = wire.Status.WRONG_EPOCH
                    with self._lock:
                        self._wrong_epoch += 1
                self._log.warning(status.name, "p2pkv: rejected a data-plane request from "
                                  "%s: %s", _peer_name(conn), e)
                send_views(conn, sess.reply(session, number, wire.pack_item(status)),
                           limits.response_s)
                return

    def _send_chunks(self, conn: socket.socket, session: Session, number: int,
                     req: wire.Pull) -> None:
        select = req.select
        if select is not None and (why := select.check(self._store.slot_bytes)):
            raise BadRequest(f"selection does not fit this holder's chunks: {why}")
        if (req.keyed or req.sealed) and not session.authenticated:
            raise BadRequest("a keyed digest on a connection without a cluster secret")
        pinned = [self._read(key) for key in req.keys]  # type: ignore[arg-type]
        try:
            if req.sealed:
                sealed.send_sealed(conn, session, number, pinned, select,
                                   time.monotonic() + self._limits.response_s, self._corrupt)
                return
            if req.keyed:
                self._send_keyed(conn, session, number, pinned, select)
                return
            if select is None:
                headers = b"".join(
                    wire.pack_item(wire.Status.MISSING) if p is None
                    else wire.pack_item(wire.Status.OK, p.nbytes, p.digest)
                    for p in pinned)
                bodies = [v for p in pinned if p is not None for v in p.views]
            else:
                headers, bodies = self._selected(pinned, select)
            send_views(conn, [*sess.reply(session, number, headers), *bodies],
                       self._limits.response_s)
        finally:
            for p in pinned:
                if isinstance(p, LeasedRead):
                    assert self._leased is not None
                    self._leased.unpin(p)
                elif p is not None:
                    self._store.unpin(p)

    def _read(self, key: ChunkKey) -> PinnedChunk | LeasedRead | None:
        """A Pull's read of ``key``: from the store, else from a leased chunk in place."""
        p = self._store.pin(key)
        if p is None and self._leased is not None:
            return self._leased.pin(key)
        return p

    def _pin_stored(self, key: ChunkKey) -> PinnedChunk | None:
        """Pin ``key`` in the store; a leased chunk is copied in first (Pin and Send read
        store slots: the same-host slab, UCX's registered memory)."""
        p = self._store.pin(key)
        if p is None and self._leased is not None and self._leased.to_store(key):
            p = self._store.pin(key)
        return p

    def _send_keyed(self, conn: socket.socket, session: Session, number: int,
                    pinned: list[PinnedChunk | LeasedRead | None], select: Selection | None
                    ) -> None:
        stream.send_keyed(conn, session, number, pinned, select,
                          time.monotonic() + self._limits.response_s, self._hashes,
                          self._corrupt)

    def _corrupt(self, p: PinnedChunk | LeasedRead) -> None:
        self._log.warning("corrupt", "p2pkv data-plane server: chunk in slot %d no longer "
                          "matches its digest: sent as a mismatch", p.index)

    @staticmethod
    def _selected(pinned: list[PinnedChunk | LeasedRead | None], select: Selection
                  ) -> tuple[bytes, list[memoryview]]:
        """Headers and bodies of a Pull with a selection: the selected byte ranges of each
        chunk, straight from the slots, under a digest of exactly those bytes.

        NOTE: the stored digest covers the whole chunk, so a part gets its own, computed here
        while the slots are pinned (xxh3 runs at ~11 GB/s on the CI machine: a fraction of the
        send). The puller checks it like any other digest."""
        headers, bodies = [], []
        for p in pinned:
            if p is None:
                headers.append(wire.pack_item(wire.Status.MISSING))
                continue
            views = cut(p.views, select.ranges(p.nbytes))
            h = xxhash.xxh3_64()
            for v in views:
                h.update(v)
            headers.append(wire.pack_item(wire.Status.OK, select.nbytes(p.nbytes),
                                          h.intdigest()))
            bodies.extend(views)
        return b"".join(headers), bodies

    def _send_over_ucx(self, conn: socket.socket, session: Session, number: int,
                       req: wire.Send) -> None:
        if self._ucx is None:
            raise BadRequest("this holder has no UCX")
        if req.keyed and not session.authenticated:
            raise BadRequest("a keyed digest on a connection without a cluster secret")
        deadline = time.monotonic() + req.timeout_ms / 1000
        pinned = [self._pin_stored(key) for key in req.keys]  # type: ignore[arg-type]
        held = [p for p in pinned if p is not None]

        def release() -> None:
            for p in held:
                self._store.unpin(p)

        try:
            send_views(conn, sess.reply(session, number, b"".join(
                self._item_header(session, number, i, p, req.keyed)
                for i, p in enumerate(pinned))), self._limits.response_s)
        except BaseException:
            release()
            raise
        try:
            # NOTE: the engine calls release() once UCX no longer reads the slots, which
            # after a timed-out send can be later than this call returns.
            self._ucx.send(req.reply_to, [(req.tag + i, p.view) for i, p in enumerate(pinned)
                                          if p is not None], deadline, release)
        except TransportError as e:
            logger.info("UCX send to a puller failed: %s", e)

    def _item_header(self, session: Session, number: int, index: int,
                     p: PinnedChunk | None, keyed: bool) -> bytes:
        """A Send reply's header of chunk ``index`` (keyed: with its keyed tag)."""
        if not keyed:
            return (wire.pack_item(wire.Status.MISSING) if p is None
                    else wire.pack_item(wire.Status.OK, p.view.nbytes, p.digest))
        if p is None:
            return wire.pack_keyed_item(wire.Status.MISSING)
        return wire.pack_keyed_item(wire.Status.OK, p.view.nbytes, self._tag(session, number,
                                                                             index, p))

    def _tag(self, session: Session, number: int, index: int, p: PinnedChunk) -> bytes:
        return session.chunk_tag(number, index,
                                 stream.kept_hash(self._hashes, session, p, self._corrupt))

    def _pin_chunks(self, conn: socket.socket, session: Session, number: int, peer: str,
                    req: wire.Pin, pins: list[PinnedChunk]) -> None:
        if not self._store.shm_path:
            raise BadRequest("this holder has no shared slab")
        if req.keyed and not session.authenticated:
            raise BadRequest("a keyed digest on a connection without a cluster secret")
        keys = req.keys
        if len(pins) + len(keys) > self._limits.pins_per_conn:
            raise BadRequest(f"more than {self._limits.pins_per_conn} pins on one connection")
        allowed = self._claim(peer, len(keys))
        headers, held = [], 0
        for i, key in enumerate(keys):
            p = self._pin_stored(key) if i < allowed else None  # type: ignore[arg-type]
            if p is None:
                headers.append(wire.pack_keyed_pin(wire.Status.MISSING) if req.keyed
                               else wire.pack_pin(wire.Status.MISSING))
                continue
            pins.append(p)
            held += 1
            headers.append(wire.pack_keyed_pin(wire.Status.OK, p.view.nbytes, p.index,
                                               p.generation, self._tag(session, number, i, p))
                           if req.keyed else
                           wire.pack_pin(wire.Status.OK, p.view.nbytes, p.digest, p.index,
                                         p.generation))
        with self._lock:
            self._unclaim(peer, allowed - held)  # claimed for keys the store did not have
        send_views(conn, sess.reply(session, number, b"".join(headers)),
                   self._limits.response_s)

    def _claim(self, peer: str, n: int) -> int:
        """Reserve up to ``n`` pins of ``peer``'s allowance; how many it got."""
        with self._lock:
            have = self._pins_by_peer.get(peer, 0)
            got = max(0, min(n, self._pins_per_peer - have))
            self._pins_by_peer[peer] = have + got
            if got < n:
                self._pins_refused += n - got
        if got < n:
            self._log.warning("pins", "p2pkv data-plane server: peer %s at its cap of %d "
                              "pinned chunks: answering %d keys missing", peer,
                              self._pins_per_peer, n - got)
        return got

    def _unclaim(self, peer: str, n: int) -> None:
        """Give back ``n`` of ``peer``'s pins (the caller holds the lock)."""
        if n:
            left = self._pins_by_peer.get(peer, 0) - n
            assert left >= 0, "more pins given back than claimed"
            if left:
                self._pins_by_peer[peer] = left
            else:
                self._pins_by_peer.pop(peer, None)

    def _release(self, peer: str, pairs: list[tuple[int, int]],
                 pins: list[PinnedChunk]) -> None:
        for slot, generation in pairs:
            # NOTE: matched on (slot, generation): a release can never unpin a slot that was
            # reused for another chunk since (it cannot be while we pin it, but peers lie).
            for i, p in enumerate(pins):
                if p.index == slot and p.generation == generation:
                    self._store.unpin(pins.pop(i))
                    with self._lock:
                        self._unclaim(peer, 1)
                    break
            else:
                raise BadRequest(f"release of slot {slot} generation {generation}, "
                                      "which this connection has not pinned")


def _peer_host(conn: socket.socket) -> str:
    try:
        return str(conn.getpeername()[0])
    except OSError:
        return "?"


def _peer_name(conn: socket.socket) -> str:
    try:
        return "%s:%s" % conn.getpeername()[:2]
    except OSError:
        return "?"
