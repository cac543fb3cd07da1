"""Issue 14: a lookup names the tier that serves (leased paged blocks vs the host store) and
for how long; old peers keep working. Unit tests on the index, the protocol and the shard
merge, and the directory as a real process with real clients."""

from __future__ import annotations

import msgspec
import pytest

from p2pkv.directory import protocol
from p2pkv.directory.cli import print_status
from p2pkv.directory.client import DirectoryClient
from p2pkv.directory.index import DirectoryIndex
from p2pkv.directory.protocol import (
    TIER_LEASED, TIER_STORE, Holder, LookupReply, Publish, Stats, StatsReply,
)
from p2pkv.directory.ring import ShardAnswer, ShardId, merge_runs
from p2pkv.doctor.checks import tier_findings
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from tests.test_directory_index import Seq, reg
from tests.test_directory_service import REG, Directory, registered  # noqa: F401

pytestmark = pytest.mark.timeout(60)

NS = Namespace("ns")
A, B = InstanceId("a"), InstanceId("b")
K = [ChunkKey(bytes([i]) * 32) for i in range(6)]


def tiers(index: DirectoryIndex, keys, now: float) -> list[tuple]:
    return [(h.instance, h.run, h.tier, h.lease_left_ms) for h in index.lookup(NS, keys, now)]


def test_leased_keys_are_named_with_the_earliest_lease_end_until_stored() -> None:
    index, seq = DirectoryIndex(3.0), Seq()
    reg(index, A)
    index.publish(A, NS, seq(A), False, K[:2], (), 0.0)  # the store
    index.publish(A, NS, seq(A), False, K[2:4], (), 0.0, lease_s=10.0)
    index.publish(A, NS, seq(A), False, K[4:5], (), 1.0, lease_s=2.0)
    assert tiers(index, K[:2], 1.5) == [("a", 2, TIER_STORE, 0)]
    assert tiers(index, K[:4], 1.5) == [("a", 4, TIER_LEASED, 8500)]
    assert tiers(index, K[:5], 1.5) == [("a", 5, TIER_LEASED, 1500)]  # earliest of the run
    assert tiers(index, K[:5], 9.0) == [("a", 5, TIER_LEASED, 0)]  # ended: 0, never < 0
    info = index.instances(1.5)[0]
    assert (info.chunks, info.leased_chunks, info.lease_ends_ms) == (5, 3, 1500)
    # the lease ended: K[4] was copied into the store (published again, as stored), K[3]
    # was not (unpublished)
    index.publish(A, NS, seq(A), False, K[4:5], K[3:4], 3.0)
    assert tiers(index, K[:5], 3.0) == [("a", 3, TIER_LEASED, 7000)]
    index.publish(A, NS, seq(A), False, K[2:3], (), 3.0)
    assert tiers(index, K[:3], 3.0) == [("a", 3, TIER_STORE, 0)]
    assert index.instances(3.0)[0].leased_chunks == 0
    # a snapshot (reset) names every key as stored
    index.publish(A, NS, seq(A), False, K[5:6], (), 3.0, lease_s=5.0)
    index.publish(A, NS, 0, True, K[:6], (), 3.0)
    assert tiers(index, K, 3.0) == [("a", 6, TIER_STORE, 0)]


def test_two_holders_each_get_their_own_tier() -> None:
    index, seq = DirectoryIndex(3.0), Seq()
    reg(index, A)
    reg(index, B)
    index.publish(A, NS, seq(A), False, K[:3], (), 0.0, lease_s=4.0)
    index.publish(B, NS, seq(B), False, K[:2], (), 0.0)
    assert tiers(index, K[:3], 1.0) == [("a", 3, TIER_LEASED, 3000), ("b", 2, TIER_STORE, 0)]


class OldPublish(msgspec.Struct, tag_field="t", tag="pub", kw_only=True, frozen=True):
    v: int = protocol.PROTOCOL_VERSION
    rid: int = 0
    instance: str
    namespace: str
    added: list[bytes]
    removed: list[bytes]
    seq: int = 0
    reset: bool = False
    epoch: int = 0

class OldHolder(msgspec.Struct, frozen=True):
    instance: str
    address: str
    run: int
    engine: str = ""
    slice: None = None
    epoch: int = 0

class OldLookupReply(msgspec.Struct, tag_field="t", tag="lookr", kw_only=True, frozen=True):
    v: int = protocol.PROTOCOL_VERSION
    rid: int = 0
    directory_epoch: int = 0
    status: str = "ok"
    reason: str = ""
    holders: list[OldHolder]


def test_old_peers_interoperate() -> None:
    # an older client's Publish (no lease_ms) means the store
    old = msgspec.msgpack.encode(OldPublish(instance="a", namespace="ns", added=[K[0]],
                                            removed=[], seq=1))
    msg = protocol.decode(old)
    assert isinstance(msg, Publish) and msg.lease_ms == 0
    # an older directory's Holder: the tier is not said
    old = msgspec.msgpack.encode(OldLookupReply(holders=[OldHolder("a", "h:1", 2)]))
    reply = protocol.decode(old)
    assert isinstance(reply, LookupReply) and reply.holders[0].tier == ""
    # an older client reads a new LookupReply (unknown fields ignored)
    new = protocol.encode(LookupReply(holders=[Holder("a", "h:1", 2, tier=TIER_LEASED,
                                                      lease_left_ms=5)]))
    assert msgspec.msgpack.decode(new, type=OldLookupReply).holders == [OldHolder("a", "h:1", 2)]


def test_a_lease_beyond_the_limit_is_bad_input() -> None:
    bad = protocol.encode(Publish(instance="a", namespace="ns", added=[K[0]], removed=[],
                                  lease_ms=protocol.MAX_LEASE_MS))
    assert protocol.decode(bad).lease_ms == protocol.MAX_LEASE_MS
    bad = bad.replace(msgspec.msgpack.encode(protocol.MAX_LEASE_MS),
                      msgspec.msgpack.encode(protocol.MAX_LEASE_MS + 1))
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(bad)


def test_shards_merge_to_leased_when_any_shard_says_so() -> None:
    a, b = ShardId("a"), ShardId("b")
    answers = {
        a: ShardAnswer([0, 2], [Holder("x", "h:1", 2, tier=TIER_STORE)]),
        b: ShardAnswer([1, 3], [Holder("x", "h:1", 2, tier=TIER_LEASED, lease_left_ms=700)]),
    }
    (h,) = merge_runs(4, answers)
    assert (h.run, h.tier, h.lease_left_ms) == (4, TIER_LEASED, 700)


def test_status_and_doctor_show_the_tiers(tmp_path) -> None:
    d = Directory(tmp_path)
    a, b, c = DirectoryClient(d.endpoint), DirectoryClient(d.endpoint), DirectoryClient(d.endpoint)
    try:
        a.register(REG(A, port=7001))
        b.register(REG(B, port=7002))
        a.publish(added=K[:2])
        a.publish(added=K[2:4], lease_s=30.0)
        b.publish(added=K[:4])
        registered(a, b)
        # real processes: the lookup names each holder's tier
        import time
        deadline = time.monotonic() + 5
        while True:
            reply = c.wait_lookup(c.start_lookup(NS, K[:4], timeout_s=5), max_wait_s=5)
            if isinstance(reply, LookupReply) and len(reply.holders) == 2:
                break
            assert time.monotonic() < deadline, reply
            time.sleep(0.01)
        got = {h.instance: (h.run, h.tier) for h in reply.holders}
        assert got == {"a": (4, TIER_LEASED), "b": (4, TIER_STORE)}
        left = {h.instance: h.lease_left_ms for h in reply.holders}
        assert 25_000 < left["a"] <= 30_000 and left["b"] == 0
        assert c.wait_lookup(c.start_lookup(NS, K[:2], timeout_s=5), 5).holders[0].tier == \
            TIER_STORE
        s = c.call(Stats(), timeout_s=5)
        assert isinstance(s, StatsReply)
        info = {i.instance: i for i in s.instances}
        assert (info["a"].leased_chunks, info["b"].leased_chunks) == (2, 0)
        import io
        out = io.StringIO()
        print_status(s, d.endpoint, out)
        assert "LEASED" in out.getvalue() and " 2 (" in out.getvalue()
        found = {f.subject.split()[0]: f.detail for f in tier_findings(s.instances)}
        assert "2 of 4 chunk(s) served from leased paged blocks" in found["a"]
        assert "host store (no leases out)" in found["b"]
        # the lease ended, the chunks made it to the store: stored again
        a.publish(added=K[2:4])
        deadline = time.monotonic() + 5
        while c.wait_lookup(c.start_lookup(NS, K[:4], timeout_s=5), 5).holders[0].tier != \
                TIER_STORE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        for x in (a, b, c):
            x.close()
        d.stop()
