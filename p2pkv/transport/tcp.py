"""TCP transport: plain sockets, zero-copy ``recv_into`` straight into destination memory.

The server side runs an accept thread and one thread per connection, reading chunks from the
store under a pin. The client side keeps a small pool of idle connections per peer and puts a
deadline on every wait. Framing lives in :mod:`p2pkv.transport.wire`.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Sequence

from p2pkv.affinity import unpin_current_thread
from p2pkv.errors import ChecksumMismatch, DeadlineExceeded, TransportError
from p2pkv.store import ChunkStore, digest
from p2pkv.transport import wire
from p2pkv.transport.base import Outcome, PullItem, PullResult, Transport

logger = logging.getLogger(__name__)

SERVER_IDLE_S = 120.0  # a server closes a connection idle this long
CLIENT_IDLE_S = 60.0  # a client reuses an idle connection only this long (< SERVER_IDLE_S)
SEND_TIMEOUT_S = 30.0  # a server gives up on a peer that stops reading


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise TransportError(f"bad data-plane address {address!r} (want host:port)")
    return host.strip("[]"), int(port)


_IOV_MAX = 1024  # buffers per recvmsg/sendmsg call (Linux's UIO_MAXIOV)
_TIMEVAL = struct.Struct("@ll")


def _set_os_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    # NOTE: we use blocking sockets with kernel timeouts (SO_RCVTIMEO / SO_SNDTIMEO) rather
    # than Python's socket timeouts: a Python timeout makes the socket non-blocking, so a big
    # receive becomes hundreds of short recv calls, each re-acquiring the GIL. In a vLLM
    # worker whose main thread is busy, that costs milliseconds per call (measured: a 47 MB
    # pull took 5 s). One MSG_WAITALL call per chunk releases the GIL once.
    seconds = max(seconds, 0.001)
    sec = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(sec, int((seconds - sec) * 1e6)))


def _recv_views(sock: socket.socket, views: Sequence[memoryview], deadline: float) -> None:
    """Fill ``views`` in order from ``sock`` (scatter receive), or raise by ``deadline``."""
    pending = [v for v in views if v.nbytes]
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline passed while receiving")
        _set_os_timeout(sock, socket.SO_RCVTIMEO, left)
        try:
            n = sock.recvmsg_into(pending[:_IOV_MAX], 0, socket.MSG_WAITALL)[0]
        except (BlockingIOError, TimeoutError):
            raise DeadlineExceeded("deadline passed while receiving") from None
        if n == 0:
            raise TransportError("peer closed the connection")
        while n and pending:
            if n >= pending[0].nbytes:
                n -= pending.pop(0).nbytes
            else:
                pending[0], n = pending[0][n:], 0


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray(n)
    _recv_views(sock, [memoryview(buf)], deadline)
    return bytes(buf)


def _send_views(sock: socket.socket, views: Sequence[memoryview | bytes], timeout_s: float
                ) -> None:
    """Send ``views`` in order (gather send); raise OSError if the peer stops reading."""
    pending = [memoryview(v).cast("B") for v in views if len(v)]
    _set_os_timeout(sock, socket.SO_SNDTIMEO, timeout_s)
    while pending:
        n = sock.sendmsg(pending[:_IOV_MAX])
        while n and pending:
            if n >= pending[0].nbytes:
                n -= pending.pop(0).nbytes
            else:
                pending[0], n = pending[0][n:], 0


class _Server:
    def __init__(self, store: ChunkStore, bind_host: str) -> None:
        self._store = store
        self._sock = socket.create_server((bind_host, 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self.rejected = 0
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
        unpin_current_thread()
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
        unpin_current_thread()
        with self._conns_lock:
            self._conns.add(conn)
        try:
            self._serve_requests(conn)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def _serve_requests(self, conn: socket.socket) -> None:
        conn.settimeout(None)  # blocking, with kernel timeouts (see _set_os_timeout)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while not self._stop.is_set():
            try:
                deadline = time.monotonic() + SERVER_IDLE_S
                n = wire.request_length(_recv_exact(conn, wire.LEN_BYTES, deadline))
                req = wire.decode_request(_recv_exact(conn, n, time.monotonic() + 5.0))
            except wire.BadRequest as e:
                self.rejected += 1
                logger.warning("rejected a pull request: %s", e)
                self._try_send(conn, wire.pack_item(wire.Status.BAD_REQUEST))
                return
            except (TransportError, OSError):
                return  # idle timeout or peer gone: nothing to report
            if not self._send_chunks(conn, req.keys):
                return

    def _send_chunks(self, conn: socket.socket, keys: list[bytes]) -> bool:
        pinned = [self._store.pin(key) for key in keys]  # type: ignore[arg-type]
        try:
            headers = b"".join(
                wire.pack_item(wire.Status.MISSING) if p is None
                else wire.pack_item(wire.Status.OK, p.view.nbytes, p.digest) for p in pinned)
            _send_views(conn, [headers, *(p.view for p in pinned if p is not None)],
                        SEND_TIMEOUT_S)
            return True
        except OSError:
            return False
        finally:
            for p in pinned:
                if p is not None:
                    self._store.unpin(p)

    @staticmethod
    def _try_send(conn: socket.socket, data: bytes) -> bool:
        try:
            _send_views(conn, [data], SEND_TIMEOUT_S)
            return True
        except OSError:
            return False


class TcpTransport(Transport):
    name = "tcp"

    def __init__(self, *, bind_host: str = "127.0.0.1", advertise_host: str | None = None,
                 connections_per_peer: int = 2) -> None:
        self._bind_host = bind_host
        self._advertise_host = advertise_host or bind_host
        self._max_idle = connections_per_peer
        self._server: _Server | None = None
        self._idle: dict[tuple[str, int], list[tuple[socket.socket, float]]] = {}
        self._lock = threading.Lock()

    def serve(self, store: ChunkStore) -> str:
        assert self._server is None, "serve() called twice"
        self._server = _Server(store, self._bind_host)
        address = f"{self._advertise_host}:{self._server.port}"
        logger.info("p2pkv tcp transport serving on %s", address)
        return address

    def pull(self, address: str, items: Sequence[PullItem], timeout_s: float) -> list[PullResult]:
        deadline = time.monotonic() + timeout_s
        try:
            peer = parse_address(address)
            sock = self._checkout(peer, deadline)
        except (OSError, TransportError) as e:
            return [PullResult(i.key, Outcome.FAILED, f"connect {address}: {e}") for i in items]
        t_connected = time.monotonic()
        try:
            _send_views(sock, [wire.encode_request([bytes(i.key) for i in items])],
                        max(deadline - time.monotonic(), 0.001))
            results = self._receive(sock, items, deadline)
        except (OSError, TransportError) as e:
            sock.close()
            return [PullResult(i.key, Outcome.FAILED, f"{address}: {e}") for i in items]
        self._checkin(peer, sock)
        logger.debug("pull of %d items from %s: connect %.1f ms, transfer %.1f ms", len(items),
                     address, (t_connected - deadline + timeout_s) * 1000,
                     (time.monotonic() - t_connected) * 1000)
        return results

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with self._lock:
            for conns in self._idle.values():
                for sock, _ in conns:
                    sock.close()
            self._idle.clear()

    @staticmethod
    def _receive(sock: socket.socket, items: Sequence[PullItem], deadline: float
                 ) -> list[PullResult]:
        table = _recv_exact(sock, wire.ITEM_HEADER_BYTES * len(items), deadline)
        headers = [wire.unpack_item(table[i * wire.ITEM_HEADER_BYTES:
                                          (i + 1) * wire.ITEM_HEADER_BYTES])
                   for i in range(len(items))]
        for item, (status, nbytes, _) in zip(items, headers):
            if status is wire.Status.OK and nbytes != item.nbytes:
                # NOTE: raising closes the connection: the stream cannot be resynchronised.
                raise TransportError(f"chunk of {nbytes} bytes, expected {item.nbytes}")
            if status not in (wire.Status.OK, wire.Status.MISSING):
                raise TransportError(f"holder answered {status.name}")
        for item, (status, _, _) in zip(items, headers):
            # NOTE: one receive per chunk, not one for the whole response: measured faster
            # (a single huge MSG_WAITALL receive ran at ~2/3 of the speed on loopback).
            if status is wire.Status.OK:
                _recv_views(sock, item.dest, deadline)
        results = []
        for item, (status, _, want) in zip(items, headers):
            if status is wire.Status.MISSING:
                results.append(PullResult(item.key, Outcome.MISSING, "holder no longer has it"))
            elif digest(list(item.dest)) != want:
                results.append(PullResult(item.key, Outcome.FAILED,
                                          str(ChecksumMismatch("checksum mismatch"))))
            else:
                results.append(PullResult(item.key, Outcome.OK))
        return results

    def _checkout(self, peer: tuple[str, int], deadline: float) -> socket.socket:
        now = time.monotonic()
        with self._lock:
            conns = self._idle.get(peer, [])
            while conns:
                sock, since = conns.pop()
                if now - since < CLIENT_IDLE_S:
                    return sock
                sock.close()
        left = deadline - now
        if left <= 0:
            raise DeadlineExceeded("deadline passed before connecting")
        sock = socket.create_connection(peer, timeout=left)
        sock.settimeout(None)  # blocking, with kernel timeouts (see _set_os_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _checkin(self, peer: tuple[str, int], sock: socket.socket) -> None:
        with self._lock:
            conns = self._idle.setdefault(peer, [])
            if len(conns) < self._max_idle:
                conns.append((sock, time.monotonic()))
                return
        sock.close()
