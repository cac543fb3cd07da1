"""Directory identity (issue 13) against a real directory process: an instance id belongs to
the connection that registered it for its lease; every state-changing message names its
epoch; epochs far ahead of the clock are refused; per-connection quotas; a client refused
because another connection holds its id gets in once that lease lapses."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from p2pkv.directory import protocol
from p2pkv.directory.index import DirectoryIndex
from p2pkv.directory.protocol import (
    Error, Heartbeat, Ok, Publish, Register, RegisterReply, Report, StatsReply, Stats, Status,
    Unregister,
)
from p2pkv.errors import DirectoryIndexError
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from tests.test_directory_service import Directory, raw_reply
from tests.test_directory_trust import make, reg, registered, until  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(60)

NS = Namespace("ns")
A = InstanceId("a")
K = [ChunkKey(bytes([i]) * 32) for i in range(4)]
HB = 0.2  # lease = 0.2 s x 3


@pytest.fixture
def directory(tmp_path: Path):
    d = Directory(tmp_path, "--heartbeat-interval", str(HB), "--liveness", "3")
    yield d
    d.stop()


@pytest.fixture
def connect(directory: Directory):
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []

    def _connect() -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(directory.endpoint)
        socks.append(s)
        return s

    yield _connect
    for s in socks:
        s.close()
    ctx.term()


def ask(sock: zmq.Socket, msg) -> protocol.Message:
    return raw_reply(sock, [protocol.encode(msg)])


def register(epoch: int, port: int = 1) -> Register:
    return Register(instance=A, epoch=epoch, namespace=NS, address=f"127.0.0.1:{port}")


def members(sock: zmq.Socket) -> list[tuple]:
    reply = ask(sock, Stats())
    assert isinstance(reply, StatsReply)
    return [(i.instance, i.epoch, i.address, i.chunks) for i in reply.instances]


def test_another_connection_cannot_act_as_a_registered_instance(connect) -> None:
    owner, forger = connect(), connect()
    epoch = time.time_ns()
    assert isinstance(ask(owner, register(epoch)), RegisterReply)
    assert isinstance(ask(owner, Publish(instance=A, namespace=NS, added=K, removed=[],
                                         seq=1, epoch=epoch)), Ok)
    # a forged registration with a higher epoch and the forger's address
    taken = ask(forger, register(epoch + 1, port=666))
    assert isinstance(taken, Error) and taken.status == Status.INSTANCE_TAKEN
    assert 0 < taken.retry_after_ms <= 3 * HB * 1000
    for msg in (Publish(instance=A, namespace=NS, added=[], removed=[], reset=True, seq=1,
                        epoch=epoch),
                Heartbeat(instance=A, epoch=epoch, seq=1),
                Report(instance=A, counters={"x": 1}, epoch=epoch),
                Unregister(instance=A, epoch=epoch)):
        reply = ask(forger, msg)
        assert isinstance(reply, Error) and reply.status == Status.INSTANCE_TAKEN, msg
    assert members(owner) == [(A, epoch, "127.0.0.1:1", len(K))]  # untouched


def test_state_changes_must_name_the_registrations_epoch(connect) -> None:
    sock = connect()
    epoch = time.time_ns()
    assert isinstance(ask(sock, register(epoch)), RegisterReply)
    for msg in (Publish(instance=A, namespace=NS, added=K, removed=[], seq=1),  # no epoch
                Publish(instance=A, namespace=NS, added=K, removed=[], seq=1, epoch=epoch - 1),
                Report(instance=A, counters={}, epoch=epoch - 1),
                Unregister(instance=A, epoch=epoch - 1),  # a replaced process leaving
                Heartbeat(instance=A, epoch=epoch - 1, seq=0)):
        reply = ask(sock, msg)
        assert isinstance(reply, Error) and reply.status == Status.STALE_EPOCH, msg
    assert members(sock) == [(A, epoch, "127.0.0.1:1", 0)]
    assert isinstance(ask(sock, Unregister(instance=A, epoch=epoch)), Ok)
    assert members(sock) == []


def test_an_epoch_far_ahead_of_the_clock_is_refused(connect) -> None:
    sock = connect()
    far = time.time_ns() + int((protocol.MAX_EPOCH_AHEAD_S + 60) * 1e9)
    reply = ask(sock, register(far))
    assert isinstance(reply, Error) and reply.status == Status.BAD_REQUEST
    assert "ahead of the directory's clock" in reply.reason
    assert isinstance(ask(sock, register(time.time_ns() + 10**9)), RegisterReply)  # skew: ok


def test_a_replaced_process_leaving_does_not_unregister_its_successor(connect) -> None:
    old, new = connect(), connect()
    assert isinstance(ask(old, register(1)), RegisterReply)
    # the old process hangs (no heartbeats): once its lease lapsed the new one gets in
    deadline = time.monotonic() + 5
    while not isinstance(reply := ask(new, register(2, port=2)), RegisterReply):
        assert reply.status == Status.INSTANCE_TAKEN and time.monotonic() < deadline
        time.sleep(reply.retry_after_ms / 1000)
    reply = ask(old, Unregister(instance=A, epoch=1))  # then the old one shuts down cleanly
    assert isinstance(reply, Error) and reply.status == Status.STALE_EPOCH
    assert members(new) == [(A, 2, "127.0.0.1:2", 0)]


def test_a_client_refused_for_a_taken_id_gets_in_once_the_lease_lapses(connect, make) -> None:
    squatter = connect()
    assert isinstance(ask(squatter, register(time.time_ns(), port=666)), RegisterReply)
    client = make()
    client.register(reg(A, epoch=time.time_ns(), port=7))
    until(lambda: client.state.name == "REFUSED")
    registered(client, timeout_s=5)  # the squatter never renewed: its lease lapsed
    assert members(squatter) == [(A, client._reg.registration.epoch, "127.0.0.1:7", 0)]


def test_registrations_per_connection_are_capped(connect) -> None:
    sock = connect()
    for i in range(protocol.MAX_REGISTRATIONS_PER_CONNECTION):
        assert isinstance(ask(sock, Register(instance=InstanceId(f"i{i}"), epoch=1,
                                             namespace=NS, address="127.0.0.1:1")),
                          RegisterReply)
    over = ask(sock, Register(instance=InstanceId("one-more"), epoch=1, namespace=NS,
                              address="127.0.0.1:1"))
    assert isinstance(over, Error) and over.status == Status.OVER_QUOTA
    assert isinstance(ask(connect(), Register(instance=InstanceId("one-more"), epoch=1,
                                              namespace=NS, address="127.0.0.1:1")),
                      RegisterReply)  # another connection still may


def test_keys_per_registration_are_capped() -> None:
    index = DirectoryIndex(5.0, max_keys=3)
    index.register(A, 1, NS, "h:1", "", (), 0.0, owner=b"x")
    index.publish(A, NS, 1, False, K[:3], [], 0.0, epoch=1, owner=b"x")
    with pytest.raises(DirectoryIndexError) as e:
        index.publish(A, NS, 2, False, K[3:], [], 0.0, epoch=1, owner=b"x")
    assert e.value.status == Status.OVER_QUOTA
    assert index.member(A).chunks == len(index.keys_of(A)) == 3  # nothing applied
    index.publish(A, NS, 2, True, K[1:4], [], 0.0, epoch=1, owner=b"x")  # a reset: 3 again
