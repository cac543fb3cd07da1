"""The Transport interface and the one function that picks an implementation from config.

The worker side of the connector serves its ChunkStore through a transport and pulls peers'
chunks through it. Implementations: ``tcp`` (everywhere, the fallback). ``auto`` resolves to
the best available one and logs why.
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from p2pkv.errors import ConfigError
from p2pkv.keys import ChunkKey
from p2pkv.store import ChunkStore

logger = logging.getLogger(__name__)

TRANSPORT_KINDS = ("auto", "tcp")


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


def make_transport(kind: str, *, bind_host: str, advertise_host: str | None = None,
                   connections_per_peer: int = 2) -> Transport:
    """The one place that maps config to an implementation."""
    if kind not in TRANSPORT_KINDS:
        raise ConfigError(f"transport must be one of {TRANSPORT_KINDS}, not {kind!r}")
    from p2pkv.transport.tcp import TcpTransport

    if kind == "auto":
        logger.info("transport auto: using tcp (UCX and same-host paths are not built yet)")
    return TcpTransport(bind_host=bind_host, advertise_host=advertise_host,
                        connections_per_peer=connections_per_peer)
