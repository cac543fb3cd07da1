"""TCP path: the chunks' bytes come over the control connection itself, received with
zero-copy ``recv_into`` straight into the destination pieces.

The puller sends ``Pull(keys)`` (``conn.request_items``), the holder answers one ItemHeader per
key and then the OK chunks' bytes back to back. Host destinations receive in place, hashed as
they land; GPU destinations receive into a page-locked staging buffer, are checked, then go up
with one copy (``land.scatter``). Used by ``PeerTransport`` for holders without a better path.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import xxhash

from p2pkv.cuda import StagingPool
from p2pkv.transport import wire
from p2pkv.transport.base import Outcome, PullItem, PullResult, checked, host_pieces, missing
from p2pkv.transport.conn import request_items
from p2pkv.transport.land import scatter
from p2pkv.transport.sockio import recv_views

HASH_STEP = 4 << 20  # bytes received per system call before they are hashed


def pull(sock: socket.socket, items: Sequence[PullItem], deadline: float,
         staging: StagingPool) -> list[PullResult]:
    """Pull ``items`` over ``sock``; one result per item. Raises TransportError/OSError when
    the whole pull failed (the connection is then unusable)."""
    headers = request_items(sock, wire.Pull([bytes(i.key) for i in items]), items, deadline)
    results = []
    for item, h in zip(items, headers):
        if h.status is wire.Status.MISSING:
            results.append(missing(item))
            continue
        if not host_pieces(item.dest):
            # GPU destination: into a page-locked host buffer, checked, then one copy up
            buf = staging.host(item.nbytes, page_locked=True)
            result = checked(item, recv_hashed(sock, [memoryview(buf)], deadline), h.digest)
            if result.outcome is Outcome.OK:
                scatter(buf, item.dest)
            results.append(result)
            continue
        # NOTE: one receive per chunk (per HASH_STEP of it), not one for the whole
        # response: measured faster (a single huge MSG_WAITALL receive ran at ~2/3 of the
        # speed on loopback). Each piece is hashed right after it lands, while it is still
        # in cache and while the kernel keeps receiving the next one: the digest then
        # overlaps the transfer instead of adding to it (~15 % of a 64 MiB pull).
        got = recv_hashed(sock, item.dest, deadline)  # type: ignore[arg-type]
        results.append(checked(item, got, h.digest))
    return results


def recv_hashed(sock: socket.socket, dest: Sequence[memoryview], deadline: float) -> int:
    """Receive into ``dest``; the xxh3-64 of what arrived."""
    h = xxhash.xxh3_64()
    for group in _groups(dest, HASH_STEP):
        recv_views(sock, group, deadline)
        for v in group:
            h.update(v)
    return h.intdigest()


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
