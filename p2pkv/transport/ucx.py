"""UCX path (through ``ucxx``): the data plane's byte mover for host and CUDA memory, RDMA, cma.

``UcxEngine`` is the UCX side of one transport (the holder's server sends with it, pulls
receive with it); :func:`pull` is the puller's half. Control stays on the TCP connection of
:mod:`p2pkv.transport.conn` (handshake with the cluster secret, ``PeerInfo``, one request at a
time); only the chunk bytes move over UCX::

    puller                                   holder
      Send(keys, tag, reply_to=my worker)  →   pin the chunks
                                           ←   one ItemHeader per key (over TCP)
      tag_recv(staging, tag+i) per OK item     tag_send(slot, tag+i) to reply_to
      wait, deadline                           wait, deadline; unpin (store refcount)

Choices (measured on the 2-core CPU VM, MEASURED.md):
- Worker addresses travel over our control connection and endpoints are made from them with
  UCX's endpoint error handling OFF (the listener path forces it on and costs ~10× on one
  host). A dead peer is therefore not reported by UCX: our deadlines catch it.
- Every pull thread has its own UCX worker, so a timed-out pull cancels its own receives only
  (``cancel_inflight_requests`` is per worker). The holder closes its endpoint to a puller
  whose sends time out (that cancels them) and keeps the chunks pinned (in the store) until
  UCX lets go.
- Bytes land in a staging buffer, not in vLLM's blocks: a receive that could not be cancelled
  can then only ever write into a quarantined buffer, never into blocks handed back to vLLM.
  The staging buffer is host memory for host destinations (digest checked before the copy
  out) and device memory for CUDA destinations (one device-to-device copy per piece, at
  HBM speed; no digest: UCX's links carry their own CRC), except on a keyed connection
  (``conn.ChunkDigest``: by default, with a holder on another host): there the holder's
  reply headers carry each chunk's keyed tag (``wire.Send.keyed``, under the connection's
  session, ``session.py``), the bytes land in host memory wherever they are bound, are
  checked against it, and only then are copied into place. UCX bytes are never encrypted,
  and a keyed pull into GPU memory gives up the direct device landing for the check.
- UCX registers memory on first use and caches the registration (its rcache), so the store's
  slab and the staging buffers are registered once, not per transfer.
- ``thread`` progress with a 1 ms epoll timeout: the core API's progress thread hangs without
  a timeout; polling mode collapsed on 2 cores.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from p2pkv.cuda import StagingPool
from p2pkv.errors import DeadlineExceeded, TransportError
from p2pkv.transport import wire
from p2pkv.transport.base import PullItem, PullResult, is_device, mismatch, missing, ok
from p2pkv.transport.conn import request_items, request_keyed_items
from p2pkv.transport.session import Expected, Session
from p2pkv.transport.land import scatter

logger = logging.getLogger(__name__)

CANCEL_WAIT_S = 0.5  # after a cancel, how long to wait for UCX to let go of a buffer
EPOLL_TIMEOUT_MS = 1  # (100 measured no different on an H200 host)


def ucx_unavailable_reason() -> str:
    """'' when ucxx imports here, else why not."""
    try:
        _api()
    except Exception as e:  # noqa: BLE001 - any import failure means "no"
        return f"ucxx is not usable here ({type(e).__name__}: {e})"
    return ""


def _api() -> Any:
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    from ucxx._lib import libucxx

    return libucxx


def _array(buf: Any) -> Any:
    from ucxx._lib.arr import Array

    return Array(buf)


def _wait(requests: Sequence[Any], deadline: float) -> None:
    """Until every request completes (then raise its error, if any) or the deadline."""
    pause = 1e-5
    while not all(r.completed for r in requests):
        if time.monotonic() > deadline:
            raise DeadlineExceeded("UCX transfer did not finish before the deadline")
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)
    for r in requests:
        try:
            r.check_error()
        except Exception as e:  # noqa: BLE001 - ucxx raises its own hierarchy
            raise TransportError(f"UCX: {type(e).__name__}: {e}") from None


def _settled(requests: Sequence[Any], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if all(r.completed for r in requests):
            return True
        time.sleep(1e-3)
    return all(r.completed for r in requests)


class _Worker:
    """One UCX worker with its progress thread."""

    def __init__(self, api: Any, context: Any) -> None:
        # NOTE: no CUDA context is made current in the progress thread (ucxx's examples do
        # that): measured on an H200, with it every save from the GPU in that process took
        # 18-40 ms of the main thread instead of 1.4-1.8 ms, and UCX pulls into GPU memory had
        # a median of 2.3 GB/s instead of 20 GB/s; without it the bytes still arrive intact.
        self.worker = api.UCXWorker(context)
        self.worker.start_progress_thread(polling_mode=False, epoll_timeout=EPOLL_TIMEOUT_MS)
        self.address = bytes(self.worker.address)

    def close(self) -> None:
        try:
            self.worker.stop_progress_thread()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            logger.debug("stopping a UCX progress thread failed", exc_info=True)


class UcxEngine:
    """The UCX side of one transport: a context, the holder's sending worker with its
    endpoint cache, and one receiving worker per pull thread."""

    def __init__(self, ucx_config: dict[str, str] | None = None) -> None:
        """``ucx_config``: UCX options without the UCX_ prefix (e.g. {"TLS": "tcp"}); the
        UCX_* environment applies otherwise."""
        self._api = _api()
        self._context = self._api.UCXContext(
            config_dict=ucx_config or {},
            feature_flags=(self._api.Feature.TAG, self._api.Feature.WAKEUP))
        self._sender = _Worker(self._api, self._context)
        self._endpoints: dict[bytes, Any] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._receivers: list[_Worker] = []
        # requests UCX still owns after a failure, and what to do once it lets go of them
        self._lingering: list[tuple[list[Any], Callable[[], None]]] = []

    @property
    def address(self) -> bytes:
        """The holder's worker address (what peers put in ``PeerInfo.ucx_address``)."""
        return self._sender.address

    # -- holder side ----------------------------------------------------------------------

    def send(self, reply_to: bytes, messages: Sequence[tuple[int, memoryview]],
             deadline: float, release: Callable[[], None]) -> None:
        """Send each ``(tag, bytes)`` to the worker at ``reply_to`` and wait until UCX is done
        with them or the deadline. ``release()`` is called exactly once, when UCX no longer
        reads the bytes: before this returns, or (a send that could not be cancelled) later."""
        self._reap()
        try:
            ep = self._endpoint(reply_to)
            requests = [ep.tag_send(_array(np.frombuffer(view, np.uint8)),
                                    self._api.UCXXTag(tag)) for tag, view in messages]
        except Exception as e:  # noqa: BLE001 - a bad address from the peer, UCX errors
            release()
            raise TransportError(f"UCX send: {type(e).__name__}: {e}") from None
        released_later = False  # by _reap, once UCX lets go of sends it could not cancel
        try:
            _wait(requests, deadline)
        except TransportError:
            with self._lock:
                self._endpoints.pop(reply_to, None)
            try:
                ep.close()  # cancels what is still queued to that peer
            except Exception:  # noqa: BLE001
                logger.debug("closing a UCX endpoint failed", exc_info=True)
            if not _settled(requests, CANCEL_WAIT_S):
                with self._lock:
                    self._lingering.append((requests, release))
                released_later = True
            raise
        finally:
            if not released_later:
                release()

    def _endpoint(self, reply_to: bytes) -> Any:
        # NOTE: UCX asserts (aborts the process) on an address whose header names an unknown
        # version, measured with random bytes; other damage is a clean error (invalid
        # parameter, unreachable). So only addresses with our own header byte (same address
        # version and flags, i.e. a compatible UCX) ever reach UCX.
        if not 16 <= len(reply_to) <= wire.MAX_UCX_ADDRESS_BYTES or \
                reply_to[0] != self.address[0]:
            raise TransportError(f"not a UCX worker address this UCX can use "
                                 f"({len(reply_to)} bytes, header {reply_to[:1].hex()})")
        with self._lock:
            ep = self._endpoints.get(reply_to)
            if ep is None:
                address = self._api.UCXAddress.create_from_buffer(reply_to)
                ep = self._sender.worker.create_endpoint_from_worker_address(address, False)
                self._endpoints[reply_to] = ep
            return ep

    # -- puller side ----------------------------------------------------------------------

    def receiver(self) -> _Worker:
        """This thread's receiving worker (created on first use)."""
        w = getattr(self._local, "worker", None)
        if w is None:
            w = _Worker(self._api, self._context)
            self._local.worker = w
            with self._lock:
                self._receivers.append(w)
        return w

    def receive(self, worker: _Worker, messages: Sequence[tuple[int, Any]],
                deadline: float) -> None:
        """Receive each ``(tag, buffer)`` on ``worker``; on any failure cancel them all and
        make sure none can write afterwards (else the buffers are quarantined for good)."""
        self._reap()
        requests = [worker.worker.tag_recv(_array(buf), self._api.UCXXTag(tag))
                    for tag, buf in messages]
        try:
            _wait(requests, deadline)
        except TransportError:
            worker.worker.cancel_inflight_requests(0, 1)
            if not _settled(requests, CANCEL_WAIT_S):
                bufs = [buf for _, buf in messages]
                nbytes = sum(int(b.nbytes) for b in bufs)
                with self._lock:
                    self._lingering.append((requests, bufs.clear))
                logger.warning("p2pkv ucx: %d receives could not be cancelled; their "
                               "buffers (%d bytes) are quarantined", len(requests), nbytes)
            raise

    def _reap(self) -> None:
        with self._lock:
            done = [f for r, f in self._lingering if all(x.completed for x in r)]
            self._lingering = [(r, f) for r, f in self._lingering
                               if not all(x.completed for x in r)]
        for f in done:
            f()

    def close(self) -> None:
        with self._lock:
            endpoints, self._endpoints = list(self._endpoints.values()), {}
            receivers, self._receivers = self._receivers, []
        for ep in endpoints:
            try:
                ep.close()
            except Exception:  # noqa: BLE001
                pass
        for w in [*receivers, self._sender]:
            w.close()


def new_tag() -> int:
    """A random tag base; item ``i`` of a request uses ``base + i`` (no 64-bit overflow)."""
    return secrets.randbits(62)


def pull(engine: UcxEngine, staging: StagingPool, sock: socket.socket, session: Session,
         items: Sequence[PullItem], deadline: float, namespace: str = "", epoch: int = 0,
         keyed: bool = False) -> list[PullResult]:
    """The puller's half of one UCX pull: ``Send`` on the control connection ``sock`` (its
    ``session``), the bytes into a staging buffer over UCX, then checked and scattered into
    place.

    NOTE: what the bytes are checked against comes in the MACed reply headers: the holder's
    xxh3-64 (catches corruption, not an attacker on the fabric; not checked for bytes bound
    for GPU memory) or, with ``keyed``, each chunk's keyed tag (nobody without the session
    key can change a byte unnoticed, wherever the bytes are bound).

    Returns one result per item; raises TransportError/OSError when the whole pull failed.
    """
    worker = engine.receiver()
    tag = new_tag()
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("deadline passed before the UCX request")
    number = session.requests
    request = wire.Send([bytes(i.key) for i in items], tag, worker.address,
                        max(1, int(left * 1000)), namespace=namespace,
                        epoch=epoch, keyed=keyed)
    headers = request_keyed_items(sock, session, request, items, deadline) if keyed else [
        (h, b"") for h in request_items(sock, session, request, items, deadline)]
    device_piece = next((p for i in items for p in i.dest if is_device(p)), None)
    on_host = device_piece is None or keyed
    ok_items = [n for n, (h, _) in enumerate(headers) if h.status is wire.Status.OK]
    total = sum(items[n].nbytes for n in ok_items)
    buf = (staging.host(total) if on_host else staging.device(total, device_piece.device))
    messages, offsets, off = [], {}, 0
    for n in ok_items:
        offsets[n] = off
        messages.append((tag + n, buf[off:off + items[n].nbytes]))
        off += items[n].nbytes
    try:
        engine.receive(worker, messages, deadline)
    except TransportError:
        staging.drop_host()
        raise
    out = []
    for n, (item, (h, chunk_tag)) in enumerate(zip(items, headers)):
        if h.status is wire.Status.MISSING:
            out.append(missing(item))
            continue
        piece = buf[offsets[n]:offsets[n] + item.nbytes]
        if on_host:
            want = (Expected(0, chunk_tag, session, number, n) if keyed
                    else Expected(h.digest))
            if not want.of(memoryview(piece)):
                out.append(mismatch(item))
                continue
        scatter(piece, item.dest)
        out.append(ok(item))
    return out
