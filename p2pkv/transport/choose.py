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
from dataclasses import dataclass
from typing import Literal

from p2pkv.errors import ConfigError
from p2pkv.keys import Namespace
from p2pkv.secret import ClusterSecret, derive
from p2pkv.store import shm_room
from p2pkv.transport.base import TransportChoice
from p2pkv.transport.conn import ChunkDigest
from p2pkv.transport.identity import Identity
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


PullPath = Literal["cuda_ipc", "ucx-device", "ucx-host", "shm", "tcp"]
"""How a pull from one holder moves its bytes, as ``p2pkv doctor`` names it: the transport's
path (``TransportChoice.path``) with UCX split by where the bytes land (and, into GPU memory
on one host from a holder serving device memory, UCX's ``cuda_ipc`` transport)."""


@dataclass(frozen=True, slots=True)
class PathExplanation:
    """Which way a pull from one holder would go, and why (for humans: ``p2pkv doctor``)."""

    path: PullPath
    why: str


def explain_path(choice: TransportChoice, *, peer_offers_ucx: bool, same_host: bool,
                 slab_mapped: bool, slab_reason: str = "", to_gpu: bool = False,
                 holder_serves_device: bool = False) -> PathExplanation:
    """The path a pull from a holder would take, decided by the transport's own rule
    (``choice.path``), and the reasons for it. ``slab_mapped``: its shared slab maps here
    (``shm.open_peer_slab``; ``slab_reason`` says why not); ``to_gpu``: the pulling instance's
    KV cache is in GPU memory; ``holder_serves_device``: the holder offers its chunks from
    device memory. Pure (tests feed it facts).

    NOTE: every holder serves from its host-memory store today (PeerInfo says nothing else),
    so same-host pulls into a GPU are UCX host-to-device copies, not ``cuda_ipc``: that needs
    the holder's bytes in device memory on both ends."""
    path = choice.path(peer_offers_ucx=peer_offers_ucx, slab_mapped=slab_mapped,
                       to_gpu=to_gpu)
    if path == "ucx":
        if not to_gpu:
            no_slab = f"; no slab ({slab_reason})" if slab_reason else ""
            return PathExplanation("ucx-host", f"it offers UCX, which host pulls use here "
                                   f"({choice.reason}){no_slab}")
        if same_host and holder_serves_device:
            return PathExplanation("cuda_ipc", "same host, its chunks in device memory and "
                                   "this KV cache on a GPU: UCX's cuda_ipc, no host hop")
        where = ("same host, but out of its host-memory store, so not cuda_ipc"
                 if same_host else "from another host")
        return PathExplanation("ucx-device", "it offers UCX and this KV cache is on a GPU: "
                               f"UCX writes into device memory ({where})")
    notes = []
    if path == "shm":
        notes.append("same host: its slab maps here")
        if to_gpu:
            notes.append("into GPU memory through a page-locked copy")
    elif not choice.same_host:
        notes.append(f"this host uses tcp ({choice.reason})")
    else:
        notes.append(slab_reason or "its slab does not map here")
    if to_gpu or choice.host_over_ucx:
        if not choice.ucx:
            notes.append(f"no UCX here ({choice.reason})")
        elif not peer_offers_ucx:
            notes.append("it offers no UCX")
    return PathExplanation(path, "; ".join(notes))


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
                   chunk_digest: ChunkDigest = "auto",
                   identity: Identity | None = None) -> PeerTransport:
    """The one place that maps config to a transport (the decision itself is
    :func:`choose_transport`).

    ``secret``: the cluster secret; without one the data plane is unauthenticated, and, like
    the directory, it refuses (ConfigError) to bind anything but loopback unless
    ``insecure_any_address`` (a trusted private network). ``namespace``: this instance's; a
    holder that serves another is refused (see ``PeerTransport``). ``store_bytes``,
    ``cuda_device``: see :func:`choose_transport`. ``ucx_config``: UCX options without the UCX_
    prefix (e.g. {"TLS": "tcp"}; the UCX_* environment applies otherwise). ``chunk_digest``:
    how pulls check chunk bytes (``conn.ChunkDigest``: by default keyed with holders on
    other hosts). ``identity``: this instance's key pair, proven to pullers
    (``transport/identity.py``; None: none).
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
                             chunk_digest=chunk_digest, identity=identity)

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
