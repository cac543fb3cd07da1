"""A simulated fleet heartbeats its members in batches (``protocol.Heartbeats``, issue 15):
leases are kept with far fewer messages, each entry's refusal is repaired as its own
Heartbeat's would be, and a directory that does not know the message gets single ones."""

from __future__ import annotations

import time

import pytest
import zmq

from p2pkv.directory import protocol
from p2pkv.directory.client import DirectoryClient
from p2pkv.directory.protocol import (
    Error, Heartbeat, Heartbeats, Ok, Publish, Register, RegisterReply, Stats, StatsReply,
    Status,
)
from p2pkv.keys import InstanceId, Namespace
from p2pkv.sim.directory_view import BlockKeys
from p2pkv.sim.fleet import Fleet
from p2pkv.sim.processes import DirectoryProcess

pytestmark = pytest.mark.timeout(60)

N = 200


@pytest.fixture
def directory():
    d = DirectoryProcess.start(heartbeat_s=0.2, liveness=5)
    yield d
    d.stop()


def _serve(fleet: Fleet, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        fleet.service(0.02)


def test_a_fleet_keeps_every_lease_with_batched_heartbeats(directory):
    keys = BlockKeys(4)
    fleet = Fleet(directory.endpoint, Namespace("t"), [InstanceId(f"i{i}") for i in range(N)],
                  keys_of=lambda i: keys.flat([i]), address_of=lambda i: f"10.0.0.{i}:1")
    admin = DirectoryClient(directory.endpoint)
    try:
        fleet.start(10)
        _serve(fleet, 2.0)  # 2 s = 2 leases: only batched heartbeats keep them
        stats = admin.call(Stats(), 5)
        assert isinstance(stats, StatsReply)
        assert len(stats.instances) == N and stats.expirations == 0
        s = fleet.stats
        assert s.by_kind["Heartbeat"] == 0 and s.by_kind["Heartbeats"] > 0
        assert s.beats >= N * 5 and stats.heartbeats >= N * 5
        assert s.beats / s.by_kind["Heartbeats"] >= 8  # batches, not one message per member
        # an entry refused alone (a lost publish: seq gap) is repaired alone (a snapshot)
        snapshots = s.snapshots
        fleet._members[3].seq += 5
        _serve(fleet, 0.5)
        assert fleet.stats.errors[Status.SEQ_GAP] >= 1
        assert fleet.stats.snapshots >= snapshots + 1
        assert fleet.stats.errors.keys() <= {Status.SEQ_GAP}
    finally:
        fleet.close()
        admin.close()


def test_a_directory_without_batches_gets_single_heartbeats():
    """A fake older directory (ROUTER on loopback) that cannot decode Heartbeats."""
    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    fleet = Fleet(f"tcp://127.0.0.1:{port}", Namespace("t"),
                  [InstanceId(f"i{i}") for i in range(5)], keys_of=lambda i: [],
                  address_of=lambda i: f"10.0.0.{i}:1")
    seen: list[str] = []

    def answer() -> None:
        while router.poll(0):
            peer, data = router.recv_multipart()
            msg = protocol.decode(data)
            seen.append(type(msg).__name__)
            if isinstance(msg, Register):
                reply = RegisterReply(rid=msg.rid, directory_epoch=1, heartbeat_ms=50,
                                      liveness=5)
            elif isinstance(msg, Heartbeats):
                reply = Error(rid=msg.rid, directory_epoch=1, status=Status.BAD_REQUEST,
                              reason="malformed message: Invalid value 'hbs' - at `$[2]`")
            elif isinstance(msg, (Heartbeat, Publish)):
                reply = Ok(rid=msg.rid, directory_epoch=1)
            else:
                continue
            router.send_multipart([peer, protocol.encode(reply)])

    try:
        deadline = time.monotonic() + 10
        while fleet.registered < 5:
            assert time.monotonic() < deadline
            fleet.service(0.01)
            answer()
        end = time.monotonic() + 0.5  # ten heartbeat intervals
        while time.monotonic() < end:
            fleet.service(0.01)
            answer()
        assert not fleet.batch_heartbeats
        assert seen.count("Heartbeats") == 1  # asked once, then one by one
        assert seen.count("Heartbeat") >= 5 * 5
        assert fleet.stats.errors == {}
    finally:
        fleet.close(unregister=False)
        router.close()
