"""A sharded, replicated directory with real processes on loopback: split publishes, merged
lookups, failover to a shard's replica when its primary is killed, resync on restart, and
the merged change feed."""

from __future__ import annotations

import hashlib
import signal
import time

import pytest

from p2pkv.directory.lookups import PENDING
from p2pkv.directory.registration import Registration
from p2pkv.directory.ring import ShardId
from p2pkv.directory.shards import ShardedClient, ShardedFeed, ShardSpec, parse_shards
from p2pkv.directory.protocol import LookupReply, Stats, StatsReply
from p2pkv.directory.client import DirectoryClient
from p2pkv.errors import ConfigError
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from p2pkv.sim.processes import DirectoryProcess

pytestmark = pytest.mark.timeout(90)

NS = Namespace("ns")
K = [ChunkKey(hashlib.sha256(b"k%d" % i).digest()) for i in range(40)]


def _runs(client: ShardedClient, keys, timeout_s: float = 1.0):
    rid = client.start_lookup(NS, keys, timeout_s)
    result = client.wait_lookup(rid, timeout_s)
    assert result is not PENDING
    return None if result is None else [(h.instance, h.run) for h in result.holders]


def _chunks(d: DirectoryProcess) -> int:
    c = DirectoryClient(d.endpoint)
    try:
        reply = c.call(Stats(), 2)
        return reply.chunks if isinstance(reply, StatsReply) else -1
    finally:
        c.close()


def _until(predicate, timeout_s: float) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, "condition not met in time"
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.fixture
def shards():
    procs = {}
    for s in ("s0", "s1"):
        for role in ("primary", "replica"):
            d = DirectoryProcess.start(heartbeat_s=0.2, liveness=3)
            d.feed = d.feed_endpoint()
            procs[(s, role)] = d
    yield procs
    for d in procs.values():
        d.stop()


def _specs(procs) -> list[ShardSpec]:
    return [ShardSpec(ShardId(s), procs[(s, "primary")].endpoint, procs[(s, "replica")].endpoint)
            for s in ("s0", "s1")]


def test_kill_a_shard_primary_lookups_fail_over_and_it_resyncs(shards):
    specs = _specs(shards)
    a, b, looker = ShardedClient(specs), ShardedClient(specs), ShardedClient(specs)
    feed = ShardedFeed(specs)
    try:
        a.register(Registration(InstanceId("a"), 1, NS, "127.0.0.1:1"), wait_connected_s=2)
        b.register(Registration(InstanceId("b"), 1, NS, "127.0.0.1:2"), wait_connected_s=2)
        a.publish(K)
        b.publish(K[:20])
        expected = [("a", 40), ("b", 20)]
        _until(lambda: _runs(looker, K) == expected, 5)
        # keys really are split: each shard holds only its share, both processes the same
        s0 = shards[("s0", "primary")]
        n0 = _chunks(s0)
        assert 0 < n0 < 40 and n0 == _chunks(shards[("s0", "replica")])
        assert n0 + _chunks(shards[("s1", "primary")]) == 40  # distinct keys

        s0.kill()
        t0 = time.monotonic()
        for _ in range(20):  # every lookup still answers, correctly, within its deadline
            assert _runs(looker, K, timeout_s=0.5) == expected
        assert time.monotonic() - t0 < 20 * 0.5
        assert looker.failovers > 0

        shards[("s0", "primary")] = s0 = s0.restarted()
        for _ in range(10):  # while it resyncs, its replica answers first: no false misses
            assert _runs(looker, K, timeout_s=0.5) == expected
            time.sleep(0.05)
        resync_s = _until(lambda: _chunks(s0) == n0, 10)
        assert resync_s < 2 * 0.6 + 1.0  # two lease intervals plus reconnecting
        shards[("s0", "replica")].kill()  # now only the restarted primary serves s0
        assert _runs(looker, K, timeout_s=0.5) == expected

        assert feed.sync(5)
        _until(lambda: (feed.poll(0.05) or True) and all(k in feed.holdings.get("a", ())
                                                         for k in K), 5)
        assert set(feed.holders(NS, K[25])) == {"a"}
        assert set(feed.holders(NS, K[5])) == {"a", "b"}
    finally:
        for c in (a, b, looker):
            c.close()
        feed.close()


def test_a_shard_with_no_live_process_fails_the_lookup_at_its_deadline(shards):
    specs = _specs(shards)
    looker = ShardedClient(specs)
    try:
        for role in ("primary", "replica"):
            shards[("s1", role)].kill()
        t0 = time.monotonic()
        assert _runs(looker, K, timeout_s=0.3) is None
        assert time.monotonic() - t0 < 1.0
    finally:
        looker.close()


def test_waiting_for_a_shard_that_does_not_answer_takes_little_cpu(shards):
    """wait_lookup blocks on the asked processes' sockets (and wakes for the failover and
    the deadline) instead of polling them in a sleep loop."""
    specs = _specs(shards)
    looker = ShardedClient(specs)
    try:
        _until(lambda: _runs(looker, K) is not None, 10)  # connected to every process
        for role in ("primary", "replica"):
            shards[("s1", role)].proc.send_signal(signal.SIGSTOP)  # silent, not gone
        rid = looker.start_lookup(NS, K, 0.6)
        cpu0, t0 = time.thread_time(), time.monotonic()
        assert looker.wait_lookup(rid, 1.0) is None
        waited, cpu = time.monotonic() - t0, time.thread_time() - cpu0
        assert 0.5 <= waited < 1.5
        assert cpu < 0.1 * waited, f"{cpu:.3f} s of CPU in a {waited:.3f} s wait"
    finally:
        for role in ("primary", "replica"):
            shards[("s1", role)].proc.send_signal(signal.SIGCONT)
        looker.close()


def test_parse_shards():
    assert parse_shards("s0=tcp://h:1|tcp://h:2,s1=tcp://h:3") == [
        ShardSpec(ShardId("s0"), "tcp://h:1", "tcp://h:2"), ShardSpec(ShardId("s1"), "tcp://h:3")]
    for bad in ("", "s0", "s0=a|b|c", "s0=a,s0=b"):
        with pytest.raises(ConfigError):
            parse_shards(bad)
    assert LookupReply(holders=[]).holders == []


def test_auth_works_per_shard(tmp_path):
    """With a cluster secret every shard process is a CURVE server: a sharded client with the
    secret registers, publishes and looks up; one with a wrong secret gets no answer."""
    from p2pkv.secret import ClusterSecret
    from tests.test_directory_service import Directory

    secret_file = tmp_path / "secret"
    secret_file.write_text("correct horse battery staple 42\n")
    secret_file.chmod(0o600)
    procs = [Directory(tmp_path, "--secret-file", str(secret_file), name=f"d{i}")
             for i in range(4)]
    specs = [ShardSpec(ShardId("s0"), procs[0].endpoint, procs[1].endpoint),
             ShardSpec(ShardId("s1"), procs[2].endpoint, procs[3].endpoint)]
    good = ShardedClient(specs, secret=ClusterSecret(b"correct horse battery staple 42"))
    wrong = ShardedClient(specs, secret=ClusterSecret(b"a wrong secret of enough bytes"))
    try:
        good.register(Registration(InstanceId("a"), 1, NS, "127.0.0.1:1"), wait_connected_s=2)
        good.publish(K)
        _until(lambda: _runs(good, K) == [("a", 40)], 5)
        assert _runs(wrong, K, timeout_s=0.3) is None
    finally:
        good.close()
        wrong.close()
        for d in procs:
            d.stop()
