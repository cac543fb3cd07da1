"""TCP path: the chunks' bytes come over the control connection itself, received with
zero-copy ``recv_into`` straight into the destination pieces.

The puller sends ``Pull(keys)`` (``conn.request_items``), the holder answers one ItemHeader per
key and then the OK chunks' bytes back to back; on a ``keyed`` connection (``conn.ChunkDigest``)
each chunk's bytes are followed by its keyed tag (``session.py``), checked instead of the holder's
xxh3-64; the holder's half of that reply is ``send_keyed`` (called by ``server.py``). Host
destinations receive in place, hashed as they land; GPU destinations receive into a
page-locked staging buffer, are checked, then go up with one copy (``land.scatter``). Used
by ``PeerTransport`` for holders without a better path.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import xxhash

from p2pkv.cuda import StagingPool
from p2pkv.errors import DeadlineExceeded
from p2pkv.store import PinnedChunk, digest
from p2pkv.transport import sealed, wire
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
from p2pkv.transport.leased import LeasedRead
from p2pkv.transport.selection import Selection, cut
from p2pkv.transport.session import TAG_BYTES, Session, reply
from p2pkv.transport.sockio import recv_exact, recv_views, send_views

HASH_STEP = 4 << 20  # bytes received per system call before they are hashed


class Hasher(Protocol):
    """xxh3-64 or a session's chunk hash: what ``recv_hashed`` feeds."""

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
        namespace=conn.namespace, keyed=conn.keyed and not conn.sealed, epoch=conn.epoch,
        sealed=conn.sealed), items, deadline)
    results = []

    def receive(index: int, item: PullItem, dest: Sequence[memoryview],
                want: int) -> PullResult:
        if conn.sealed:
            return ok(item) if sealed.recv_sealed(sock, session, number, index, dest,
                                                  deadline) else mismatch(item)
        if not conn.keyed:
            got = recv_hashed(sock, dest, deadline, xxhash.xxh3_64())
            return checked(item, got.intdigest(), want)
        got = recv_hashed(sock, dest, deadline, session.chunk_hasher()).digest()
        tag = recv_exact(sock, TAG_BYTES, deadline)
        return ok(item) if secrets.compare_digest(tag, session.chunk_tag(number, index, got)) \
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
    """Receive into ``dest``, feeding ``h`` (xxh3-64, or a chunk hash) as bytes land."""
    for group in _groups(dest, HASH_STEP):
        recv_views(sock, group, deadline)
        for v in group:
            h.update(v)
    return h


class ChunkHashes:
    """The holder's chunk hashes (``Session.chunk_hasher``: the same key on every
    connection) of its stored chunks, by slot and generation (one entry per slot
    at most), so that a chunk is hashed once, when it is first pulled keyed, however often
    it is pulled. Shared by the server's connection threads (each dict operation is atomic;
    two threads hashing one chunk at once both get the same hash)."""

    def __init__(self) -> None:
        self._by_slot: dict[int, tuple[int, bytes]] = {}

    def get(self, p: PinnedChunk | LeasedRead) -> bytes | None:
        if p.index < 0:  # a leased read: no slot, never cached
            return None
        got = self._by_slot.get(p.index)
        return got[1] if got is not None and got[0] == p.generation else None

    def put(self, p: PinnedChunk | LeasedRead, chunk_hash: bytes) -> None:
        if p.index < 0:
            return
        self._by_slot[p.index] = (p.generation, chunk_hash)


def kept_hash(hashes: ChunkHashes, session: Session, p: PinnedChunk | LeasedRead,
              corrupt: Callable[[PinnedChunk | LeasedRead], None]) -> bytes:
    """A whole chunk's hash for a keyed tag sent before its bytes (keyed ``Pin`` and
    ``Send`` replies, ``server.py``): the kept one, else hashed now, kept once the chunk
    still matches its stored xxh3 (one that no longer does is reported to ``corrupt`` and
    gets a hash that no tag of its bytes can match)."""
    known = hashes.get(p)
    if known is not None:
        return known
    h = session.chunk_hasher()
    for v in p.views:
        h.update(v)
    chunk_hash = h.digest()
    if digest(p.views) != p.digest:
        corrupt(p)
        return bytes(b ^ 0xFF for b in chunk_hash)
    hashes.put(p, chunk_hash)
    return chunk_hash


def send_keyed(sock: socket.socket, session: Session, number: int,
               pinned: Sequence[PinnedChunk | LeasedRead | None], select: Selection | None,
               deadline: float, hashes: ChunkHashes,
               corrupt: Callable[[PinnedChunk | LeasedRead], None]) -> None:
    """The holder's reply to keyed Pull ``number``: headers without digests, then each
    chunk's bytes (or the ``select``ed part) followed by its tag, all by ``deadline``.

    A whole chunk's hash comes from ``hashes`` when it was hashed before: then the reply
    goes with one gather send, at no hashing cost. Otherwise (and for parts, which are
    never kept) the bytes are sent HASH_STEP at a time, each step hashed right after its
    send (this side hashes step j while the puller copies it out of the socket), and a whole
    chunk is checked against its stored xxh3 digest before its hash is kept: a chunk that
    changed in this store since it was saved gets a tag that cannot verify (and is reported
    to ``corrupt``), and one that changes later no longer matches its kept hash."""
    headers = b"".join(
        wire.pack_item(wire.Status.MISSING) if p is None else wire.pack_item(
            wire.Status.OK, select.nbytes(p.nbytes) if select else p.nbytes)
        for p in pinned)
    out: list[bytes | memoryview] = reply(session, number, headers)
    for i, p in enumerate(pinned):
        if p is None:
            continue
        known = hashes.get(p) if select is None else None
        if known is not None:
            out += [*p.views, session.chunk_tag(number, i, known)]
            continue
        views = (list(p.views) if select is None else cut(p.views, select.ranges(p.nbytes)))
        h = session.chunk_hasher()
        for group in _groups(views, HASH_STEP):
            send_views(sock, [*out, *group], _left(deadline))
            out = []
            for v in group:
                h.update(v)
        chunk_hash = h.digest()
        if digest(p.views) != p.digest:
            corrupt(p)
            chunk_hash = bytes(b ^ 0xFF for b in chunk_hash)
        elif select is None:
            hashes.put(p, chunk_hash)
        out = [session.chunk_tag(number, i, chunk_hash)]
    send_views(sock, out, _left(deadline))


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("deadline passed while sending")
    return left


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
