"""The data plane's server: serves one ChunkStore to authenticated peers over TCP.

Made and owned by ``PeerTransport.serve``. An accept thread and one thread per connection.
Each connection first runs the handshake (HMAC challenge-response, then this holder's
``PeerInfo``), then answers requests one at a time: ``Pull`` streams the chunks' bytes
(``transport/stream.py``), ``Pin``/``Release`` let a same-host peer copy them out of the shared
slab itself (``transport/shm.py``), ``Send`` answers the headers here and sends the bytes over
UCX to the puller's worker (``transport/ucx.py``; only when this holder has a ``UcxEngine``).
Every chunk being read stays pinned in the store (its refcount) until the read is done; pins
a connection holds are released when it ends, however it ends.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING

from p2pkv.affinity import widen_cpu_affinity
from p2pkv.errors import BadRequest, TransportError
from p2pkv.store import ChunkStore, PinnedChunk
from p2pkv.transport import wire
from p2pkv.transport.sockio import make_blocking, recv_exact, send_views

if TYPE_CHECKING:
    from p2pkv.transport.ucx import UcxEngine

logger = logging.getLogger(__name__)

SERVER_IDLE_S = 120.0  # a server closes a connection idle this long
HANDSHAKE_S = 5.0  # a peer must prove itself within this long after connecting
SEND_TIMEOUT_S = 30.0  # a server gives up on a peer that stops reading
MAX_PINS_PER_CONN = wire.MAX_KEYS_PER_REQUEST


class Server:
    def __init__(self, store: ChunkStore, bind_host: str, key: bytes | None,
                 info: wire.PeerInfo, ucx: UcxEngine | None = None) -> None:
        self._store = store
        self._ucx = ucx
        self._key = key
        self._info = wire.encode_info(info)
        self._sock = socket.create_server((bind_host, 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="p2pkv-tcp-accept",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting and cut every open connection: a closed server serves nothing."""
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sock.close()
        with self._conns_lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _accept_loop(self) -> None:
        widen_cpu_affinity()
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                logger.exception("accept failed")
                time.sleep(0.1)
                continue
            threading.Thread(target=self._serve_conn, args=(conn,), name="p2pkv-tcp-serve",
                             daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        widen_cpu_affinity()
        with self._conns_lock:
            self._conns.add(conn)
        pins: list[PinnedChunk] = []
        try:
            make_blocking(conn)
            if self._handshake(conn):
                self._serve_requests(conn, pins)
        except (TransportError, OSError):
            pass  # idle timeout or peer gone: nothing to report
        finally:
            for p in pins:
                self._store.unpin(p)
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def _handshake(self, conn: socket.socket) -> bool:
        deadline = time.monotonic() + HANDSHAKE_S
        nonce_s = secrets.token_bytes(wire.NONCE_BYTES)
        send_views(conn, [wire.pack_hello(self._key is not None, nonce_s)], HANDSHAKE_S)
        version, nonce_c, proof = wire.unpack_proof(recv_exact(conn, wire.PROOF_BYTES, deadline))
        good = secrets.compare_digest(proof, wire.mac(self._key, b"c", nonce_s, nonce_c))
        if version != wire.WIRE_VERSION or not good:
            logger.warning("refused a data-plane peer %s: %s", _peer_name(conn),
                           f"wire version {version}" if version != wire.WIRE_VERSION
                           else "wrong or missing cluster secret")
            send_views(conn, [wire.pack_verdict(wire.Status.AUTH_FAILED, bytes(32), b"")],
                       HANDSHAKE_S)
            return False
        send_views(conn, [wire.pack_verdict(
            wire.Status.OK, wire.mac(self._key, b"s", nonce_c, nonce_s), self._info)],
            HANDSHAKE_S)
        return True

    def _serve_requests(self, conn: socket.socket, pins: list[PinnedChunk]) -> None:
        while not self._stop.is_set():
            deadline = time.monotonic() + SERVER_IDLE_S
            prefix = recv_exact(conn, wire.LEN_BYTES, deadline)
            try:
                n = wire.request_length(prefix)
                req = wire.decode_request(recv_exact(conn, n, deadline))
                if isinstance(req, wire.Pull):
                    self._send_chunks(conn, req.keys)
                elif isinstance(req, wire.Pin):
                    self._pin_chunks(conn, req.keys, pins)
                elif isinstance(req, wire.Send):
                    self._send_over_ucx(conn, req)
                else:
                    self._release(req.pins, pins)
            except BadRequest as e:
                logger.warning("rejected a data-plane request from %s: %s", _peer_name(conn), e)
                send_views(conn, [wire.pack_item(wire.Status.BAD_REQUEST)], SEND_TIMEOUT_S)
                return

    def _send_chunks(self, conn: socket.socket, keys: list[bytes]) -> None:
        pinned = [self._store.pin(key) for key in keys]  # type: ignore[arg-type]
        try:
            headers = b"".join(
                wire.pack_item(wire.Status.MISSING) if p is None
                else wire.pack_item(wire.Status.OK, p.view.nbytes, p.digest) for p in pinned)
            send_views(conn, [headers, *(p.view for p in pinned if p is not None)],
                       SEND_TIMEOUT_S)
        finally:
            for p in pinned:
                if p is not None:
                    self._store.unpin(p)

    def _send_over_ucx(self, conn: socket.socket, req: wire.Send) -> None:
        if self._ucx is None:
            raise BadRequest("this holder has no UCX")
        deadline = time.monotonic() + req.timeout_ms / 1000
        pinned = [self._store.pin(key) for key in req.keys]  # type: ignore[arg-type]
        held = [p for p in pinned if p is not None]

        def release() -> None:
            for p in held:
                self._store.unpin(p)

        try:
            send_views(conn, [b"".join(
                wire.pack_item(wire.Status.MISSING) if p is None
                else wire.pack_item(wire.Status.OK, p.view.nbytes, p.digest) for p in pinned)],
                SEND_TIMEOUT_S)
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

    def _pin_chunks(self, conn: socket.socket, keys: list[bytes],
                    pins: list[PinnedChunk]) -> None:
        if not self._store.shm_path:
            raise BadRequest("this holder has no shared slab")
        if len(pins) + len(keys) > MAX_PINS_PER_CONN:
            raise BadRequest(f"more than {MAX_PINS_PER_CONN} pins on one connection")
        headers = []
        for key in keys:
            p = self._store.pin(key)  # type: ignore[arg-type]
            if p is None:
                headers.append(wire.pack_pin(wire.Status.MISSING))
                continue
            pins.append(p)
            headers.append(wire.pack_pin(wire.Status.OK, p.view.nbytes, p.digest, p.index,
                                         p.generation))
        send_views(conn, [b"".join(headers)], SEND_TIMEOUT_S)

    def _release(self, pairs: list[tuple[int, int]], pins: list[PinnedChunk]) -> None:
        for slot, generation in pairs:
            # NOTE: matched on (slot, generation): a release can never unpin a slot that was
            # reused for another chunk since (it cannot be while we pin it, but peers lie).
            for i, p in enumerate(pins):
                if p.index == slot and p.generation == generation:
                    self._store.unpin(pins.pop(i))
                    break
            else:
                raise BadRequest(f"release of slot {slot} generation {generation}, "
                                      "which this connection has not pinned")


def _peer_name(conn: socket.socket) -> str:
    try:
        return "%s:%s" % conn.getpeername()[:2]
    except OSError:
        return "?"
