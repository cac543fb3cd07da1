"""The Transport interface and the one function that picks an implementation from config.

The worker side of the connector creates its ChunkStore through a transport (so that the slab
lives where the transport can serve it from), serves it, and pulls peers' chunks through it.
Implementations: ``tcp`` (everywhere, the fallback); ``shm`` (TCP, plus copies straight out of
the slab of holders on the same host); ``ucx`` (not built yet). ``auto`` resolves to the best
available one and logs why, once.
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from p2pkv.errors import ConfigError
from p2pkv.keys import ChunkKey
from p2pkv.secret import ClusterSecret, derive
from p2pkv.store import ChunkStore

logger = logging.getLogger(__name__)

TRANSPORT_KINDS = ("auto", "tcp", "shm", "ucx")


@dataclass(frozen=True, slots=True)
class PullItem:
    """One chunk to pull: its bytes land, in order, in the ``dest`` pieces (zero-copy)."""

    key: ChunkKey
    dest: tuple[memoryview, ...]

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.dest)


class Outcome(enum.Enum):
    OK = "ok"
    MISSING = "missing"  # the holder no longer has it (evicted): not an error of anyone's
    FAILED = "failed"  # peer gone, deadline, framing or checksum error


@dataclass(frozen=True, slots=True)
class PullResult:
    key: ChunkKey
    outcome: Outcome
    reason: str = ""


class Transport(abc.ABC):
    """Serves one store and pulls from peers. ``pull`` may be called from several threads."""

    name: str

    def create_store(self, slot_bytes: int, capacity: int) -> ChunkStore:
        """The store this transport can serve best (closed by ``close``)."""
        return ChunkStore(slot_bytes, capacity)

    @abc.abstractmethod
    def serve(self, store: ChunkStore) -> str:
        """Start serving ``store`` in the background; return the address peers pull from."""

    @abc.abstractmethod
    def pull(self, address: str, items: Sequence[PullItem], timeout_s: float) -> list[PullResult]:
        """Pull ``items`` from the peer at ``address``; never raises for peer errors and
        returns within ``timeout_s`` (plus scheduling noise). Items not OK may hold partial
        bytes in their destination: the caller must treat them as garbage."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop serving and drop connections."""


@dataclass(frozen=True, slots=True)
class TransportChoice:
    """What a configured kind resolves to on this host, and why (logged by make_transport,
    shown by ``p2pkv doctor``)."""

    same_host: bool
    """Serve from a shared slab and copy from same-host holders' slabs (the ``shm`` path)."""
    reason: str

    @property
    def name(self) -> str:
        return "shm" if self.same_host else "tcp"


def choose_transport(kind: str, store_bytes: int = 0) -> TransportChoice:
    """The one decision of which implementation ``kind`` means here; raises ConfigError for
    an unknown or unbuilt kind. ``store_bytes``: how big the store will be, so that ``auto``
    does not put a slab into a /dev/shm too small for it."""
    if kind not in TRANSPORT_KINDS:
        raise ConfigError(f"transport must be one of {TRANSPORT_KINDS}, not {kind!r}")
    if kind == "ucx":
        raise ConfigError("transport 'ucx' is not built yet; use auto, tcp or shm")
    if kind == "tcp":
        return TransportChoice(False, "configured: tcp")
    if kind == "shm":
        return TransportChoice(True, "configured: shm for same-host peers, tcp for the others")
    from p2pkv.store import shm_room

    room = shm_room()
    if room > store_bytes:
        return TransportChoice(True, "auto: shm for same-host peers, tcp for the others "
                                     "(ucx is not built yet)")
    return TransportChoice(False, f"auto: tcp only: /dev/shm has {room >> 20} MiB free, the "
                                  f"store needs {store_bytes >> 20} MiB (ucx is not built yet)")


def make_transport(kind: str, *, bind_host: str, advertise_host: str | None = None,
                   connections_per_peer: int = 2, secret: ClusterSecret | None = None,
                   store_bytes: int = 0) -> Transport:
    """The one place that maps config to an implementation (the decision itself is
    :func:`choose_transport`).

    ``secret``: the cluster secret; without one the data plane is unauthenticated (fine on
    loopback, said once in the log). ``store_bytes``: see :func:`choose_transport`.
    """
    choice = choose_transport(kind, store_bytes)
    from p2pkv.transport.tcp import TcpTransport

    key = derive(secret, "data-plane") if secret is not None else None
    if key is None:
        logger.warning("p2pkv data plane: no cluster secret, peers are not authenticated "
                       "(keep it on loopback or a private network)")
    if kind == "auto":
        logger.info("p2pkv transport %s", choice.reason)
    return TcpTransport(bind_host=bind_host, advertise_host=advertise_host,
                        connections_per_peer=connections_per_peer, key=key,
                        same_host=choice.same_host)
