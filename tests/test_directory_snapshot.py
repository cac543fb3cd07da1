"""A big Snapshot is sent part by part between request batches (issue 13): a Lookup asked
right after it is answered before the snapshot's last part, and the parts still add up to
the whole state. Real directory process on loopback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from p2pkv.directory import protocol
from p2pkv.directory.protocol import (
    LookupReply, Lookup, Ok, Publish, Register, RegisterReply, Snapshot, SnapshotReply,
)
from p2pkv.directory.server import SNAPSHOT_KEYS_PER_PART
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from tests.test_directory_service import Directory, raw_reply

pytestmark = pytest.mark.timeout(120)

NS = Namespace("ns")
A = InstanceId("a")
PARTS = 8


@pytest.fixture
def sock(tmp_path: Path):
    d = Directory(tmp_path)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(d.endpoint)
    yield s
    s.close()
    ctx.term()
    d.stop()


def test_a_big_snapshot_does_not_hold_a_lookup_back(sock: zmq.Socket) -> None:
    keys = [ChunkKey(i.to_bytes(32, "big")) for i in range(PARTS * SNAPSHOT_KEYS_PER_PART)]
    epoch = time.time_ns()
    assert isinstance(raw_reply(sock, [protocol.encode(Register(
        instance=A, epoch=epoch, namespace=NS, address="127.0.0.1:1"))]), RegisterReply)
    step = protocol.MAX_KEYS_PER_MESSAGE
    for seq, i in enumerate(range(0, len(keys), step), 1):
        assert isinstance(raw_reply(sock, [protocol.encode(Publish(
            instance=A, namespace=NS, added=keys[i:i + step], removed=[], seq=seq,
            epoch=epoch))]), Ok)
    sock.send(protocol.encode(Snapshot(rid=100)))
    sock.send(protocol.encode(Lookup(rid=101, namespace=NS, keys=keys[:4])))
    order, held = [], set()
    t0 = time.monotonic()
    lookup_s = None
    while True:
        assert sock.poll(10_000), "no reply"
        reply = protocol.decode(sock.recv())
        order.append(type(reply).__name__)
        if isinstance(reply, LookupReply):
            lookup_s = time.monotonic() - t0
            assert [(h.instance, h.run) for h in reply.holders] == [(A, 4)]
        elif isinstance(reply, SnapshotReply):
            for h in reply.holdings:
                held.update(h.keys)
            if reply.last:
                break
    assert order.index("LookupReply") < len(order) - 1, order  # before the last part
    assert lookup_s is not None and lookup_s < protocol.HEARTBEAT_INTERVAL_S / 4
    assert order.count("SnapshotReply") == PARTS and held == set(keys)
