"""``PeerTransport``: the one :class:`~p2pkv.transport.base.Transport`. It serves this
process's store and, per pull, picks the path the bytes take.

Composition, not inheritance: a connection pool (``conn.py``), the server (``server.py``),
and the paths, each a module of its own: ``stream.py`` (bytes over the TCP connection),
``shm.py`` (copied out of a same-host holder's slab), ``ucx.py`` (over UCX, with the
``UcxEngine`` this transport was given). Which path a pull takes is
:meth:`TransportChoice.path`, the rule ``p2pkv doctor`` reports. Made by
``choose.make_transport``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from p2pkv.cuda import StagingPool
from p2pkv.errors import AuthError, TransportError
from p2pkv.keys import Namespace
from p2pkv.store import ChunkStore
from p2pkv.transport import shm, staged, stream, ucx, wire
from p2pkv.transport.base import (
    PathName,
    PullItem,
    PullResult,
    ServerHealth,
    Transport,
    TransportChoice,
    common_selection,
    failed,
    host_pieces,
)
from p2pkv.transport.accept import ServerLimits
from p2pkv.transport.conn import ChunkDigest, Conn, ConnPool, check_holder
from p2pkv.transport.identity import HolderKey, Identity
from p2pkv.transport.leased import LeasedChunks
from p2pkv.transport.server import Server
from p2pkv.transport.sockio import parse_address

logger = logging.getLogger(__name__)

TCP_ONLY = TransportChoice(False, "tcp")


@dataclass(slots=True)
class PathCounters:
    """How many pulls went over each path (tests and the benchmark check which one ran)."""

    tcp: int = 0
    shm: int = 0
    ucx: int = 0


class PeerTransport(Transport):
    """Serves one store and pulls from peers over the path ``choice`` says, per pull."""

    def __init__(self, choice: TransportChoice = TCP_ONLY, *, bind_host: str = "127.0.0.1",
                 advertise_host: str | None = None, connections_per_peer: int = 2,
                 key: bytes | None = None, ucx_engine: ucx.UcxEngine | None = None,
                 server_limits: ServerLimits = ServerLimits(),
                 namespace: Namespace = Namespace(""),
                 chunk_digest: ChunkDigest = "auto", identity: Identity | None = None) -> None:
        """``key``: the data-plane key derived from the cluster secret (None: no auth).
        ``chunk_digest``: how TCP pulls check chunk bytes (``conn.ChunkDigest``; ``keyed``
        needs a key).
        ``ucx_engine``: required when ``choice.ucx`` (this transport closes it).
        ``namespace``: this instance's (``keys.Namespace``): served in its PeerInfo, and
        holders that serve another are refused ("": neither).
        ``identity``: this instance's key pair (``identity.py``): the server proves it to
        pullers (ignored without ``key``: without a cluster secret nothing is proven)."""
        self._namespace = namespace
        assert choice.ucx == (ucx_engine is not None), "choice.ucx needs a UcxEngine"
        self._choice = choice
        self._bind_host = bind_host
        self._advertise_host = advertise_host or bind_host
        self._key = key
        self._identity = identity if key is not None else None
        self._host_id = shm.host_id()
        self._ucx = ucx_engine
        self._pool = ConnPool(key=key, max_idle=connections_per_peer,
                              same_host=choice.same_host, local_host_id=self._host_id,
                              namespace=namespace, chunk_digest=chunk_digest)
        self._staging = StagingPool()
        self._server: Server | None = None
        self._server_limits = server_limits
        self._stores: list[ChunkStore] = []
        self.counters = PathCounters()

    @property
    def name(self) -> str:
        return self._choice.name

    @property
    def pool(self) -> ConnPool:
        return self._pool

    def create_store(self, slot_bytes: int, capacity: int) -> ChunkStore:
        store = ChunkStore(slot_bytes, capacity, shared=self._choice.same_host)
        self._stores.append(store)
        return store

    def serve(self, store: ChunkStore, epoch: int = 0, leased: LeasedChunks | None = None
              ) -> str:
        assert self._server is None, "serve() called twice"
        info = wire.PeerInfo(host_id=self._host_id, shm_path=store.shm_path,
                             shm_ident=store.shm_ident,
                             slab_bytes=store.slab_bytes, slot_bytes=store.slot_bytes,
                             namespace=self._namespace, epoch=epoch,
                             identity=self._identity.public if self._identity else b"")
        if self._ucx is not None:
            info = msgspec.structs.replace(info, ucx_address=self._ucx.address)
        self._server = Server(store, self._bind_host, self._key, info, ucx=self._ucx,
                              limits=self._server_limits, leased=leased,
                              identity=self._identity)
        address = f"{self._advertise_host}:{self._server.port}"
        logger.info("p2pkv %s transport serving on %s (%s)", self.name, address,
                    "authenticated" if self._key else "UNAUTHENTICATED: no cluster secret")
        return address

    def health(self) -> ServerHealth | None:
        return self._server.health() if self._server is not None else None

    def pull(self, address: str, items: Sequence[PullItem], timeout_s: float,
             epoch: int = 0, holder_key: HolderKey | None = None) -> list[PullResult]:
        deadline = time.monotonic() + timeout_s
        try:
            peer = parse_address(address)
            conn = self._pool.checkout(peer, deadline)
            _expect_holder(conn, address, epoch, holder_key)
        except (OSError, TransportError) as e:
            return failed(items, f"connect {address}: {e}")
        t_connected = time.monotonic()
        try:
            path, results = self._pull_on(conn, items, deadline)
        except (OSError, TransportError) as e:
            conn.close()
            return failed(items, f"{address}: {e}")
        self._pool.checkin(peer, conn)
        logger.debug("pull of %d items from %s (%s): connect %.1f ms, transfer %.1f ms",
                     len(items), address, path, (t_connected - deadline + timeout_s) * 1000,
                     (time.monotonic() - t_connected) * 1000)
        return results

    def pull_staged(self, address: str, stages: Sequence[Sequence[PullItem]], timeout_s: float,
                    on_stage: Callable[[int], None], epoch: int = 0,
                    holder_key: HolderKey | None = None) -> list[list[PullResult]]:
        """All stages on one connection: out of a mapped same-host slab with every chunk's
        digest checked once (``staged.pull_shm``), else one ``Pull`` per stage over the
        stream. A stage that cannot be pulled is still announced (its results are FAILED)."""
        deadline = time.monotonic() + timeout_s
        announced = 0

        def announce(s: int) -> None:
            nonlocal announced
            on_stage(s)
            announced = s + 1

        items = stages[0] if stages else []
        try:
            peer = parse_address(address)
            conn = self._pool.checkout(peer, deadline)
            _expect_holder(conn, address, epoch, holder_key)
        except (OSError, TransportError) as e:
            for s in range(len(stages)):
                announce(s)
            return [failed(stage, f"connect {address}: {e}") for stage in stages]
        out: list[list[PullResult]] = []
        try:
            if conn.slab is not None and all(host_pieces(i.dest) for st in stages for i in st):
                self.counters.shm += 1
                out = staged.pull_shm(conn.sock, conn.session, conn.slab, stages, deadline,
                                      announce, conn.namespace, conn.epoch, conn.keyed)
            else:
                for s, stage in enumerate(stages):
                    self.counters.tcp += 1
                    out.append(stream.pull(conn, stage, deadline, self._staging))
                    announce(s)
        except (OSError, TransportError) as e:
            conn.close()
            out = [failed(stage, f"{address}: {e}") for stage in stages]
            for s in range(announced, len(stages)):
                announce(s)
            return out
        self._pool.checkin(peer, conn)
        logger.debug("staged pull of %d items in %d stages from %s", len(items), len(stages),
                     address)
        return out

    def _pull_on(self, conn: Conn, items: Sequence[PullItem], deadline: float
                 ) -> tuple[PathName, list[PullResult]]:
        """Move the bytes over the path the choice's rule picks for this holder."""
        path = self._choice.path(peer_offers_ucx=bool(conn.info.ucx_address),
                                 slab_mapped=conn.slab is not None,
                                 to_gpu=not all(host_pieces(i.dest) for i in items))
        if path == "ucx" and common_selection(items) is not None:
            # NOTE: a part of each chunk (heterogeneous TP, host memory only) is gathered by
            # the holder's TCP server or copied out of its slab; Send has no selection.
            path = "shm" if conn.slab is not None else "tcp"
        if path == "ucx":
            assert self._ucx is not None
            self.counters.ucx += 1
            return path, ucx.pull(self._ucx, self._staging, conn.sock, conn.session, items,
                                  deadline, conn.namespace, conn.epoch, conn.keyed)
        if path == "shm":
            assert conn.slab is not None
            self.counters.shm += 1
            return path, shm.pull(conn.sock, conn.session, conn.slab, items, deadline,
                                  conn.namespace, conn.epoch, conn.keyed)
        self.counters.tcp += 1
        return path, stream.pull(conn, items, deadline, self._staging)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for store in self._stores:
            store.close()
        self._pool.close()
        if self._ucx is not None:
            self._ucx.close()


def _expect_holder(conn: Conn, address: str, epoch: int, holder_key: HolderKey | None
                   ) -> None:
    """Name ``epoch`` in ``conn``'s next requests; refuse (closing it) a holder whose
    PeerInfo says it is another epoch, or that did not prove ``holder_key`` in its
    handshake (``conn.check_holder``), before any request: the address the directory gave
    now belongs to another run of that instance or to another instance (or another member
    answers there).

    NOTE: the holder checks the epoch of every request too (WRONG_EPOCH): this check only
    saves the round trip and names both epochs."""
    conn.epoch = epoch
    try:
        check_holder(conn.info, holder_key, address)
    except AuthError:
        conn.close()
        raise
    if epoch and conn.info.epoch and conn.info.epoch != epoch:
        conn.close()
        raise AuthError(f"holder at {address} is instance epoch {conn.info.epoch}, the "
                        f"directory named epoch {epoch}: not the holder it lists")
