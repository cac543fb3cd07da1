"""A sharded directory as the connector and router are configured with it: the one
``directory`` setting (a list of shards) makes the connector's client and the router's feed,
and with real directory processes on loopback a connector's scheduler side finds a holder
across shards; when a shard is killed its lookups end within their deadline and the
prompt is recomputed (nothing hangs), and the router's feed keeps answering."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from p2pkv.directory.client import DirectoryClient
from p2pkv.directory.feed import FeedSubscriber
from p2pkv.directory.registration import Registration
from p2pkv.directory.ring import ShardId
from p2pkv.directory.shards import (
    ShardedClient, ShardedFeed, ShardSpec, connect, follow, parse_directory,
)
from p2pkv.errors import ConfigError
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from p2pkv.sim.processes import DirectoryProcess

pytestmark = pytest.mark.timeout(120)

NS = Namespace("ns")
BLOCK = 4


def test_parse_directory_forms():
    assert parse_directory("tcp://h:1") == [ShardSpec(ShardId("s0"), "tcp://h:1")]
    two = [ShardSpec(ShardId("s0"), "tcp://h:1", "tcp://h:2"), ShardSpec(ShardId("s1"), "tcp://h:3")]
    assert parse_directory("tcp://h:1|tcp://h:2, tcp://h:3") == two
    assert parse_directory(["tcp://h:1|tcp://h:2", "tcp://h:3"]) == two
    assert parse_directory("s0=tcp://h:1|tcp://h:2,s1=tcp://h:3") == two
    for bad in ("", "h:1", "tcp://h:1|", "tcp://h:1,tcp://h:1", "tcp://a|tcp://b|tcp://c"):
        with pytest.raises(ConfigError):
            parse_directory(bad)


def test_connector_config_takes_a_list_of_shards():
    pytest.importorskip("vllm")
    from p2pkv.vllm.config import ConnectorConfig

    one = ConnectorConfig.from_extra_config({"directory": "tcp://127.0.0.1:7420"})
    assert one.directory == "tcp://127.0.0.1:7420" and len(one.shards) == 1
    many = ConnectorConfig.from_extra_config(
        {"directory": ["tcp://127.0.0.1:1|tcp://127.0.0.1:2", "tcp://127.0.0.1:3"]})
    assert [s.endpoints for s in many.shards] == [("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"),
                                                  ("tcp://127.0.0.1:3",)]
    with pytest.raises(ConfigError):
        ConnectorConfig.from_extra_config({"directory": ["tcp://h:1", "h:2"]})
    single, sharded = connect(one.shards), connect(many.shards)
    try:
        assert type(single) is DirectoryClient and isinstance(sharded, ShardedClient)
    finally:
        single.close()
        sharded.close()
    feeds = follow(one.shards), follow(many.shards)
    try:
        assert type(feeds[0]) is FeedSubscriber and isinstance(feeds[1], ShardedFeed)
    finally:
        for f in feeds:
            f.close()


@pytest.fixture
def procs():
    ds = [DirectoryProcess.start(heartbeat_s=0.2, liveness=3) for _ in range(3)]
    yield ds
    for d in ds:
        d.stop()


def _request(blocks: int):
    return SimpleNamespace(request_id="r", block_hashes=[bytes([i + 1]) * 32 for i in range(blocks)],
                           prompt_token_ids=list(range(blocks * BLOCK)))


def _matched(side, req, timeout_s: float) -> int | None:
    """Ask as vLLM's scheduler does, once per step, until an answer (tokens or 0)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tokens, _ = side.get_num_new_matched_tokens(req, 0)
        if tokens is not None:
            return tokens
        time.sleep(0.005)
    return None


def test_scheduler_side_and_router_on_three_shards_one_killed(procs):
    pytest.importorskip("vllm")
    from p2pkv.router.holdings import Holdings
    from p2pkv.vllm.config import ConnectorConfig
    from p2pkv.vllm.scheduler import SchedulerSide

    config = ConnectorConfig.from_extra_config(
        {"directory": [d.endpoint for d in procs], "lookup_timeout_s": 0.3,
         "directory_backoff_s": 0.0})
    holder = connect(config.shards)  # the holder's worker side
    looker = connect(config.shards)  # the puller's scheduler side
    assert isinstance(holder, ShardedClient) and isinstance(looker, ShardedClient)
    holdings = Holdings(",".join(d.endpoint for d in procs))
    req = _request(24)
    keys = [ChunkKey(h) for h in req.block_hashes]
    side = SchedulerSide(config, namespace=NS, block_size=BLOCK, chunk_blocks=1, can_load=True,
                         can_save=True, directory=looker)
    try:
        holder.register(Registration(InstanceId("a"), time.time_ns(), NS, "127.0.0.1:9"),
                        wait_connected_s=2)
        holder.publish(keys)
        on = {looker.ring.shard_of(k) for k in keys}
        assert len(on) == 3  # the prompt's chunks are on every shard
        deadline = time.monotonic() + 10
        while _matched(side, req, 1.0) != len(keys) * BLOCK:
            assert time.monotonic() < deadline, "the holder never showed across the shards"
        holdings.start()
        assert holdings.synced.wait(10)
        deadline = time.monotonic() + 10
        while holdings.run(InstanceId("a"), keys) != len(keys):
            assert time.monotonic() < deadline, "the router's merged feed never showed it"
            time.sleep(0.05)

        victim = looker.ring.shard_of(keys[len(keys) // 2])
        procs[int(victim[1:])].kill()
        t0 = time.monotonic()
        assert _matched(side, req, 2.0) == 0  # the lookup fails: the prompt is recomputed
        assert time.monotonic() - t0 < config.lookup_timeout_s + 0.5
        assert side.counters.lookup_timeouts >= 1
        # the router still answers from its replica of the feed (no wait on the dead shard)
        t0 = time.monotonic()
        holdings.run(InstanceId("a"), keys)
        assert time.monotonic() - t0 < 0.5
        holder.publish(removed=keys[:1])  # a dead shard's share is dropped, not blocking
    finally:
        t0 = time.monotonic()
        holdings.close()
        for c in (holder, looker):
            c.close()
        assert time.monotonic() - t0 < 10  # closing with a dead shard does not hang
