"""Wire protocol of the p2pkv directory: every message, the protocol version, encode/decode.

The one file that says what travels between a ``DirectoryClient`` (connector scheduler side,
router, ``p2pkv status``) and the ``DirectoryServer``: msgpack-encoded msgspec Structs in one
tagged union (tag field ``"t"``). Every message carries ``v`` (protocol version) and ``rid``
(the client's request id, echoed in the reply); every reply also carries ``directory_epoch``,
an id of the directory's current run, so clients notice a restart.

Limits are part of the protocol and enforced by :func:`decode`: frames from the network are
validated here, once, and everything past this module may trust the types.
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec

from p2pkv.keys import MAX_KEY_BYTES, ChunkKey, InstanceId, Namespace

PROTOCOL_VERSION = 1
# History (bump on any change a peer of the other version would misread):
#   1  walking skeleton: Register, Publish, Lookup, Report, Stats, Unregister;
#      Ok, Error, LookupReply, StatsReply.

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest encoded message either side accepts."""

MAX_KEYS_PER_MESSAGE = 100_000
"""Most chunk keys in one message (Publish counts added + removed)."""

MAX_NAME_CHARS = 256
"""Longest instance id, namespace, address or counter name."""

MAX_COUNTERS = 256
"""Most counters in one Report."""

_U63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_I64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_Key = Annotated[ChunkKey, msgspec.Meta(min_length=1, max_length=MAX_KEY_BYTES)]
_Keys = Annotated[list[_Key], msgspec.Meta(max_length=MAX_KEYS_PER_MESSAGE)]
_Instance = Annotated[InstanceId, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
_Namespace = Annotated[Namespace, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
# Data-plane address of an instance's transport server: "host:port" ("[v6]:port" works too).
_Address = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS, pattern=r"^\S+:[0-9]{1,5}$")]
_CounterName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
_Counters = Annotated[dict[_CounterName, _I64], msgspec.Meta(max_length=MAX_COUNTERS)]
_Reason = Annotated[str, msgspec.Meta(max_length=4096)]


class ProtocolError(ValueError):
    """Bytes that are not a valid message of this protocol (the reason says why)."""


class _Message(msgspec.Struct, tag_field="t", kw_only=True, frozen=True):
    v: _U63 = PROTOCOL_VERSION
    rid: _U63 = 0


class _Reply(_Message, kw_only=True, frozen=True):
    directory_epoch: _U63 = 0


# --- requests (client -> directory) -------------------------------------------------------


class Register(_Message, tag="reg", frozen=True):
    """An instance announces itself; a new ``epoch`` (restarted process) drops its old keys."""

    instance: _Instance
    epoch: _U63
    namespace: _Namespace
    address: _Address


class Publish(_Message, tag="pub", frozen=True):
    """Keys an instance's store gained and lost since its last Publish."""

    instance: _Instance
    namespace: _Namespace
    added: _Keys
    removed: _Keys

    def __post_init__(self) -> None:
        if len(self.added) + len(self.removed) > MAX_KEYS_PER_MESSAGE:
            raise ValueError(f"Publish carries more than {MAX_KEYS_PER_MESSAGE} keys")


class Lookup(_Message, tag="look", frozen=True):
    """Who holds the longest leading run of ``keys`` (given in prefix order)?"""

    namespace: _Namespace
    keys: _Keys


class Report(_Message, tag="rep", frozen=True):
    """Connector counters (chunks_pulled, bytes_pulled, ...), shown by ``p2pkv status``."""

    instance: _Instance
    counters: _Counters


class Stats(_Message, tag="stats", frozen=True):
    """Ask for the directory's members and lookup totals."""


class Unregister(_Message, tag="unreg", frozen=True):
    """An instance leaves; its keys are dropped. Unknown instances are not an error."""

    instance: _Instance


# --- replies (directory -> client) --------------------------------------------------------


class Holder(msgspec.Struct, frozen=True):
    """One instance holding keys[0:run] of a Lookup contiguously (run >= 1)."""

    instance: _Instance
    address: _Address
    run: _U63


class InstanceInfo(msgspec.Struct, frozen=True):
    """One registered instance as reported by Stats."""

    instance: _Instance
    namespace: _Namespace
    address: _Address
    epoch: _U63
    chunks: _U63
    counters: _Counters


class Ok(_Reply, tag="ok", frozen=True):
    """The request was applied."""


class Error(_Reply, tag="err", frozen=True):
    """The request was refused; ``reason`` is meant for a human (and a log line)."""

    reason: _Reason


class LookupReply(_Reply, tag="lookr", frozen=True):
    """Holders of a Lookup's leading keys, longest run first."""

    holders: Annotated[list[Holder], msgspec.Meta(max_length=MAX_KEYS_PER_MESSAGE)]


class StatsReply(_Reply, tag="statsr", frozen=True):
    """Members and lookup totals since the directory started."""

    instances: Annotated[list[InstanceInfo], msgspec.Meta(max_length=MAX_KEYS_PER_MESSAGE)]
    lookups: _U63
    keys_looked_up: _U63
    keys_hit: _U63
    rejected: _U63


Request = Union[Register, Publish, Lookup, Report, Stats, Unregister]
Reply = Union[Ok, Error, LookupReply, StatsReply]
Message = Union[Request, Reply]


class _Header(msgspec.Struct):
    """Just enough of any message (even of another version) to answer it."""

    v: int = -1
    rid: int = 0


# NOTE: encoders/decoders hold no state between calls; sharing them is safe.
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Message)
_HEADER_DECODER = msgspec.msgpack.Decoder(_Header)


def encode(msg: Message) -> bytes:
    """Serialize one message (raises TypeError for values msgpack cannot carry)."""
    return _ENCODER.encode(msg)


def decode(data: bytes | memoryview) -> Message:
    """Parse and validate one message; raises :class:`ProtocolError` with the reason.

    The version is *not* checked here: the server answers a mismatch with an Error reply.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return _DECODER.decode(data)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed message: {e}") from None


def peek_header(data: bytes | memoryview) -> tuple[int, int] | None:
    """``(v, rid)`` of bytes that :func:`decode` refused, or None if not even that parses.

    Lets the server echo the rid and say "version mismatch" to a peer of another version.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        return None
    try:
        header = _HEADER_DECODER.decode(data)
    except msgspec.DecodeError:
        return None
    if not isinstance(header.v, int) or not isinstance(header.rid, int):
        return None
    return header.v, header.rid


def version_mismatch_reason(peer_version: int) -> str:
    """The Error reason sent to a peer that speaks another protocol version."""
    return (f"protocol version mismatch: message is v{peer_version}, "
            f"directory speaks v{PROTOCOL_VERSION}")
