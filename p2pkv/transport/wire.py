"""Data-plane framing between peers (the whole wire format of the TCP control/data connection).

A connection starts with a handshake, then carries any number of request/response exchanges,
one at a time::

    server hello : "P2KV" | u16 version | u16 flags (bit 0: auth required) | 32 B nonce_s
    client proof : u16 version | 6 pad | 32 B nonce_c | 32 B HMAC(key, "c" nonce_s nonce_c)
                   (nonce_c is the puller's ephemeral X25519 public key, fresh per connection)
    server reply : u8 status | 7 pad | 32 B HMAC(key, "s" nonce_c nonce_s dh info)
                   | u32 n | n B PeerInfo (``info``)
                   dh: X25519(holder's identity key, nonce_c) when ``PeerInfo.identity``
                   names one, else empty (``identity.py``): the proof then shows that the
                   holder holds that instance's key, and the session key depends on it
    request      : u32 length (of what follows) | 16 B MAC | msgpack Request
                   (Pull | Pin | Release | Send)
    reply        : the header table (below) | 16 B MAC of it
    Pull reply   : one ItemHeader per key (u8 status, 7 pad, u64 nbytes, u64 xxh3-64 digest),
                   then the payloads of the OK items, back to back, in the same order; with
                   ``select`` (a ``selection.Selection``) each payload is only the selected
                   bytes of its chunk, and the digest is the holder's xxh3-64 of those.
                   With ``keyed``: digests are 0 and each payload is followed by its
                   16-byte keyed tag (``session.py``: keyed BLAKE3 of the chunk's
                   Poly1305); with ``sealed``: digests are 0 and each payload is
                   AES-256-GCM ciphertext followed by its 16-byte GCM tag (``sealed.py``)
    Pin reply    : one PinHeader per key (ItemHeader + u64 slot + u64 generation); the server
                   keeps those slots pinned until the client's Release (or the connection ends)
                   With ``Pin.keyed``: digests are 0 and each PinHeader is followed by its
                   chunk's 16-byte keyed tag (as a keyed Pull's, ``session.py``)
    Release      : no reply
    Send reply   : one ItemHeader per key; then the holder sends each OK chunk over UCX
                   (tag + its index in the request) to the UCX worker at ``reply_to``, and
                   keeps it pinned until UCX is done with it (see ``transport/ucx.py``)
                   With ``Send.keyed``: digests are 0 and each ItemHeader is followed by its
                   chunk's 16-byte keyed tag (the bytes over UCX are checked against it)
    error reply  : one ItemHeader (BAD_REQUEST, WRONG_NAMESPACE, WRONG_EPOCH) | 16 B MAC;
                   then the holder closes the connection

The MACs are under the session key from the handshake's nonces, over the direction and the
request's number on the connection (``session.py``); a request whose MAC fails is dropped
with the connection, unanswered, and counted (``ServerHealth.bad_macs``).

Without a cluster secret both MACs are zeros and the hello says "no auth"; a side that has a
secret refuses a peer that has none. A bad proof gets status AUTH_FAILED before any chunk byte.
Headers first, bodies after, so that each side moves a whole response with one gather send
and one scatter receive: few system calls and few GIL hand-offs, which is what decides the
speed inside a busy vLLM worker. A malformed request gets one ItemHeader with status
BAD_REQUEST and the connection is closed.
History: 1 — walking skeleton (whole chunks by key, per-chunk digest).
         2 — handshake with HMAC challenge-response and PeerInfo; Pin/Release (same host);
             later in 2: Send (UCX bytes; offered only by holders whose PeerInfo carries a
             ``ucx_address``, so older holders are never asked); PeerInfo.namespace (a
             puller refuses a holder of another namespace: a reused address never serves
             another namespace's bytes; older holders send none and are not checked).
         3 — ``Pull.select``: part of each chunk (a range of KV heads and layers, for a
             puller at a higher tensor parallelism than the holder). A v2 holder would
             ignore the field and send whole chunks, hence the bump.
         4 — a session key from the handshake; a 16-byte MAC on every request and reply
             header; ``Pull.keyed`` (a keyed BLAKE3 tag after each payload, for pulls
             between hosts); ``namespace`` on Pull, Pin and Send (a holder of another
             refuses with WRONG_NAMESPACE).
         5 — the keyed tag is computed over the chunk's Poly1305 under a data-plane key
             (was: its BLAKE3; Poly1305 hashes ~2x faster, ``session.py``); ``epoch`` on
             Pull, Pin and Send (the holder instance's, from the directory: a holder of
             another epoch refuses with WRONG_EPOCH); ``Pull.sealed`` (encrypted payloads,
             ``sealed.py``).
         6 — holder identity: the client's nonce is an ephemeral X25519 key, the holder's
             proof and the session key cover X25519(its instance key, that nonce) and
             its PeerInfo (``PeerInfo.identity``, ``identity.py``): a puller told the
             holder's public key (the directory's lookup) refuses any other member
             answering at that address; ``Pin.keyed`` and ``Send.keyed`` (keyed tags for
             same-host and UCX pulls, in the MACed reply headers).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from typing import NamedTuple

import msgspec

from p2pkv.errors import AuthError, BadRequest
from p2pkv.keys import MAX_KEY_BYTES
from p2pkv.transport.selection import Selection

WIRE_VERSION = 6
MAX_REQUEST_BYTES = 1 << 20
MAX_KEYS_PER_REQUEST = 4096
MAGIC = b"P2KV"
NONCE_BYTES = 32
MAC_BYTES = 32
TAG_BYTES = 16  # the MAC on requests and reply headers, and a keyed chunk digest
FLAG_AUTH = 1

_LEN = struct.Struct("<I")
_HELLO = struct.Struct("<4sHH32s")
_PROOF = struct.Struct("<H6x32s32s")
_VERDICT = struct.Struct("<B7x32sI")
_ITEM = struct.Struct("<B7xQQ")
_PIN = struct.Struct("<B7xQQQQ")
_KEYED_ITEM = struct.Struct("<B7xQQ16s")  # an ItemHeader and the chunk's keyed tag
_KEYED_PIN = struct.Struct("<B7xQQQQ16s")  # a PinHeader and the chunk's keyed tag
LEN_BYTES = _LEN.size
HELLO_BYTES = _HELLO.size
PROOF_BYTES = _PROOF.size
VERDICT_BYTES = _VERDICT.size
ITEM_HEADER_BYTES = _ITEM.size
PIN_HEADER_BYTES = _PIN.size
KEYED_ITEM_HEADER_BYTES = _KEYED_ITEM.size
KEYED_PIN_HEADER_BYTES = _KEYED_PIN.size
MAX_INFO_BYTES = 64 << 10


class Status(enum.IntEnum):
    """Values of a header's ``status`` (one byte on the wire): ``OK`` or why not. (The same
    style as the directory protocol's ``Status``; the values here are fixed by the framing.)"""

    OK = 0
    MISSING = 1
    """The holder does not have the chunk (evicted, or never had it)."""
    BAD_REQUEST = 2
    """The request was malformed; the holder closes the connection after this header."""
    AUTH_FAILED = 3
    """The handshake's proof was wrong (or the versions differ); nothing else follows."""
    WRONG_NAMESPACE = 4
    """The request names another namespace than the holder's; the holder closes the
    connection after this header."""
    WRONG_EPOCH = 5
    """The request names another instance epoch than the holder's (the address now belongs
    to another run of that instance, or to another instance); closed after this header."""


class Pull(msgspec.Struct, frozen=True, tag="pull"):
    keys: list[bytes]
    select: Selection | None = None  # the same part of every chunk (None: whole chunks)
    namespace: str = ""  # the puller's ("": not checked)
    keyed: bool = False  # a keyed tag after each payload instead of the xxh3 digest
    epoch: int = 0  # the holder's instance epoch the puller expects (0: not checked)
    sealed: bool = False  # payloads AES-256-GCM encrypted, each followed by its GCM tag


class Pin(msgspec.Struct, frozen=True, tag="pin"):
    keys: list[bytes]
    namespace: str = ""
    epoch: int = 0
    keyed: bool = False  # each PinHeader followed by the chunk's keyed tag


class Release(msgspec.Struct, frozen=True, tag="release"):
    pins: list[tuple[int, int]]  # (slot, generation) pairs from a Pin reply


class Send(msgspec.Struct, frozen=True, tag="send"):
    keys: list[bytes]
    tag: int  # item i goes with UCX tag ``tag + i``
    reply_to: bytes  # the puller's UCX worker address
    timeout_ms: int  # the holder gives up on the sends after this long
    namespace: str = ""
    epoch: int = 0
    keyed: bool = False  # each ItemHeader followed by the chunk's keyed tag


Request = Pull | Pin | Release | Send
MAX_UCX_ADDRESS_BYTES = 16 << 10
MAX_SEND_TIMEOUT_MS = 600_000


class PeerInfo(msgspec.Struct, frozen=True):
    """What a holder offers beyond TCP; sent once per connection, after authentication."""

    host_id: str = ""  # boot id + hostname: equal only for processes on one host
    shm_path: str = ""  # the store's slab file, mappable by same-host peers ("" = none)
    shm_ident: str = ""  # its "device:inode", checked by the peer after opening it
    slab_bytes: int = 0
    slot_bytes: int = 0
    ucx_address: bytes = b""
    namespace: str = ""  # the holder's namespace ("" = not told: a holder from before it)
    epoch: int = 0  # the holder's instance epoch, as registered (0 = not told)
    identity: bytes = b""  # its instance's X25519 public key (32 B; b"" = none, see wire v6)


class ItemHeader(NamedTuple):
    """One chunk's header in a Pull or Send reply."""

    status: Status
    nbytes: int
    digest: int  # xxh3-64 of the chunk's bytes (0 in a keyed reply)


class PinHeader(NamedTuple):
    """One chunk's header in a Pin reply: where it lies in the holder's slab."""

    status: Status
    nbytes: int
    digest: int
    slot: int
    generation: int


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Request)
_info_decoder = msgspec.msgpack.Decoder(PeerInfo)


def mac(key: bytes | None, role: bytes, first: bytes, second: bytes, *rest: bytes) -> bytes:
    if key is None:
        return bytes(MAC_BYTES)
    return hmac.new(key, b"".join((role, first, second, *rest)), hashlib.sha256).digest()


def pack_hello(auth: bool, nonce: bytes) -> bytes:
    return _HELLO.pack(MAGIC, WIRE_VERSION, FLAG_AUTH if auth else 0, nonce)


def unpack_hello(data: bytes) -> tuple[bool, bytes]:
    magic, version, flags, nonce = _HELLO.unpack(data)
    if magic != MAGIC:
        raise AuthError("peer is not a p2pkv data plane")
    if version != WIRE_VERSION:
        raise AuthError(f"peer speaks data-plane version {version}, we speak {WIRE_VERSION}")
    return bool(flags & FLAG_AUTH), nonce


def pack_proof(nonce: bytes, proof: bytes) -> bytes:
    return _PROOF.pack(WIRE_VERSION, nonce, proof)


def unpack_proof(data: bytes) -> tuple[int, bytes, bytes]:
    return _PROOF.unpack(data)


def pack_verdict(status: Status, proof: bytes, info: bytes) -> bytes:
    return _VERDICT.pack(status, proof, len(info)) + info


def unpack_verdict(data: bytes) -> tuple[int, bytes, int]:
    status, proof, n = _VERDICT.unpack(data)
    if n > MAX_INFO_BYTES:
        raise BadRequest(f"peer info of {n} bytes")
    return status, proof, n


def encode_info(info: PeerInfo) -> bytes:
    return _encoder.encode(info)


def decode_info(data: bytes) -> PeerInfo:
    try:
        return _info_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise BadRequest(f"undecodable peer info: {e}") from None


def encode_body(req: Request) -> bytes:
    return _encoder.encode(req)


def frame_request(tag: bytes, body: bytes) -> bytes:
    """``u32 length | tag | body`` (the tag from ``session.Session.tag``)."""
    assert len(tag) == TAG_BYTES
    return _LEN.pack(TAG_BYTES + len(body)) + tag + body


def encode_request(req: Request) -> bytes:
    """A request framed with a zero MAC: what a connection without a cluster secret carries
    (tests and the fault bench; the transport frames with ``session.encode_request``)."""
    return frame_request(bytes(TAG_BYTES), encode_body(req))


def request_length(prefix: bytes) -> int:
    """What follows a request's length prefix (its MAC and body), checked."""
    (n,) = _LEN.unpack(prefix)
    if n > MAX_REQUEST_BYTES + TAG_BYTES:
        raise BadRequest(f"request of {n} bytes exceeds {MAX_REQUEST_BYTES}")
    if n < TAG_BYTES:
        raise BadRequest(f"request of {n} bytes has no room for its MAC")
    return n


def decode_request(body: bytes) -> Request:
    try:
        req = _decoder.decode(body)
    except msgspec.DecodeError as e:
        raise BadRequest(f"undecodable request: {e}") from None
    items = req.pins if isinstance(req, Release) else req.keys
    if len(items) > MAX_KEYS_PER_REQUEST:
        raise BadRequest(f"{len(items)} items exceed {MAX_KEYS_PER_REQUEST}")
    if not isinstance(req, Release) and any(len(k) > MAX_KEY_BYTES for k in req.keys):
        raise BadRequest("key longer than MAX_KEY_BYTES")
    if isinstance(req, Send):
        if not 0 < len(req.reply_to) <= MAX_UCX_ADDRESS_BYTES:
            raise BadRequest(f"UCX address of {len(req.reply_to)} bytes")
        if not 0 <= req.tag < (1 << 63) or not 0 < req.timeout_ms <= MAX_SEND_TIMEOUT_MS:
            raise BadRequest("tag or timeout out of range")
    return req


def pack_item(status: Status, nbytes: int = 0, digest: int = 0) -> bytes:
    return _ITEM.pack(status, nbytes, digest)


def unpack_item(header: bytes) -> ItemHeader:
    status, nbytes, digest = _ITEM.unpack(header)
    return ItemHeader(_status(status), nbytes, digest)


def pack_keyed_item(status: Status, nbytes: int = 0, tag: bytes = bytes(TAG_BYTES)) -> bytes:
    return _KEYED_ITEM.pack(status, nbytes, 0, tag)


def unpack_keyed_item(header: bytes) -> tuple[ItemHeader, bytes]:
    """A keyed Send reply's header: the ItemHeader and the chunk's keyed tag."""
    status, nbytes, digest, tag = _KEYED_ITEM.unpack(header)
    return ItemHeader(_status(status), nbytes, digest), tag


def pack_pin(status: Status, nbytes: int = 0, digest: int = 0, slot: int = 0,
             generation: int = 0) -> bytes:
    return _PIN.pack(status, nbytes, digest, slot, generation)


def pack_keyed_pin(status: Status, nbytes: int = 0, slot: int = 0, generation: int = 0,
                   tag: bytes = bytes(TAG_BYTES)) -> bytes:
    return _KEYED_PIN.pack(status, nbytes, 0, slot, generation, tag)


def unpack_pin(header: bytes) -> PinHeader:
    status, nbytes, digest, slot, generation = _PIN.unpack(header)
    return PinHeader(_status(status), nbytes, digest, slot, generation)


def unpack_keyed_pin(header: bytes) -> tuple[PinHeader, bytes]:
    """A keyed Pin reply's header: the PinHeader and the chunk's keyed tag."""
    status, nbytes, digest, slot, generation, tag = _KEYED_PIN.unpack(header)
    return PinHeader(_status(status), nbytes, digest, slot, generation), tag


def _status(value: int) -> Status:
    try:
        return Status(value)
    except ValueError:
        raise BadRequest(f"unknown item status {value}") from None
