"""Wire protocol of the directory: round-trips and refusals of bad bytes (no I/O)."""

from __future__ import annotations

import msgspec
import pytest

from p2pkv.directory import protocol
from p2pkv.directory.protocol import (
    MAX_KEYS_PER_MESSAGE, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ChunksChanged, Error, Heartbeat,
    Holder, Holding, InstanceInfo, InstanceJoined, InstanceLeft, Lookup, LookupReply, Ok,
    ProtocolError, Publish, RefusedRegistration, Register, RegisterReply, Report, Snapshot,
    SnapshotReply, Stats, StatsReply, Status, Unregister,
)
from p2pkv.keys import MAX_KEY_BYTES, ChunkKey, InstanceId, Namespace

pytestmark = pytest.mark.timeout(30)

K1, K2 = ChunkKey(b"\x01" * 32), ChunkKey(b"\x02" * 32)
A, NS = InstanceId("engine-a"), Namespace("ns0")

MESSAGES = [
    Register(instance=A, epoch=7, namespace=NS, address="10.0.0.1:5000", rid=1, probe="ab12",
             capabilities=["TcpTransport"]),
    Register(instance=A, epoch=0, namespace=NS, address="[::1]:5000"),
    Publish(instance=A, namespace=NS, added=[K1, K2], removed=[K1], rid=2, seq=3),
    Publish(instance=A, namespace=NS, added=[], removed=[], seq=1, reset=True),
    Heartbeat(instance=A, epoch=7, seq=3, rid=11),
    protocol.Heartbeats(beats=[protocol.Beat(A, 7, 3), protocol.Beat("b", 1)], rid=12),
    protocol.HeartbeatsReply(rid=12, directory_epoch=1,
                             refused=[protocol.BeatRefusal(1, Status.STALE_EPOCH, "x")]),
    Lookup(namespace=NS, keys=[K1, K2], rid=3),
    Report(instance=A, counters={"chunks_pulled": 3, "bytes_pulled": 1 << 40}, rid=4),
    Stats(rid=5),
    Unregister(instance=A, rid=6),
    Snapshot(rid=12),
    Ok(rid=7, directory_epoch=123),
    Error(rid=8, directory_epoch=123, status=Status.UNKNOWN_INSTANCE,
          reason="unknown instance engine-a"),
    RegisterReply(rid=13, directory_epoch=5, heartbeat_ms=1000, liveness=5),
    LookupReply(rid=9, directory_epoch=1, holders=[Holder(A, "h:1", 2), Holder("b", "h:2", 1)]),
    LookupReply(holders=[]),
    StatsReply(rid=10, directory_epoch=2, lookups=3, keys_looked_up=9, keys_hit=4, rejected=1,
               instances=[InstanceInfo(instance=A, namespace=NS, address="h:1", epoch=7,
                                       chunks=2, counters={"chunks_pulled": 1})]),
    StatsReply(lookups=0, keys_looked_up=0, keys_hit=0, rejected=0, instances=[],
               refused=[RefusedRegistration(instance=A, namespace=NS, address="h:1", epoch=3,
                                            probe="ff", status=Status.PROBE_MISMATCH,
                                            reason="differs", count=2, age_ms=1500)]),
    SnapshotReply(rid=14, feed_seq=9, feed_endpoint="tcp://127.0.0.1:5", instances=[],
                  holdings=[Holding(A, NS, [K1])], last=True),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: protocol.Message) -> None:
    decoded = protocol.decode(protocol.encode(msg))
    assert decoded == msg
    assert type(decoded) is type(msg)
    assert decoded.v == PROTOCOL_VERSION


def test_every_message_type_is_covered() -> None:
    union_types = set(protocol.Request.__args__) | set(protocol.Reply.__args__)
    assert {type(m) for m in MESSAGES} == union_types


def test_tags_are_short_and_distinct() -> None:
    tags = [msgspec.inspect.type_info(t).tag for t in
            (*protocol.Request.__args__, *protocol.Reply.__args__)]
    assert len(set(tags)) == len(tags)
    assert all(len(tag) <= 6 for tag in tags)


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_is_lookup_tells_lookups_from_their_first_bytes(msg: protocol.Message) -> None:
    assert protocol.is_lookup(protocol.encode(msg)) is isinstance(msg, Lookup)


@pytest.mark.parametrize("data", [b"", b"\x85", b"\xde\x00\x05\xa1t\xa4look", b"garbage!"])
def test_is_lookup_is_false_for_anything_else(data: bytes) -> None:
    assert not protocol.is_lookup(data)


def test_other_version_decodes_so_the_server_can_answer() -> None:
    msg = protocol.decode(protocol.encode(Stats(v=PROTOCOL_VERSION + 1, rid=4)))
    assert msg.v == PROTOCOL_VERSION + 1
    assert "v2" in protocol.version_mismatch_reason(2)
    assert f"v{PROTOCOL_VERSION}" in protocol.version_mismatch_reason(2)


def _raw(**fields: object) -> bytes:
    return msgspec.msgpack.encode(fields)


BAD = {
    "garbage": b"\xc1\xff\x00 not msgpack",
    "empty": b"",
    "truncated": protocol.encode(MESSAGES[2])[:-5],
    "not a map": msgspec.msgpack.encode([1, 2, 3]),
    "no tag": _raw(v=1, rid=1),
    "unknown tag": _raw(t="nope", v=1, rid=1),
    "rid not int": _raw(t="stats", v=1, rid="x"),
    "negative rid": _raw(t="stats", v=1, rid=-1),
    "keys not bytes": _raw(t="look", namespace="ns", keys=[1, 2]),
    "key too long": _raw(t="look", namespace="ns", keys=[b"k" * (MAX_KEY_BYTES + 1)]),
    "empty key": _raw(t="look", namespace="ns", keys=[b""]),
    "too many keys": _raw(t="look", namespace="ns", keys=[b"k"] * (MAX_KEYS_PER_MESSAGE + 1)),
    "publish too many": _raw(t="pub", instance="a", namespace="ns",
                             added=[b"k"] * 60_000, removed=[b"k"] * 50_000),
    "missing field": _raw(t="reg", instance="a", epoch=1, namespace="ns"),
    "bad address": _raw(t="reg", instance="a", epoch=1, namespace="ns", address="no port"),
    "empty instance": _raw(t="unreg", instance=""),
    "counter not int": _raw(t="rep", instance="a", counters={"x": "1"}),
}


@pytest.mark.parametrize("data", BAD.values(), ids=BAD.keys())
def test_decode_refuses_bad_bytes(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode(data)
    assert str(info.value)
    assert isinstance(info.value, ValueError)


def test_decode_refuses_oversized_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.decode(b"\x00" * (MAX_MESSAGE_BYTES + 1))


def test_publish_limit_holds_on_construction_too() -> None:
    with pytest.raises(ValueError):
        Publish(instance=A, namespace=NS, added=[K1] * 60_000, removed=[K2] * 50_000)


def test_peek_header() -> None:
    assert protocol.peek_header(_raw(t="future", v=9, rid=42)) == (9, 42)
    assert protocol.peek_header(b"\xc1garbage") is None
    assert protocol.peek_header(msgspec.msgpack.encode([1])) is None


EVENTS = [
    InstanceJoined(seq=1, directory_epoch=3, instance=A, epoch=2, namespace=NS, address="h:1"),
    InstanceLeft(seq=2, directory_epoch=3, instance=A, epoch=2, why="expired"),
    ChunksChanged(seq=3, directory_epoch=3, instance=A, namespace=NS, added=[K1], removed=[K2],
                  reset=True),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_feed_events_round_trip(event: protocol.FeedEvent) -> None:
    assert protocol.decode_event(protocol.encode(event)) == event


def test_feed_decoder_refuses_requests() -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_event(protocol.encode(Stats()))


def test_every_reply_has_status_and_reason() -> None:
    for msg in MESSAGES:
        if isinstance(msg, protocol.Reply.__args__):
            assert msg.status == (Status.OK if not isinstance(msg, Error) else msg.status)
            assert isinstance(msg.reason, str)


def test_stats_reply_without_refused_decodes_as_empty() -> None:
    # A directory from before StatsReply.refused: its replies still decode (compatible).
    old = {"t": "statsr", "v": PROTOCOL_VERSION, "rid": 1, "instances": [], "lookups": 0,
           "keys_looked_up": 0, "keys_hit": 0, "rejected": 0}
    reply = protocol.decode(msgspec.msgpack.encode(old))
    assert isinstance(reply, StatsReply) and reply.refused == []
