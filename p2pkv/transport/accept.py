"""Who gets in: the data-plane server's listening socket and every handshake, in one thread.

Made and owned by ``server.Server``. One thread runs a selector over the listening socket and
the connections still in their handshake (``wire``: hello, proof, verdict), so a connection
that never proves itself costs a file descriptor and a few hundred bytes, never a thread, and
for at most ``limits.handshake_s``. Bounded everywhere:

- at most ``limits.handshaking_per_address`` connections from one peer address in their
  handshake, and ``limits.max_handshaking`` in all: a new one over a cap displaces the oldest
  handshake of its own address, or, at the total cap, of the address with the most (a flood
  of sockets that never speak displaces itself, while a real peer elsewhere, which answers
  the hello within one round trip, gets through);
- at most ``limits.max_connections`` in all, handshaking plus authenticated: over it a new
  connection is accepted and closed at once (reset, so no TIME_WAIT piles up);
- any exception in the loop is counted, logged (rate-limited) and survived; out of file
  descriptors, the listener is paused briefly instead of spinning.

An authenticated connection, in blocking mode, goes to ``hand_over`` with its
``session.Session`` (the keys from the two nonces; the server starts its serving thread, or
closes it when it cannot).
"""

from __future__ import annotations

import errno
import logging
import secrets
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pkv.affinity import widen_cpu_affinity
from p2pkv.ratelog import RateLimitedLog
from p2pkv.errors import AuthError
from p2pkv.transport import wire
from p2pkv.transport.identity import Identity
from p2pkv.transport.session import Session
from p2pkv.transport.sockio import make_blocking

logger = logging.getLogger(__name__)

_LISTEN_BACKLOG = 1024
_TICK_S = 0.2  # the loop wakes at least this often (stop flag, handshake deadlines)
_ACCEPTS_PER_WAKE = 256  # then the handshakes in flight get their turn
_PAUSE_S = 0.1  # listener paused this long when accept() runs out of fds or memory
_NO_LINGER = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """The data-plane server's bounds (the defaults hold a vLLM worker under a flood)."""

    max_handshaking: int = 256
    """Connections in their handshake at once (each: an fd, no thread)."""
    handshaking_per_address: int = 32
    """Of those, from one peer address."""
    max_connections: int = 512
    """Connections in all (handshaking + authenticated; each authenticated one: a thread)."""
    handshake_s: float = 2.0
    """A peer must prove itself this soon after connecting (one round trip on a LAN)."""
    idle_s: float = 120.0
    """An authenticated connection idle this long is closed (> conn.CLIENT_IDLE_S)."""
    request_s: float = 5.0
    """A request's body must arrive this soon after its length prefix."""
    response_s: float = 30.0
    """A whole response must be taken by the peer within this (a slow reader is cut)."""
    pins_per_conn: int = wire.MAX_KEYS_PER_REQUEST
    """Chunks one connection may keep pinned (Pin ... Release); more is a bad request."""
    pins_per_peer: int = 0
    """Chunks all connections from one peer address may keep pinned; keys beyond it are
    answered MISSING (the puller recomputes them). 0: max(64, half the store)."""
    saturated_window_s: float = 10.0
    """Health says "saturated" while a connection was refused or dropped this recently."""

    def __post_init__(self) -> None:
        if not 0 < self.max_handshaking <= self.max_connections or \
                self.handshaking_per_address <= 0:
            raise ValueError("need 0 < max_handshaking <= max_connections and "
                             "handshaking_per_address > 0")
        if min(self.handshake_s, self.idle_s, self.request_s, self.response_s) <= 0:
            raise ValueError("deadlines must be positive")
        if self.pins_per_conn <= 0 or self.pins_per_peer < 0:
            raise ValueError("pin caps must be positive (pins_per_peer 0: the default)")


@dataclass(slots=True)
class AcceptCounters:
    """What the acceptor has turned away (reported by ``Server.health``)."""

    accepted: int = 0
    refused: int = 0  # over max_connections: accepted and closed at once
    dropped: int = 0  # handshakes displaced by newer ones at max_handshaking
    expired: int = 0  # no proof within handshake_s
    failed: int = 0  # wrong secret, wrong version, not a p2pkv peer, gone mid-handshake
    loop_errors: int = 0  # unexpected exceptions survived by the loop
    last_turned_away: float = field(default=float("-inf"))  # monotonic time


@dataclass(slots=True)
class _Handshake:
    sock: socket.socket
    address: str
    nonce: bytes
    deadline: float
    got: bytearray = field(default_factory=bytearray)
    out: memoryview | None = None  # the verdict, still to be sent
    session: Session | None = None  # the verdict is OK: hand the connection over once sent


class Acceptor:
    """Listens on ``bind_host`` (port 0: ``port`` is the real one) and runs handshakes."""

    def __init__(self, bind_host: str, key: bytes | None, info: bytes, limits: ServerLimits,
                 *, hand_over: Callable[[socket.socket, Session], None],
                 authenticated: Callable[[], int], identity: Identity | None = None) -> None:
        """``identity``: this holder's instance key pair, whose public half ``info`` (an
        encoded PeerInfo) names (None: it names none)."""
        self._key = key
        self._info = info
        self._identity = identity
        self._limits = limits
        self._hand_over = hand_over
        self._authenticated = authenticated
        self._sock = socket.create_server((bind_host, 0), backlog=_LISTEN_BACKLOG)
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ, None)
        self._listening = True
        self._paused_until = 0.0
        self._pending: dict[int, _Handshake] = {}  # by fd, oldest first
        self._by_address: dict[str, dict[int, _Handshake]] = {}  # the same, per peer address
        self._log = RateLimitedLog(logger)
        self.counters = AcceptCounters()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="p2pkv-tcp-accept",
                                        daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def handshaking(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        if not self._thread.is_alive():
            self._sel.close()
            self._sock.close()

    # -- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        widen_cpu_affinity()
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception:  # noqa: BLE001 - the loop must outlive any one failure
                    self.counters.loop_errors += 1
                    self._log.warning("loop", "p2pkv data-plane accept loop: unexpected "
                                      "error (continuing)", exc_info=True)
                    self._stop.wait(0.05)
        finally:
            for hs in list(self._pending.values()):
                self._drop(hs)

    def _step(self) -> None:
        now = time.monotonic()
        if not self._listening and now >= self._paused_until:
            self._sel.register(self._sock, selectors.EVENT_READ, None)
            self._listening = True
        timeout = _TICK_S
        if self._pending:
            timeout = min(timeout, next(iter(self._pending.values())).deadline - now)
        if not self._listening:
            timeout = min(timeout, self._paused_until - now)
        for key, mask in self._sel.select(max(timeout, 0.0)):
            if key.data is None:
                self._accept_some()
            elif self._pending.get(key.fd) is key.data:  # not dropped earlier in this batch
                self._advance(key.data, mask)
        self._expire(time.monotonic())

    def _accept_some(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_listener()
                    self._log.warning("fds", "p2pkv data-plane server: accept failed (%s); "
                                      "pausing accepts for %.0f ms", e, _PAUSE_S * 1000)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that connection died in the backlog: the next one
                raise
            self.counters.accepted += 1
            self._admit(conn, str(addr[0]))

    def _pause_listener(self) -> None:
        if self._listening:
            self._sel.unregister(self._sock)
            self._listening = False
        self._paused_until = time.monotonic() + _PAUSE_S

    def _admit(self, conn: socket.socket, address: str) -> None:
        room = min(self._limits.max_handshaking,
                   self._limits.max_connections - self._authenticated())
        if room <= 0:
            self.counters.refused += 1
            self._turned_away("over its cap of %d connections: refusing new ones",
                              self._limits.max_connections)
            _reset(conn)
            return
        mine = self._by_address.get(address, {})
        while mine and len(mine) >= self._limits.handshaking_per_address:
            self.counters.dropped += 1
            self._turned_away("%d connections from %s in their handshake: dropping its "
                              "oldest", len(mine), address)
            self._drop(next(iter(mine.values())))
        while len(self._pending) >= room:
            self.counters.dropped += 1
            heaviest = max(self._by_address.values(), key=len)
            self._turned_away("%d connections in their handshake: dropping the oldest of "
                              "the address with the most", len(self._pending))
            self._drop(next(iter(heaviest.values())))
        try:
            conn.setblocking(False)
            nonce = secrets.token_bytes(wire.NONCE_BYTES)
            hello = wire.pack_hello(self._key is not None, nonce)
            if conn.send(hello) != len(hello):  # a fresh socket's buffer takes 40 bytes
                raise OSError("short send of the hello")
        except OSError:
            self.counters.failed += 1
            conn.close()
            return
        hs = _Handshake(conn, address, nonce, time.monotonic() + self._limits.handshake_s)
        self._pending[conn.fileno()] = hs
        self._by_address.setdefault(address, {})[conn.fileno()] = hs
        self._sel.register(conn, selectors.EVENT_READ, hs)

    def _turned_away(self, msg: str, *args: object) -> None:
        self.counters.last_turned_away = time.monotonic()
        self._log.warning("cap", "p2pkv data-plane server saturated: " + msg, *args)

    def _advance(self, hs: _Handshake, mask: int) -> None:
        if hs.out is None and mask & selectors.EVENT_READ:
            try:
                data = hs.sock.recv(wire.PROOF_BYTES - len(hs.got))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.counters.failed += 1
                self._drop(hs)
                return
            hs.got += data
            if len(hs.got) < wire.PROOF_BYTES:
                return
            self._judge(hs)
        self._flush(hs)

    def _judge(self, hs: _Handshake) -> None:
        version, nonce_c, proof = wire.unpack_proof(bytes(hs.got))
        good = version == wire.WIRE_VERSION and secrets.compare_digest(
            proof, wire.mac(self._key, b"c", hs.nonce, nonce_c))
        dh = b""
        if good and self._identity is not None and self._key is not None:
            # NOTE: only after the proof: a non-member never costs an X25519
            try:
                dh = self._identity.shared(nonce_c)
            except AuthError:
                good = False
        if good:
            hs.session = Session(self._key, hs.nonce, nonce_c, dh)
            verdict = wire.pack_verdict(wire.Status.OK, wire.mac(
                self._key, b"s", nonce_c, hs.nonce, dh, self._info), self._info)
        else:
            self.counters.failed += 1
            why = (f"wire version {version}" if version != wire.WIRE_VERSION
                   else "wrong or missing cluster secret")
            # NOTE: one reason per kind of refusal, never per value: a flood of random
            # versions must not make each line a reason of its own
            self._log.warning("auth-version" if version != wire.WIRE_VERSION else "auth",
                              "p2pkv: refused a data-plane peer %s: %s", _peer_name(hs.sock),
                              why)
            verdict = wire.pack_verdict(wire.Status.AUTH_FAILED, bytes(wire.MAC_BYTES), b"")
        hs.out = memoryview(verdict)

    def _flush(self, hs: _Handshake) -> None:
        if hs.out is None:
            return
        try:
            n = hs.sock.send(hs.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.counters.failed += 1
            self._drop(hs)
            return
        hs.out = hs.out[n:]
        if hs.out.nbytes:
            self._sel.modify(hs.sock, selectors.EVENT_WRITE, hs)
            return
        self._forget(hs)
        if hs.session is None:
            hs.sock.close()
            return
        make_blocking(hs.sock)
        self._hand_over(hs.sock, hs.session)

    def _expire(self, now: float) -> None:
        while self._pending:
            hs = next(iter(self._pending.values()))
            if hs.deadline > now:
                return
            self.counters.expired += 1
            self._drop(hs)

    def _forget(self, hs: _Handshake) -> None:
        fd = hs.sock.fileno()
        del self._pending[fd]
        mine = self._by_address[hs.address]
        del mine[fd]
        if not mine:
            del self._by_address[hs.address]
        self._sel.unregister(hs.sock)

    def _drop(self, hs: _Handshake) -> None:
        self._forget(hs)
        _reset(hs.sock)


def _reset(conn: socket.socket) -> None:
    """Close with a reset: nothing of a refused connection lingers in TIME_WAIT."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
    except OSError:
        pass
    conn.close()


def _peer_name(conn: socket.socket) -> str:
    try:
        return "%s:%s" % conn.getpeername()[:2]
    except OSError:
        return "?"
