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

from p2pkv.errors import ProtocolError
from p2pkv.keys import MAX_KEY_BYTES, ChunkKey, InstanceId, Namespace
from p2pkv.slices import KVSlice

PROTOCOL_VERSION = 4
# History (bump on any change a peer of the other version would misread):
#   1  walking skeleton: Register, Publish, Lookup, Report, Stats, Unregister;
#      Ok, Error, LookupReply, StatsReply.
#   2  leases and trust: Register carries probe + capabilities and is answered by
#      RegisterReply (heartbeat interval); Publish carries a per-registration seq and a
#      reset flag (snapshot); Heartbeat; Snapshot/SnapshotReply and the change-feed events;
#      every reply has status + reason; StatsReply/InstanceInfo grew fields.
#      Compatible additions since (a peer without them ignores or defaults them):
#      StatsReply.refused (recently refused registrations, for ``p2pkv doctor``).
#   3  identity (issue 13): Publish, Report and Unregister carry the registration's epoch
#      (as Heartbeat did) and a mismatch is refused; a Register whose epoch is far ahead of
#      the directory's clock is refused; an instance id belongs to the connection that
#      registered it for its lease (INSTANCE_TAKEN, Error.retry_after_ms); per-connection
#      quotas (OVER_QUOTA). v2 peers are refused: a v2 Unregister could drop a successor.
#   4  tensor parallelism: a registration is one worker rank; Register, Holder, InstanceInfo
#      and InstanceJoined carry ``engine`` (the vLLM engine the rank belongs to, "" = the
#      instance id) and ``slice`` (the KV heads x layers it holds, None = the whole model);
#      Register and InstanceInfo carry ``spec``, the namespace's fields in clear.
#      A v3 peer would take every rank for a whole instance, hence the bump.
#      Compatible additions since: StatsReply.lookup_buckets (Lookups by the directory's
#      handling time, bounds LOOKUP_BUCKETS_S). Status NOT_THIS_INSTANCE (issue 13,
#      per-instance credentials): with a cluster secret, Register/Publish/Heartbeat/Report/
#      Unregister for instance i need i's own CURVE key (derived from the secret and i); the
#      members' shared key only reads. No message changed shape, so no bump: a v4 peer
#      without a credential reads the refusal as an Error with a reason.
#      Heartbeats/HeartbeatsReply (issue 15): many registrations' heartbeats in one message,
#      each entry checked (epoch, owner, seq) and refused alone as a Heartbeat would be; a
#      directory without them answers bad_request, and a sender then sends Heartbeats one by
#      one (``heartbeats_unsupported``). Holder.epoch (issue 13): the holder's registration
#      epoch in Lookup answers, named in data-plane requests (default 0 = not checked).
#      Tiers (issue 14): Publish.lease_ms (the added keys are served from leased paged
#      blocks for that long; 0 = the host store), Holder.tier/lease_left_ms and
#      InstanceInfo.leased_chunks/lease_ends_ms. Defaults mean "the store" (a Publish of an
#      older client) and "not said" (a Holder of an older directory: tier ""); older peers
#      ignore the fields, so no bump. Holder.key (issue 13, holder identity): the Z85 CURVE
#      public key the holder registered with (its instance's, "" = none: a directory
#      without a secret, or an older one); the puller expects its data plane to prove it
#      (``transport/identity.py``). Older peers ignore it, so no bump.

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest encoded message either side accepts."""

MAX_KEYS_PER_MESSAGE = 100_000
"""Most chunk keys in one message (Publish counts added + removed)."""

MAX_NAME_CHARS = 256
"""Longest instance id, namespace, address or counter name."""

MAX_COUNTERS = 256
"""Most counters in one Report."""

MAX_CAPABILITIES = 16

MAX_BEATS_PER_MESSAGE = 4096
"""Most registrations in one Heartbeats (~60 B each: 4096 fit in ~250 KB)."""

MAX_REFUSED = 256
"""Most refused registrations a StatsReply lists (the directory remembers no more)."""

LOOKUP_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                    5e-2, 0.1)
"""Upper bounds of the directory's lookup handling-time histogram (``StatsReply.lookup_buckets``,
``p2pkv_directory_lookup_seconds``); one more bucket counts the slower ones."""

# Liveness (Majordomo style: each constant derives from the interval). The directory sends
# its interval and liveness in every RegisterReply; these are the defaults.
HEARTBEAT_INTERVAL_S = 1.0
"""A registered client renews its lease this often; until a RegisterReply says otherwise it
is also the client's Register retry interval."""
HEARTBEAT_LIVENESS = 5
"""Missed heartbeats before a lease expires (generous: a busy vLLM process can stall its
heartbeat thread for a moment, and expiry costs a full republish)."""
MIN_HEARTBEAT_S = 0.01
"""Shortest interval a client honours from a RegisterReply."""
REFUSED_RETRY_INTERVALS = 10
"""A client refused for PROBE_MISMATCH (or STALE_EPOCH) retries this many intervals later
(the odd one out may leave the namespace; a newer epoch may have been a forgery)."""
MAX_EPOCH_AHEAD_S = 300.0
"""Register epochs are wall-clock nanoseconds; one further ahead of the directory's clock
than this is refused (a huge epoch would otherwise lock the instance id for ever)."""
MAX_KEYS_PER_REGISTRATION = 4_000_000
"""Most keys one registration may hold (~800 MB of directory RAM at 200 B a key)."""
MAX_REGISTRATIONS_PER_CONNECTION = 64
"""Most instances one client connection may register (one per connector rank)."""


def tick_s(heartbeat_interval_s: float) -> float:
    """How often a loop driven by heartbeat deadlines looks at them (the client's keeper, the
    server's lease purge): a quarter interval, within 10-250 ms."""
    return min(max(heartbeat_interval_s / 4, 0.01), 0.25)

_U63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_I64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_Key = Annotated[ChunkKey, msgspec.Meta(min_length=1, max_length=MAX_KEY_BYTES)]
_Keys = Annotated[list[_Key], msgspec.Meta(max_length=MAX_KEYS_PER_MESSAGE)]
_Instance = Annotated[InstanceId, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
_Namespace = Annotated[Namespace, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
# Data-plane address of an instance's transport server: "host:port" ("[v6]:port" works too).
_Address = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS, pattern=r"^\S+:[0-9]{1,5}$")]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
_Probe = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
_Engine = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
_Spec = Annotated[str, msgspec.Meta(max_length=4096)]
_Counters = Annotated[dict[_Name, _I64], msgspec.Meta(max_length=MAX_COUNTERS)]
_Capabilities = Annotated[list[_Name], msgspec.Meta(max_length=MAX_CAPABILITIES)]
_Reason = Annotated[str, msgspec.Meta(max_length=4096)]


TIER_LEASED = "leased"
"""Holder.tier: some of the run is served from the holder's paged KV blocks under a lease
(until ``lease_left_ms``; after it, from the store if the copy made it there, else not)."""
TIER_STORE = "store"
"""Holder.tier: the whole run is served from the holder's host store (the durable tier)."""
MAX_LEASE_MS = 86_400_000
"""Longest lease a Publish may name (a day; leases are seconds)."""
_Tier = Annotated[str, msgspec.Meta(max_length=16)]
_PublicKey = Annotated[str, msgspec.Meta(max_length=40)]  # Z85 CURVE public key, or ""


class Status:
    """Values of a reply's ``status``: ``OK`` or why the request was refused."""

    OK = "ok"
    BAD_REQUEST = "bad_request"
    VERSION = "version_mismatch"
    UNKNOWN_INSTANCE = "unknown_instance"
    """Register first (or again: the lease expired or the directory restarted)."""
    STALE_EPOCH = "stale_epoch"
    """A newer process of the same instance is registered; this one is stale."""
    SEQ_GAP = "seq_gap"
    """Publishes were lost; resend the full key set (Publish with reset=True)."""
    PROBE_MISMATCH = "probe_mismatch"
    """The namespace's other members hash differently; this instance is refused."""
    WRONG_NAMESPACE = "wrong_namespace"
    INSTANCE_TAKEN = "instance_taken"
    """Another connection holds a live lease on this instance id; retry after
    ``Error.retry_after_ms`` (when that lease lapses, unless it is renewed)."""
    OVER_QUOTA = "over_quota"
    """Too many keys in one registration, or registrations on one connection (with CURVE:
    one instance credential)."""
    NOT_THIS_INSTANCE = "not_this_instance"
    """A CURVE directory: this connection's key may not act as the instance named (the
    members' shared key only reads; an instance credential acts only as its instance and
    that instance's ranks ``<instance>/<n>``)."""
    INTERNAL = "internal_error"


class _Message(msgspec.Struct, tag_field="t", kw_only=True, frozen=True):
    v: _U63 = PROTOCOL_VERSION
    rid: _U63 = 0


class _Reply(_Message, kw_only=True, frozen=True):
    directory_epoch: _U63 = 0
    status: _Name = Status.OK
    reason: _Reason = ""


# --- requests (client -> directory) -------------------------------------------------------


class Register(_Message, tag="reg", frozen=True):
    """An instance announces itself (answered by RegisterReply or Error).

    One registration per instance id, with one data-plane address: a vLLM instance at
    tensor parallelism > 1 registers each worker rank that saves (the lowest rank of each
    distinct ``slice``) under its own id, all with the same ``engine``; ranks of instances
    at different TP share one namespace. A higher ``epoch`` (a restarted process) drops the
    old keys at once; a lower one is refused (STALE_EPOCH). ``probe`` must equal the probe
    of every other member of the namespace (PROBE_MISMATCH).
    """

    instance: _Instance
    epoch: _U63
    namespace: _Namespace
    address: _Address
    probe: _Probe = ""
    capabilities: _Capabilities = []
    engine: _Engine = ""
    slice: KVSlice | None = None
    spec: _Spec = ""
    """The namespace's fields in clear (``NamespaceSpec.describe``), for ``p2pkv doctor``."""


class Publish(_Message, tag="pub", frozen=True):
    """Keys an instance's store gained and lost since its previous Publish.

    ``seq`` counts the registration's publishes from 1; the directory answers a gap with
    SEQ_GAP and ignores the message. ``reset=True`` (any seq) first drops every key the
    instance held: the first message of a full snapshot.
    """

    instance: _Instance
    namespace: _Namespace
    added: _Keys
    removed: _Keys
    seq: _U63 = 0
    reset: bool = False
    epoch: _U63 = 0
    """The registration's epoch (v3): a Publish of another epoch is refused."""
    lease_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_LEASE_MS)] = 0
    """Issue 14: ``added`` are served from leased paged blocks for this long (TIER_LEASED);
    0: from the host store (a leased key published again with 0 moved to the store)."""

    def __post_init__(self) -> None:
        if len(self.added) + len(self.removed) > MAX_KEYS_PER_MESSAGE:
            raise ValueError(f"Publish carries more than {MAX_KEYS_PER_MESSAGE} keys")


class Heartbeat(_Message, tag="hb", frozen=True):
    """Renews the lease; ``seq`` is the last Publish seq sent, so lost publishes show."""

    instance: _Instance
    epoch: _U63
    seq: _U63 = 0


class Beat(msgspec.Struct, frozen=True):
    """One registration's entry in a Heartbeats: what its own Heartbeat would carry."""

    instance: _Instance
    epoch: _U63
    seq: _U63 = 0


class Heartbeats(_Message, tag="hbs", frozen=True):
    """Heartbeats of many registrations of one connection in one message (a process hosting
    many simulated instances, a client holding several ranks' registrations): each entry
    renews its lease, or is refused, exactly as its own Heartbeat would be (another epoch:
    STALE_EPOCH, another connection's id: INSTANCE_TAKEN, a lost publish: SEQ_GAP).
    Answered by one HeartbeatsReply listing the refused entries."""

    beats: Annotated[list[Beat], msgspec.Meta(max_length=MAX_BEATS_PER_MESSAGE)]


class Lookup(_Message, tag="look", frozen=True):
    """Who holds the longest leading run of ``keys`` (given in prefix order)?"""

    namespace: _Namespace
    keys: _Keys


class Report(_Message, tag="rep", frozen=True):
    """Connector counters (chunks_pulled, bytes_pulled, ...), shown by ``p2pkv status``."""

    instance: _Instance
    counters: _Counters
    epoch: _U63 = 0
    """The registration's epoch (v3)."""


class Stats(_Message, tag="stats", frozen=True):
    """Ask for the directory's members and lookup totals."""


class Unregister(_Message, tag="unreg", frozen=True):
    """An instance leaves; its keys are dropped. Unknown instances are not an error; another
    epoch's (a successor registered since) is refused and left alone."""

    instance: _Instance
    epoch: _U63 = 0
    """The registration's epoch (v3)."""


class Snapshot(_Message, tag="snap", frozen=True):
    """Ask for the whole state (the change feed's late-joiner path, as in ZeroMQ's Clone
    pattern); answered by one or more SnapshotReply with the same rid, the last with
    ``last=True``."""


# --- replies (directory -> client) --------------------------------------------------------


class Holder(msgspec.Struct, frozen=True):
    """One instance (worker rank) holding its ``slice`` of keys[0:run] of a Lookup
    contiguously (run >= 1); ``engine`` groups the ranks of one vLLM instance; ``epoch`` is
    its registration's epoch, which the puller names in its data-plane requests (0: not
    known, not checked) so that an address reused by another process never serves."""

    instance: _Instance
    address: _Address
    run: _U63
    engine: _Engine = ""
    slice: KVSlice | None = None
    epoch: _U63 = 0
    tier: _Tier = ""
    """Which tier serves keys[0:run] (issue 14): TIER_LEASED when some of them are only in
    leased paged blocks, TIER_STORE when all are in the host store; "" from older
    directories."""
    lease_left_ms: _U63 = 0
    """With TIER_LEASED: until the earliest of those leases ends (0: ending now)."""
    key: _PublicKey = ""
    """The Z85 CURVE public key the holder registered with (its instance credential's; "":
    none, a directory without a secret): what its data plane must prove to the puller."""


class InstanceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One registered instance as reported by Stats and Snapshot."""

    instance: _Instance
    namespace: _Namespace
    address: _Address
    epoch: _U63
    chunks: _U63
    counters: _Counters = {}
    probe: _Probe = ""
    capabilities: _Capabilities = []
    lease_left_ms: _I64 = 0
    engine: _Engine = ""
    slice: KVSlice | None = None
    spec: _Spec = ""
    leased_chunks: _U63 = 0
    """Keys served from leased paged blocks only (issue 14; the rest: the host store)."""
    lease_ends_ms: _U63 = 0
    """With leased_chunks: until the earliest of those leases ends."""


class RefusedRegistration(msgspec.Struct, frozen=True, kw_only=True):
    """A Register the directory refused recently (e.g. PROBE_MISMATCH), as reported by Stats:
    a refused instance is in no member list, yet it is what an operator has to find."""

    instance: _Instance
    namespace: _Namespace
    address: _Address
    epoch: _U63
    probe: _Probe = ""
    status: _Name
    reason: _Reason = ""
    count: _U63 = 1
    """Refusals of this instance since it was first refused (its client retries)."""
    age_ms: _U63 = 0
    """Since the latest refusal."""


class Holding(msgspec.Struct, frozen=True):
    """Part of one instance's keys, in a SnapshotReply."""

    instance: _Instance
    namespace: _Namespace
    keys: _Keys


class Ok(_Reply, tag="ok", frozen=True):
    """The request was applied."""


class Error(_Reply, tag="err", frozen=True):
    """The request was refused; ``status`` says why for programs, ``reason`` for humans."""

    status: _Name = Status.BAD_REQUEST
    retry_after_ms: _U63 = 0
    """For INSTANCE_TAKEN: when the other connection's lease lapses unless renewed."""


class RegisterReply(_Reply, tag="regr", frozen=True):
    """Registered; renew the lease every ``heartbeat_ms`` (it expires after
    ``heartbeat_ms * liveness``)."""

    heartbeat_ms: _U63
    liveness: _U63


class BeatRefusal(msgspec.Struct, frozen=True):
    """Why entry ``index`` of a Heartbeats was refused (the Error its Heartbeat would get)."""

    index: _U63
    status: _Name
    reason: _Reason = ""
    retry_after_ms: _U63 = 0


class HeartbeatsReply(_Reply, tag="hbsr", frozen=True):
    """The entries of a Heartbeats that were refused; every other one was applied."""

    refused: Annotated[list[BeatRefusal], msgspec.Meta(max_length=MAX_BEATS_PER_MESSAGE)] = []


class LookupReply(_Reply, tag="lookr", frozen=True):
    """Holders of a Lookup's leading keys, longest run first."""

    holders: Annotated[list[Holder], msgspec.Meta(max_length=MAX_KEYS_PER_MESSAGE)]


class StatsReply(_Reply, tag="statsr", frozen=True):
    """Members and totals since the directory started."""

    instances: Annotated[list[InstanceInfo], msgspec.Meta(max_length=MAX_KEYS_PER_MESSAGE)]
    lookups: _U63
    keys_looked_up: _U63
    keys_hit: _U63
    rejected: _U63
    chunks: _U63 = 0
    expirations: _U63 = 0
    heartbeats: _U63 = 0
    publishes: _U63 = 0
    feed_seq: _U63 = 0
    feed_endpoint: str = ""
    secure: bool = False
    refused: Annotated[list[RefusedRegistration], msgspec.Meta(max_length=MAX_REFUSED)] = []
    """Registrations refused within the directory's memory of refusals, newest first."""
    lookup_buckets: Annotated[list[_U63], msgspec.Meta(max_length=64)] = []
    """Lookups by the time the directory's loop spent on each (decode, index, encode, send),
    one count per LOOKUP_BUCKETS_S bound and one above the last ([] from older directories)."""


class SnapshotReply(_Reply, tag="snapr", frozen=True):
    """One part of the state as of change-feed event ``feed_seq``: apply feed events with a
    higher seq on top. ``instances`` comes in the first part, ``holdings`` in all."""

    feed_seq: _U63
    feed_endpoint: str
    instances: Annotated[list[InstanceInfo], msgspec.Meta(max_length=MAX_KEYS_PER_MESSAGE)]
    holdings: Annotated[list[Holding], msgspec.Meta(max_length=MAX_KEYS_PER_MESSAGE)]
    last: bool


# --- change feed (directory PUB -> subscribers), one message per frame ---------------------


class _Event(msgspec.Struct, tag_field="t", kw_only=True, frozen=True):
    v: _U63 = PROTOCOL_VERSION
    seq: _U63
    """Consecutive from 1 per directory run (``directory_epoch``); a gap means events lost."""
    directory_epoch: _U63


class InstanceJoined(_Event, tag="joined", frozen=True):
    instance: _Instance
    epoch: _U63
    namespace: _Namespace
    address: _Address
    engine: _Engine = ""
    slice: KVSlice | None = None


class InstanceLeft(_Event, tag="left", frozen=True):
    """``why``: "unregistered", "expired" or "replaced" (a new epoch registered)."""

    instance: _Instance
    epoch: _U63
    why: _Name


class ChunksChanged(_Event, tag="chunks", frozen=True):
    """``reset``: drop every key the instance held before applying ``added``/``removed``."""

    instance: _Instance
    namespace: _Namespace
    added: _Keys
    removed: _Keys
    reset: bool = False


Request = Union[Register, Publish, Heartbeat, Heartbeats, Lookup, Report, Stats, Unregister,
                Snapshot]
Reply = Union[Ok, Error, RegisterReply, LookupReply, StatsReply, SnapshotReply,
              HeartbeatsReply]
Message = Union[Request, Reply]
FeedEvent = Union[InstanceJoined, InstanceLeft, ChunksChanged]


class _Header(msgspec.Struct):
    """Just enough of any message (even of another version) to answer it."""

    v: int = -1
    rid: int = 0


# NOTE: encoders/decoders hold no state between calls; sharing them is safe.
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Message)
_HEADER_DECODER = msgspec.msgpack.Decoder(_Header)
_EVENT_DECODER = msgspec.msgpack.Decoder(FeedEvent)


def encode(msg: Message | FeedEvent) -> bytes:
    """Serialize one message (raises TypeError for values msgpack cannot carry)."""
    return _ENCODER.encode(msg)


def decode(data: bytes | memoryview) -> Message:
    """Parse and validate one message; raises :class:`ProtocolError` with the reason.

    The version is *not* checked here: the server answers a mismatch with an Error reply.
    """
    return _decode_with(_DECODER, data, "message")


def _decode_with(decoder: msgspec.msgpack.Decoder, data: bytes | memoryview, what: str):
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{what} of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed {what}: {e}") from None


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


_LOOKUP_TAG = b"\xa1t\xa4look"
"""How an encoded Lookup begins after its map header: key ``t``, value ``look``."""


def is_lookup(data: bytes) -> bool:
    """Whether ``data`` is (as far as its first bytes say) a Lookup, without decoding it:
    the server answers Lookups ahead of other connections' writes (``server.py``). A wrong
    guess only changes when the message is handled, not how: it is decoded and validated
    as any other.

    NOTE: msgspec writes a tagged Struct's tag field first, and a Lookup has fewer than 16
    fields, so its map header is one byte (0x80 | n)."""
    return data[1:8] == _LOOKUP_TAG and data[:1] != b"" and data[0] & 0xF0 == 0x80


def version_mismatch_reason(peer_version: int) -> str:
    """The Error reason sent to a peer that speaks another protocol version."""
    return (f"protocol version mismatch: message is v{peer_version}, "
            f"directory speaks v{PROTOCOL_VERSION}")


def decode_event(data: bytes | memoryview) -> FeedEvent:
    """Parse one change-feed message; raises :class:`ProtocolError`."""
    return _decode_with(_EVENT_DECODER, data, "event")


def batch_heartbeats(beats: list[Heartbeat]) -> list[Heartbeats]:
    """Heartbeats of one connection's registrations, MAX_BEATS_PER_MESSAGE per message."""
    entries = [Beat(b.instance, b.epoch, b.seq) for b in beats]
    return [Heartbeats(beats=entries[i:i + MAX_BEATS_PER_MESSAGE])
            for i in range(0, len(entries), MAX_BEATS_PER_MESSAGE)]


def split_heartbeats_reply(sent: Heartbeats, reply: Reply) -> list[tuple[InstanceId, Reply]]:
    """Per entry of ``sent``, the reply its own Heartbeat would have got (same rid and
    directory epoch): Ok, or the entry's Error; an Error for the whole message (e.g. the
    directory's quota) is every entry's. So each registration's state machine takes its
    answer unchanged (``RegistrationMachine.on_reply``)."""
    if isinstance(reply, Error):
        return [(b.instance, reply) for b in sent.beats]
    if not isinstance(reply, HeartbeatsReply):
        raise ProtocolError(f"a Heartbeats was answered by {type(reply).__name__}")
    refused = {r.index: r for r in reply.refused}
    out: list[tuple[InstanceId, Reply]] = []
    for i, b in enumerate(sent.beats):
        r = refused.get(i)
        out.append((b.instance, Ok(rid=reply.rid, directory_epoch=reply.directory_epoch)
                    if r is None else
                    Error(rid=reply.rid, directory_epoch=reply.directory_epoch, status=r.status,
                          reason=r.reason, retry_after_ms=r.retry_after_ms)))
    return out


def heartbeats_unsupported(reply: Reply) -> bool:
    """Whether a directory answered a Heartbeats as a message it does not know (older v4):
    send single Heartbeats to it."""
    return (isinstance(reply, Error) and reply.status == Status.BAD_REQUEST
            and "hbs" in reply.reason)
