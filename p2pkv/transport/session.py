"""One data-plane connection's keys once its handshake is done: the MACs on every request and
reply header, the keyed digest of chunk bytes, and the request count both sides keep.

Made by the handshake on both sides (``conn.client_handshake`` for the puller,
``accept.Acceptor`` for the holder) from the data-plane key and the two nonces, and used by
every request exchange after it (``conn``, ``stream``, ``shm``, ``ucx``, ``server``). The
framing these keys protect is in ``wire``.

    session key   : HMAC-SHA256(key, "session" | nonce_s | nonce_c | dh)
                    (dh: the holder identity's X25519 with the puller's nonce, or empty
                    when the holder has none; ``identity.py``)
    header MAC    : HMAC-SHA256(session key, direction | u64 request number | bytes)[:16]
    chunk hash    : Poly1305 of the chunk's bytes under HMAC-SHA256(key, "chunk-poly1305")
                    (the data-plane key's, the same on every connection; never sent)
    chunk tag     : BLAKE3 keyed with HMAC-SHA256(session key, "chunk-digest") over
                    u64 request number | u32 index in the request | the chunk hash
                    (16 B); the holder computes a chunk's hash once and keeps it
                    (``stream.ChunkHashes``), the puller hashes the bytes as they land

NOTE: why Poly1305 under one key for every chunk, when Poly1305 is a one-time MAC: here it is
the secret almost-universal hash of a hash-then-PRF MAC, not a MAC itself. Its value never
leaves either side (only the session's keyed BLAKE3 of it, bound to the request number and
index, is sent), so nobody without the key learns anything about it; changing a chunk's
bytes unnoticed then means finding other bytes with the same Poly1305 under an unknown key,
with probability about 8 x (length / 16 B) / 2^106 per try (< 2^-80 for a 64 MiB chunk).
What the one-time rule protects against, recovering the key from two revealed tags, cannot
happen. A fixed key lets the holder keep a chunk's hash across pulls and connections, and
Poly1305 (OpenSSL, via ``cryptography``) hashes ~2x faster than BLAKE3 on the AVX2 machines
measured (``scripts/digest_cost.py``), which decides whether the keyed path keeps up with
the socket.

Both sides count requests from 0 on each connection (the holder every request it reads, the
puller every request it sends), so a request or reply replayed on the same connection has the
wrong number and one from another connection the wrong key: either fails its MAC. Without a
cluster secret there is no session key: MACs are zeros and are not checked (the handshake
already said that neither side has a secret), and keyed digests cannot be asked for.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct

import blake3
import xxhash
from cryptography.hazmat.primitives.poly1305 import Poly1305

from p2pkv.errors import AuthError, TransportError
from p2pkv.transport import wire
from p2pkv.transport.sockio import recv_exact

TAG_BYTES = wire.TAG_BYTES
REQUEST = b"q"  # a direction: puller -> holder
REPLY = b"r"  # holder -> puller
_NUMBER = struct.Struct("<Q")
_CHUNK = struct.Struct("<QI")
_ZERO_TAG = bytes(TAG_BYTES)


class Session:
    """The keys of one authenticated connection and its request count (one per side)."""

    __slots__ = ("_mac_key", "_digest_key", "_hash_key", "requests")

    def __init__(self, key: bytes | None, nonce_s: bytes, nonce_c: bytes,
                 dh: bytes = b"") -> None:
        if key is None:
            self._mac_key: bytes | None = None
            self._digest_key: bytes | None = None
            self._hash_key: bytes | None = None
        else:
            session = hmac.new(key, b"session" + nonce_s + nonce_c + dh,
                               hashlib.sha256).digest()
            self._mac_key = session
            self._digest_key = hmac.new(session, b"chunk-digest", hashlib.sha256).digest()
            self._hash_key = hmac.new(key, b"chunk-poly1305", hashlib.sha256).digest()
        self.requests = 0
        """Requests sent (puller) or read (holder) on this connection so far."""

    @property
    def authenticated(self) -> bool:
        return self._mac_key is not None

    def next_number(self) -> int:
        """The number of the next request (and of its reply): counts it."""
        n = self.requests
        self.requests += 1
        return n

    def tag(self, direction: bytes, number: int, *parts: bytes | memoryview) -> bytes:
        """The 16-byte MAC of ``parts`` as the ``number``-th exchange in ``direction``."""
        if self._mac_key is None:
            return _ZERO_TAG
        h = hmac.new(self._mac_key, direction + _NUMBER.pack(number), hashlib.sha256)
        for p in parts:
            h.update(p)
        return h.digest()[:TAG_BYTES]

    def verify(self, direction: bytes, number: int, tag: bytes,
               *parts: bytes | memoryview) -> bool:
        """Whether ``tag`` is the MAC of ``parts`` (always true without a secret)."""
        if self._mac_key is None:
            return True
        return secrets.compare_digest(tag, self.tag(direction, number, *parts))

    def subkey(self, label: bytes) -> bytes:
        """A key of this session's for ``label`` (``sealed.py``: chunk encryption). Raises
        TransportError without a secret."""
        if self._mac_key is None:
            raise TransportError("a keyed chunk digest needs a cluster secret")
        return hmac.new(self._mac_key, label, hashlib.sha256).digest()

    def chunk_hasher(self) -> ChunkHasher:
        """A new hash of one chunk's bytes (fed as they are sent or land), for
        :meth:`chunk_tag`. Raises TransportError without a key."""
        if self._hash_key is None:
            raise TransportError("a keyed chunk digest needs a cluster secret")
        return ChunkHasher(self._hash_key)

    def chunk_tag(self, number: int, index: int, chunk_hash: bytes) -> bytes:
        """The tag of the ``index``-th chunk of request ``number``, whose bytes have the
        hash ``chunk_hash`` (:meth:`chunk_hasher`). Raises TransportError without a key."""
        if self._digest_key is None:
            raise TransportError("a keyed chunk digest needs a cluster secret")
        return blake3.blake3(_CHUNK.pack(number, index) + chunk_hash,
                             key=self._digest_key).digest(TAG_BYTES)


class ChunkHasher:
    """Poly1305 of a chunk's bytes under the data-plane key's chunk-hash key (see the module
    docstring); ``update`` as bytes arrive, ``digest`` once (16 B)."""

    __slots__ = ("_poly",)

    def __init__(self, key: bytes) -> None:
        self._poly = Poly1305(key)

    def update(self, data: memoryview, /) -> None:
        self._poly.update(data)

    def digest(self) -> bytes:
        return self._poly.finalize()


class Expected:
    """What one chunk's bytes must hash to, as its holder said in a MACed reply: its xxh3-64
    (``tag`` b"") or, on a keyed request, its keyed tag as the ``index``-th chunk of request
    ``number`` on ``session``. Used where the bytes come by another way than the stream
    (``shm.py``: out of the slab; ``ucx.py``: over UCX); :meth:`hasher` is fed the bytes,
    :meth:`matches` says whether they are the holder's."""

    __slots__ = ("_digest", "_tag", "_session", "_number", "_index")

    def __init__(self, digest: int, tag: bytes = b"", session: Session | None = None,
                 number: int = 0, index: int = 0) -> None:
        assert not tag or session is not None, "a keyed tag is checked under its session"
        self._digest, self._tag = digest, tag
        self._session, self._number, self._index = session, number, index

    @property
    def keyed(self) -> bool:
        return bool(self._tag)

    def hasher(self) -> xxhash.xxh3_64 | ChunkHasher:
        if not self._tag:
            return xxhash.xxh3_64()
        assert self._session is not None
        return self._session.chunk_hasher()

    def matches(self, h: xxhash.xxh3_64 | ChunkHasher) -> bool:
        if isinstance(h, ChunkHasher):
            assert self._session is not None
            return secrets.compare_digest(
                self._tag, self._session.chunk_tag(self._number, self._index, h.digest()))
        return h.intdigest() == self._digest

    def of(self, data: memoryview) -> bool:
        """Whether ``data`` (a whole chunk) is the holder's."""
        h = self.hasher()
        h.update(data)
        return self.matches(h)


def encode_request(session: Session, req: wire.Request) -> bytes:
    """A request framed and MACed as the next one on ``session`` (counts it)."""
    body = wire.encode_body(req)
    return wire.frame_request(session.tag(REQUEST, session.next_number(), body), body)


def reply(session: Session, number: int, headers: bytes) -> list[bytes]:
    """A reply's header table followed by its MAC (as views for one gather send)."""
    return [headers, session.tag(REPLY, number, headers)]


def read_reply(sock: socket.socket, session: Session, number: int, header_bytes: int,
               count: int, deadline: float) -> bytes:
    """Receive the header table answering request ``number`` (``count`` headers of
    ``header_bytes``) and check its MAC; the table. Raises TransportError for an error reply
    (one ItemHeader saying why: BAD_REQUEST, WRONG_NAMESPACE, WRONG_EPOCH) and AuthError when
    the MAC does not match: the bytes were changed on the way, or are not from this session.

    NOTE: raising leaves the connection unusable: the caller closes it."""
    first = min(count * header_bytes, wire.ITEM_HEADER_BYTES)
    table = recv_exact(sock, first, deadline) if first else b""
    if table and table[0] not in (wire.Status.OK, wire.Status.MISSING):
        tag = recv_exact(sock, TAG_BYTES, deadline)
        status = wire.unpack_item(table).status
        if not session.verify(REPLY, number, tag, table):
            raise AuthError(f"reply header ({status.name}) failed its MAC: tampered on the "
                            "way or not from this session")
        raise TransportError(f"holder answered {status.name}")
    rest = recv_exact(sock, count * header_bytes - first + TAG_BYTES, deadline)
    table, tag = table + rest[:-TAG_BYTES], rest[-TAG_BYTES:]
    if not session.verify(REPLY, number, tag, table):
        raise AuthError("reply headers failed their MAC: tampered on the way or not from "
                        "this session")
    return table
