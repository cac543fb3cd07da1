"""TCP path: the chunks' bytes come over the control connection itself, received with
zero-copy ``recv_into`` straight into the destination pieces.

The puller sends ``Pull(keys)`` (``conn.request_items``), the holder answers one ItemHeader per
key and then the OK chunks' bytes back to back; on a ``keyed`` connection (``conn.ChunkDigest``)
each chunk's bytes are followed by its keyed BLAKE3 tag, checked instead of the holder's
xxh3-64. Host destinations receive in place, hashed as
they land; GPU destinations receive into a page-locked staging buffer, are checked, then go up
with one copy (``land.scatter``). Used by ``PeerTransport`` for holders without a better path.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Sequence
from typing import Protocol, TypeVar

import xxhash

from p2pkv.cuda import StagingPool
from p2pkv.transport import wire
from p2pkv.transport.base import (
    Outcome,
    PullItem,
    PullResult,
    checked,
    common_selection,
    host_pieces,
    mismatch,
    missing,
    ok,
)
from p2pkv.transport.conn import Conn, request_items
from p2pkv.transport.land import scatter
from p2pkv.transport.session import TAG_BYTES
from p2pkv.transport.sockio import recv_exact, recv_views

HASH_STEP = 4 << 20  # bytes received per system call before they are hashed


class Hasher(Protocol):
    """xxh3-64 or a keyed BLAKE3: what ``recv_hashed`` feeds."""

    def update(self, data: memoryview, /) -> object: ...


H = TypeVar("H", bound=Hasher)


def pull(conn: Conn, items: Sequence[PullItem], deadline: float,
         staging: StagingPool) -> list[PullResult]:
    """Pull ``items`` over ``conn``; one result per item. Raises TransportError/OSError when
    the whole pull failed (the connection is then unusable)."""
    sock, session = conn.sock, conn.session
    number = session.requests
    headers = request_items(sock, session, wire.Pull(
        [bytes(i.key) for i in items], select=common_selection(items),
        namespace=conn.namespace, keyed=conn.keyed), items, deadline)
    results = []

    def receive(index: int, item: PullItem, dest: Sequence[memoryview],
                want: int) -> PullResult:
        if not conn.keyed:
            got = recv_hashed(sock, dest, deadline, xxhash.xxh3_64())
            return checked(item, got.intdigest(), want)
        keyed = recv_hashed(sock, dest, deadline, session.chunk_hasher(number, index))
        tag = recv_exact(sock, TAG_BYTES, deadline)
        return ok(item) if secrets.compare_digest(tag, keyed.digest(TAG_BYTES)) \
            else mismatch(item)

    for index, (item, h) in enumerate(zip(items, headers)):
        if h.status is wire.Status.MISSING:
            results.append(missing(item))
            continue
        if not host_pieces(item.dest):
            # GPU destination: into a page-locked host buffer, checked, then one copy up
            buf = staging.host(item.nbytes, page_locked=True)
            result = receive(index, item, [memoryview(buf)], h.digest)
            if result.outcome is Outcome.OK:
                scatter(buf, item.dest)
            results.append(result)
            continue
        # NOTE: one receive per chunk (per HASH_STEP of it), not one for the whole
        # response: measured faster (a single huge MSG_WAITALL receive ran at ~2/3 of the
        # speed on loopback). Each piece is hashed right after it lands, while it is still
        # in cache and while the kernel keeps receiving the next one: the digest then
        # overlaps the transfer instead of adding to it (~15 % of a 64 MiB pull).
        results.append(receive(index, item, item.dest, h.digest))  # type: ignore[arg-type]
    return results


def recv_hashed(sock: socket.socket, dest: Sequence[memoryview], deadline: float, h: H) -> H:
    """Receive into ``dest``, feeding ``h`` (xxh3-64, or a keyed BLAKE3) as bytes land."""
    for group in _groups(dest, HASH_STEP):
        recv_views(sock, group, deadline)
        for v in group:
            h.update(v)
    return h


def _groups(views: Sequence[memoryview], step: int) -> list[list[memoryview]]:
    """``views`` cut into consecutive groups of about ``step`` bytes (pieces split as needed)."""
    out: list[list[memoryview]] = [[]]
    room = step
    for v in views:
        v = v.cast("B") if v.format != "B" or v.ndim != 1 else v
        while v.nbytes:
            if room == 0:
                out.append([])
                room = step
            take = min(room, v.nbytes)
            out[-1].append(v[:take])
            v, room = v[take:], room - take
    return out
