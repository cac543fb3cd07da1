"""The puller's control connections: connect, the handshake, the header exchange, the pool.

Every path (``stream.py``, ``shm.py``, ``ucx.py``) talks to the holder over one of these
authenticated TCP connections, one request at a time, each MACed under the connection's
``session.Session``. Whether a connection's Pulls carry keyed chunk digests is decided here,
from what the handshake told: ``ChunkDigest`` (``auto``: keyed when the holder's host id is
not ours, i.e. its bytes cross a wire). The pool keeps a few idle connections
per peer and, when the holder runs on this host and same-host copies are on, the holder's slab
mapped alongside (:func:`p2pkv.transport.shm.open_peer_slab`). ``connect_peer`` is also what
``p2pkv doctor`` checks a data plane with.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from typing import Literal

from p2pkv.errors import AuthError, ConfigError, DeadlineExceeded, TransportError
from p2pkv.keys import Namespace
from p2pkv.transport import session as sess
from p2pkv.transport import wire
from p2pkv.transport.base import PullItem
from p2pkv.transport.identity import Ephemeral, HolderKey
from p2pkv.transport.session import Session
from p2pkv.transport.shm import MappedSlab, open_peer_slab
from p2pkv.transport.sockio import make_blocking, recv_exact, send_views

logger = logging.getLogger(__name__)

CLIENT_IDLE_S = 60.0  # a client reuses an idle connection only this long (< SERVER_IDLE_S)

Peer = tuple[str, int]  # (host, port) of a holder's data-plane server

ChunkDigest = Literal["auto", "keyed", "xxh3", "sealed"]
"""How a puller has its chunk bytes checked on TCP pulls: ``keyed`` (a tag under the session
key, ``session.py``: nobody on the path can change a byte unnoticed), ``xxh3`` (the holder's
stored digest: catches corruption, not an attacker; for same-host peers and trusted
networks), ``auto``
(keyed with holders on other hosts, xxh3 with same-host ones, where there is no wire).
``sealed``: every TCP pull's bytes encrypted and authenticated (AES-256-GCM, ``sealed.py``;
for networks not trusted with the contents). Without a cluster secret it is always xxh3
(there is no key)."""
CHUNK_DIGESTS: tuple[ChunkDigest, ...] = ("auto", "keyed", "xxh3", "sealed")


def connect_peer(peer: Peer, key: bytes | None, deadline: float
                 ) -> tuple[socket.socket, wire.PeerInfo]:
    """A new authenticated connection to the holder at ``peer`` and its PeerInfo, by
    ``deadline``; raises AuthError (not a member), DeadlineExceeded, OSError or
    TransportError. Used by ``p2pkv doctor`` (the pool uses :func:`connect_session`)."""
    sock, info, _ = connect_session(peer, key, deadline)
    return sock, info


def connect_session(peer: Peer, key: bytes | None, deadline: float
                    ) -> tuple[socket.socket, wire.PeerInfo, Session]:
    """:func:`connect_peer` and the connection's session (its keys and request count)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("deadline passed before connecting")
    sock = socket.create_connection(peer, timeout=left)
    try:
        make_blocking(sock)
        return (sock, *client_handshake(sock, key, deadline))
    except BaseException:
        sock.close()
        raise


def client_handshake(sock: socket.socket, key: bytes | None, deadline: float
                     ) -> tuple[wire.PeerInfo, Session]:
    """The client half of the data-plane handshake (see ``wire``) on a connected blocking
    socket; returns the holder's PeerInfo and the session. Raises AuthError when either side
    is not a member, TransportError/OSError for the rest."""
    try:
        hello = recv_exact(sock, wire.HELLO_BYTES, deadline)
    except (ConnectionResetError, TransportError) as e:
        if isinstance(e, DeadlineExceeded):
            raise
        # NOTE: a holder over its connection cap accepts and resets at once (accept.py)
        raise TransportError("holder closed the connection before its hello: it is over "
                             "its connection cap (saturated), or not a p2pkv data plane"
                             ) from None
    auth, nonce_s = wire.unpack_hello(hello)
    if key is not None and not auth:
        raise AuthError("peer has no cluster secret: refusing an unauthenticated peer")
    ephemeral = Ephemeral()
    nonce_c = ephemeral.public
    proof = wire.mac(key, b"c", nonce_s, nonce_c)
    send_views(sock, [wire.pack_proof(nonce_c, proof)], max(deadline - time.monotonic(), 0.001))
    status, proof_s, n = wire.unpack_verdict(recv_exact(sock, wire.VERDICT_BYTES, deadline))
    if status != wire.Status.OK:
        raise AuthError("peer refused us: wrong or missing cluster secret")
    info_bytes = recv_exact(sock, n, deadline)
    info = wire.decode_info(info_bytes)
    # NOTE: the proof covers the PeerInfo and, when it names an identity, the X25519 with
    # our ephemeral key: only the holder of that identity's private key can make it
    dh = ephemeral.shared(info.identity) if info.identity and key is not None else b""
    if not secrets.compare_digest(proof_s, wire.mac(key, b"s", nonce_c, nonce_s, dh,
                                                    info_bytes)):
        raise AuthError("peer failed to prove it holds the cluster secret"
                        + (" and its identity's key" if dh else ""))
    return info, Session(key, nonce_s, nonce_c, dh)


def check_holder(info: wire.PeerInfo, expected: HolderKey | None, address: str) -> None:
    """AuthError unless the holder proved the identity ``expected`` (the directory's key for
    the instance it says holds the chunks; None: not checked). The handshake already
    checked that the holder holds the private half of the key its PeerInfo names."""
    if expected and info.identity != expected:
        named = info.identity.hex()[:16] if info.identity else "none"
        raise AuthError(f"holder at {address} is not the instance the directory named: it "
                        f"proves identity {named}, not {bytes(expected).hex()[:16]}")


def request_items(sock: socket.socket, session: Session, request: wire.Pull | wire.Send,
                  items: Sequence[PullItem], deadline: float) -> list[wire.ItemHeader]:
    """Send a request that is answered with one ItemHeader per item (``Pull``, ``Send``) and
    return the headers, MAC-checked and checked against ``items``.

    NOTE: raising closes the connection: the stream cannot be resynchronised."""
    return [h for h, _ in _request_table(sock, session, request, items, deadline, False)]


def request_keyed_items(sock: socket.socket, session: Session, request: wire.Send,
                        items: Sequence[PullItem], deadline: float
                        ) -> list[tuple[wire.ItemHeader, bytes]]:
    """:func:`request_items` for a keyed ``Send``: each header with its chunk's keyed tag."""
    return _request_table(sock, session, request, items, deadline, True)


def _request_table(sock: socket.socket, session: Session, request: wire.Pull | wire.Send,
                   items: Sequence[PullItem], deadline: float, keyed: bool
                   ) -> list[tuple[wire.ItemHeader, bytes]]:
    number = session.requests
    send_views(sock, [sess.encode_request(session, request)],
               max(deadline - time.monotonic(), 0.001))
    n = wire.KEYED_ITEM_HEADER_BYTES if keyed else wire.ITEM_HEADER_BYTES
    table = sess.read_reply(sock, session, number, n, len(items), deadline)
    headers = [wire.unpack_keyed_item(table[i * n:(i + 1) * n]) if keyed
               else (wire.unpack_item(table[i * n:(i + 1) * n]), b"")
               for i in range(len(items))]
    for item, (h, _) in zip(items, headers):
        if h.status not in (wire.Status.OK, wire.Status.MISSING):
            raise TransportError(f"holder answered {h.status.name}")
        if h.status is wire.Status.OK and h.nbytes != item.nbytes:
            raise TransportError(f"chunk of {h.nbytes} bytes, expected {item.nbytes}")
    return headers


def peer_closed(sock: socket.socket) -> bool:
    """Whether an idle connection can no longer carry a request: the holder closed it (it
    exited, restarted, or dropped it as idle) or reset it, or it has bytes nobody asked for.

    NOTE: a dead holder's pooled connection would otherwise fail the next pull on it; this
    costs one non-blocking peek per checkout, so a dead or restarted holder is seen at once
    (a fresh connect is refused, or reaches the new server), never at the pull deadline."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) is not None
    except (BlockingIOError, InterruptedError):
        return False  # nothing to read: open and idle
    except OSError:
        return True


class Conn:
    """One authenticated connection to a holder, with its slab mapped if it is on this host.
    ``keyed``: its Pulls carry keyed chunk digests (see ``ChunkDigest``); ``namespace``: the
    puller's, named in every request; ``epoch``: the holder's instance epoch the current pull
    expects (set per pull by its one user, 0: not checked), named in its requests."""

    def __init__(self, sock: socket.socket, info: wire.PeerInfo, slab: MappedSlab | None,
                 session: Session, keyed: bool = False, namespace: Namespace = Namespace("")):
        self.sock, self.info, self.slab = sock, info, slab
        self.session, self.keyed, self.namespace = session, keyed, namespace
        self.epoch = 0
        self.sealed = False

    def close(self) -> None:
        self.sock.close()
        if self.slab is not None:
            self.slab.close()


class ConnPool:
    """Idle connections per peer, at most ``max_idle`` each, reused for CLIENT_IDLE_S.

    ``namespace``: refuse holders that say they serve another one ("": no check).
    ``same_host``: map the slab of holders on this host (``local_host_id``) when connecting;
    why a holder's cannot be mapped is logged once per peer. ``chunk_digest``: see
    ``ChunkDigest`` (``keyed`` needs a key)."""

    def __init__(self, *, key: bytes | None, max_idle: int, same_host: bool,
                 local_host_id: str, namespace: Namespace = Namespace(""),
                 chunk_digest: ChunkDigest = "auto") -> None:
        if chunk_digest not in CHUNK_DIGESTS:
            raise ConfigError(f"chunk_digest must be one of {CHUNK_DIGESTS}")
        if chunk_digest in ("keyed", "sealed") and key is None:
            raise ConfigError(f"chunk_digest {chunk_digest!r} needs a cluster secret")
        self._key = key
        self._chunk_digest = chunk_digest
        self._namespace = namespace
        self._max_idle = max_idle
        self._same_host = same_host
        self._host_id = local_host_id
        self._idle: dict[Peer, list[tuple[Conn, float]]] = {}
        self._logged_no_shm: set[Peer] = set()
        self._lock = threading.Lock()

    def checkout(self, peer: Peer, deadline: float) -> Conn:
        """An idle connection to ``peer``, or a new one by ``deadline`` (raises as
        :func:`connect_peer`)."""
        now = time.monotonic()
        with self._lock:
            conns = self._idle.get(peer, [])
            while conns:
                conn, since = conns.pop()
                if now - since < CLIENT_IDLE_S and not peer_closed(conn.sock):
                    return conn
                conn.close()
        sock, info, session = connect_session(peer, self._key, deadline)
        try:
            if self._namespace and info.namespace and info.namespace != self._namespace:
                # NOTE: an address the directory gave us is now another instance's, of
                # another model or layout: its bytes must never land in our blocks
                raise AuthError(f"holder at {peer[0]}:{peer[1]} serves namespace "
                                f"{info.namespace}, not ours ({self._namespace})")
            conn = Conn(sock, info, self._map_slab(peer, info), session,
                        self._keyed(session, info), self._namespace)
            conn.sealed = conn.keyed and self._chunk_digest == "sealed"
            return conn
        except BaseException:
            sock.close()
            raise

    def checkin(self, peer: Peer, conn: Conn) -> None:
        """Give back a connection whose last exchange completed (else close it instead)."""
        with self._lock:
            conns = self._idle.setdefault(peer, [])
            if len(conns) < self._max_idle:
                conns.append((conn, time.monotonic()))
                return
        conn.close()

    def idle(self) -> list[Conn]:
        """The idle connections (diagnostics: ``scripts/gpu_check.py``)."""
        with self._lock:
            return [c for conns in self._idle.values() for c, _ in conns]

    def close(self) -> None:
        with self._lock:
            conns, self._idle = self._idle, {}
        for idle in conns.values():
            for conn, _ in idle:
                conn.close()

    def _keyed(self, session: Session, info: wire.PeerInfo) -> bool:
        if not session.authenticated or self._chunk_digest == "xxh3":
            return False
        return self._chunk_digest in ("keyed", "sealed") or info.host_id != self._host_id

    def _map_slab(self, peer: Peer, info: wire.PeerInfo) -> MappedSlab | None:
        if not self._same_host:
            return None
        slab, reason = open_peer_slab(info, self._host_id)
        if slab is None and peer not in self._logged_no_shm:
            self._logged_no_shm.add(peer)
            logger.info("p2pkv: pulling from %s:%s over tcp, not shm: %s", *peer, reason)
        return slab
