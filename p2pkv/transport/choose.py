"""What a configured transport kind means on this host, and the one function that builds it.

Above the implementations: it imports ``peer.py`` (and ``ucx.py``), nothing imports it but
the callers (the connector, tests, benches, ``p2pkv doctor``, which reports the choice).
Kinds: ``tcp`` (everywhere, the fallback); ``shm`` (TCP, plus copies straight out of the slab
of holders on the same host); ``ucx`` (TCP control, bytes over UCX: GPU memory, RDMA; see
``transport/ucx.py``); ``auto`` resolves to the best available one and logs why, once.
"""

from __future__ import annotations

import ipaddress
import logging
import os

from p2pkv.errors import ConfigError
from p2pkv.keys import Namespace
from p2pkv.secret import ClusterSecret, derive
from p2pkv.store import shm_room
from p2pkv.transport.base import TransportChoice
from p2pkv.transport.conn import ChunkDigest
from p2pkv.transport.peer import PeerTransport
from p2pkv.transport.ucx import UcxEngine, ucx_unavailable_reason

logger = logging.getLogger(__name__)

TRANSPORT_KINDS = ("auto", "tcp", "shm", "ucx")


def has_rdma() -> bool:
    """An RDMA device (InfiniBand / RoCE) is visible here."""
    try:
        return bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        return False


def choose_transport(kind: str, store_bytes: int = 0, cuda_device: int | None = None
                     ) -> TransportChoice:
    """The one decision of which paths ``kind`` means here; raises ConfigError for an unknown
    kind, or ``ucx`` where ucxx does not work. ``store_bytes``: how big the store will be, so
    that ``auto`` does not put a slab into a /dev/shm too small for it. ``cuda_device``: the
    GPU whose KV cache pulls land in (None: host memory).

    ``auto`` uses UCX where it pays (KV on a GPU, or an RDMA device) and ucxx works: plain
    sockets beat UCX's tcp transport 3-4x between CPU hosts (MEASURED.md), so a CPU-only
    instance without RDMA stays on our TCP, plus shm for same-host peers.
    """
    if kind not in TRANSPORT_KINDS:
        raise ConfigError(f"transport must be one of {TRANSPORT_KINDS}, not {kind!r}")
    if kind == "tcp":
        return TransportChoice(False, "configured: tcp")
    if kind == "shm":
        return TransportChoice(True, "configured: shm for same-host peers, tcp for the others")
    rdma = has_rdma()
    wanted = kind == "ucx" or cuda_device is not None or rdma
    missing = ucx_unavailable_reason() if wanted else ""  # (importing ucxx costs ~0.5 s)
    if kind == "ucx":
        if missing:
            raise ConfigError(f"transport 'ucx': {missing} (pip install 'p2pkv[ucx]')")
        return TransportChoice(False, "configured: ucx for every pull", True, True)
    room = shm_room()
    same_host = room > store_bytes
    shm = ("shm for same-host peers" if same_host else
           f"no shm path (/dev/shm has {room >> 20} MiB free, the store needs "
           f"{store_bytes >> 20} MiB)")
    if wanted and not missing:
        what = "every pull (RDMA device present)" if rdma else "pulls into GPU memory"
        return TransportChoice(same_host, f"auto: ucx for {what}, {shm}, tcp otherwise",
                               True, rdma)
    why = missing or "not worth it without a GPU or RDMA"
    return TransportChoice(same_host, f"auto: {shm}, tcp for the others (ucx: {why})")


def is_loopback_host(host: str) -> bool:
    """A loopback address or ``localhost`` (the same rule as the directory's binds)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "0.0.0.0", "", a host name: not provably loopback


def make_transport(kind: str, *, bind_host: str, advertise_host: str | None = None,
                   connections_per_peer: int = 2, secret: ClusterSecret | None = None,
                   store_bytes: int = 0, cuda_device: int | None = None,
                   ucx_config: dict[str, str] | None = None,
                   insecure_any_address: bool = False,
                   namespace: Namespace = Namespace(""),
                   chunk_digest: ChunkDigest = "auto") -> PeerTransport:
    """The one place that maps config to a transport (the decision itself is
    :func:`choose_transport`).

    ``secret``: the cluster secret; without one the data plane is unauthenticated, and, like
    the directory, it refuses (ConfigError) to bind anything but loopback unless
    ``insecure_any_address`` (a trusted private network). ``namespace``: this instance's; a
    holder that serves another is refused (see ``PeerTransport``). ``store_bytes``,
    ``cuda_device``: see :func:`choose_transport`. ``ucx_config``: UCX options without the UCX_
    prefix (e.g. {"TLS": "tcp"}; the UCX_* environment applies otherwise). ``chunk_digest``:
    how TCP pulls check chunk bytes (``conn.ChunkDigest``: by default keyed with holders on
    other hosts).
    """
    if secret is None and not insecure_any_address and not is_loopback_host(bind_host):
        raise ConfigError(f"refusing to serve the data plane on {bind_host} without a cluster "
                          "secret: anyone who can reach it could pull this instance's KV "
                          "cache. Give a secret_file, bind to 127.0.0.1, or set "
                          "insecure_any_address on a trusted network")
    choice = choose_transport(kind, store_bytes, cuda_device)
    key = derive(secret, "data-plane") if secret is not None else None
    if key is None:
        logger.warning("p2pkv data plane: no cluster secret, peers are not authenticated "
                       "(keep it on loopback or a private network)")

    def build(choice: TransportChoice, engine: UcxEngine | None = None) -> PeerTransport:
        return PeerTransport(choice, bind_host=bind_host, advertise_host=advertise_host,
                             connections_per_peer=connections_per_peer, key=key,
                             ucx_engine=engine, namespace=namespace,
                             chunk_digest=chunk_digest)

    if choice.ucx:
        try:
            engine = UcxEngine(ucx_config)
        except Exception as e:  # noqa: BLE001 - UCX failing to start must not stop auto
            if kind == "ucx":
                raise ConfigError(f"transport 'ucx' failed to start: {e}") from e
            logger.warning("p2pkv transport auto: UCX failed to start (%s); tcp%s instead", e,
                           " and shm" if choice.same_host else "")
            choice = TransportChoice(choice.same_host, choice.reason)
        else:
            logger.info("p2pkv transport %s", choice.reason)
            return build(choice, engine)
    if kind == "auto":
        logger.info("p2pkv transport %s", choice.reason)
    return build(choice)
