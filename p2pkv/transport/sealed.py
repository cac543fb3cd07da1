"""Encrypted chunk bytes on the TCP path (``chunk_digest: sealed``): for clusters whose network
is not trusted with the KV cache's contents, not only with its integrity.

A sealed ``Pull`` (``wire.Pull.sealed``) is answered like a keyed one (headers without
digests, MACed), but each OK chunk's bytes (or its ``select``ed part) go as AES-256-GCM
ciphertext followed by its 16-byte GCM tag, under ``HMAC-SHA256(session key, "chunk-aead")``
with the nonce ``u64 request number | u32 index in the request``: unique per key, since
both sides count requests per connection and each connection has its own session key.
The holder encrypts every pull (nothing can be kept per chunk: the key is the session's);
it checks a whole chunk against its stored xxh3 first, so a chunk that changed in its store
is sent with a tag that cannot verify. The puller receives into a bounce buffer
``HASH_STEP`` at a time and decrypts into the destination. Called by ``stream.pull`` (puller)
and ``server.py`` (holder). Request and reply headers stay in clear (MACed): which keys are
pulled and their sizes are visible on the wire, their bytes are not.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Sequence

import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from p2pkv.errors import DeadlineExceeded
from p2pkv.store import PinnedChunk
from p2pkv.transport import wire
from p2pkv.transport.selection import Selection
from p2pkv.transport.session import TAG_BYTES, Session, reply
from p2pkv.transport.sockio import recv_exact, recv_views, send_views

STEP = 4 << 20  # bytes encrypted or decrypted per send or receive
_NONCE = struct.Struct("<QI")


def _cipher(key: bytes, number: int, index: int) -> Cipher:
    return Cipher(algorithms.AES(key), modes.GCM(_NONCE.pack(number, index)))


def send_sealed(sock: socket.socket, session: Session, number: int,
                pinned: Sequence[PinnedChunk | None], select: Selection | None,
                deadline: float, corrupt: Callable[[PinnedChunk], None]) -> None:
    """The holder's reply to sealed Pull ``number``, all by ``deadline``."""
    key = session.subkey(b"chunk-aead")
    headers = b"".join(
        wire.pack_item(wire.Status.MISSING) if p is None else wire.pack_item(
            wire.Status.OK, select.nbytes(p.view.nbytes) if select else p.view.nbytes)
        for p in pinned)
    out: list[bytes | memoryview] = reply(session, number, headers)
    buf = bytearray(STEP + 15)
    for i, p in enumerate(pinned):
        if p is None:
            continue
        bad = select is None and xxhash.xxh3_64_intdigest(p.view) != p.digest
        if bad:
            corrupt(p)
        views = ([p.view] if select is None else
                 [p.view[off:off + n] for off, n in select.ranges(p.view.nbytes)])
        enc = _cipher(key, number, i).encryptor()
        for v in views:
            for at in range(0, v.nbytes, STEP):
                n = enc.update_into(v[at:at + STEP], buf)
                send_views(sock, [*out, memoryview(buf)[:n]], _left(deadline))
                out = []
        enc.finalize()
        out = [bytes(b ^ 0xFF for b in enc.tag) if bad else enc.tag]
    send_views(sock, out, _left(deadline))


def recv_sealed(sock: socket.socket, session: Session, number: int, index: int,
                dest: Sequence[memoryview], deadline: float) -> bool:
    """Receive the ``index``-th chunk of sealed Pull ``number`` into ``dest``, decrypted;
    whether its tag verified (if not, ``dest`` holds garbage)."""
    # NOTE: the tag follows the bytes: decrypt without it, check it at the end
    d = Cipher(algorithms.AES(session.subkey(b"chunk-aead")),
               modes.GCM(_NONCE.pack(number, index), min_tag_length=TAG_BYTES)).decryptor()
    ct = bytearray(STEP)
    for piece in dest:
        piece = piece.cast("B") if piece.format != "B" or piece.ndim != 1 else piece
        for at in range(0, piece.nbytes, STEP):
            n = min(STEP, piece.nbytes - at)
            recv_views(sock, [memoryview(ct)[:n]], deadline)
            piece[at:at + n] = d.update(memoryview(ct)[:n])
    tag = recv_exact(sock, TAG_BYTES, deadline)
    try:
        d.finalize_with_tag(tag)
    except InvalidTag:
        return False
    return True


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("deadline passed while sending")
    return left
