"""Batched heartbeats (``protocol.Heartbeats``, issue 15) against a real directory process:
one message renews many registrations' leases, and each entry is refused alone, as its own
Heartbeat would be (another epoch, another connection's id, a lost publish)."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest
import zmq

from p2pkv.directory import protocol
from p2pkv.directory.protocol import (
    Beat, Error, Heartbeat, Heartbeats, HeartbeatsReply, Ok, Publish, Register, RegisterReply,
    Stats, StatsReply, Status,
)
from p2pkv.directory.registration import RegistrationMachine, RegState
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from tests.test_directory_identity import connect  # noqa: F401 (fixture)
from tests.test_directory_service import Directory, raw_reply

pytestmark = pytest.mark.timeout(60)

NS = Namespace("ns")
HB = 0.2  # lease = 0.2 s x 3
N = 50


@pytest.fixture
def directory(tmp_path: Path):
    d = Directory(tmp_path, "--heartbeat-interval", str(HB), "--liveness", "3",
                  "--max-registrations-per-connection", str(N + 10))
    yield d
    d.stop()


def ask(sock: zmq.Socket, msg) -> protocol.Message:
    return raw_reply(sock, [protocol.encode(msg)])


def inst(i: int) -> InstanceId:
    return InstanceId(f"sim-{i}")


def register(sock: zmq.Socket, i: int, epoch: int = 1) -> None:
    reply = ask(sock, Register(instance=inst(i), epoch=epoch, namespace=NS,
                               address=f"127.0.0.1:{1000 + i}"))
    assert isinstance(reply, RegisterReply), reply


def members(sock: zmq.Socket) -> set[str]:
    reply = ask(sock, Stats())
    assert isinstance(reply, StatsReply)
    return {i.instance for i in reply.instances}


def test_one_message_keeps_many_leases_and_refuses_entries_alone(connect) -> None:  # noqa: F811
    sock, other = connect(), connect()
    for i in range(N):
        register(sock, i)
    key = ChunkKey(b"k" * 32)
    assert isinstance(ask(sock, Publish(instance=inst(1), namespace=NS, added=[key], removed=[],
                                        seq=1, epoch=1)), Ok)
    # three lease lengths of batched heartbeats only: every lease is kept
    beats = [Heartbeat(instance=inst(i), epoch=1, seq=1 if i == 1 else 0) for i in range(N)]
    (msg,) = protocol.batch_heartbeats(beats)
    deadline = time.monotonic() + 3 * 3 * HB
    while time.monotonic() < deadline:
        reply = ask(sock, msg)
        assert isinstance(reply, HeartbeatsReply) and reply.refused == [], reply
        time.sleep(HB / 2)
    assert {f"sim-{i}" for i in range(N)} <= members(sock)
    register(other, N)  # another connection's registration
    # per entry: a wrong epoch, another connection's id, a seq gap, an unknown id
    bad = Heartbeats(beats=[Beat(inst(0), 1), Beat(inst(2), 7), Beat(inst(N), 1),
                            Beat(inst(3), 1, seq=5), Beat(InstanceId("nobody"), 1)])
    reply = ask(sock, bad)
    assert isinstance(reply, HeartbeatsReply)
    assert [r.index for r in reply.refused] == [1, 2, 3, 4]
    for r in reply.refused:  # each refused as its own Heartbeat is, on the same connection
        b = bad.beats[r.index]
        single = ask(sock, Heartbeat(instance=b.instance, epoch=b.epoch, seq=b.seq))
        assert isinstance(single, Error) and single.status == r.status, (r, single)
    assert [r.status for r in reply.refused][1:] == [
        Status.INSTANCE_TAKEN, Status.SEQ_GAP, Status.UNKNOWN_INSTANCE]
    # each entry's answer, as its own Heartbeat would have got it
    answers = dict(protocol.split_heartbeats_reply(bad, reply))
    assert isinstance(answers[inst(0)], Ok)
    assert isinstance(answers[inst(3)], Error) and answers[inst(3)].status == Status.SEQ_GAP
    assert answers[inst(3)].rid == reply.rid
    # a registration whose entries are refused lapses; one renewed in the batch lives on
    deadline = time.monotonic() + 4 * HB
    while time.monotonic() < deadline:
        ask(sock, Heartbeats(beats=[Beat(inst(0), 1), Beat(inst(2), 7)]))
        time.sleep(HB / 2)
    left = members(sock)
    assert "sim-0" in left and "sim-2" not in left


def test_a_machine_takes_its_entrys_answer_unchanged(connect) -> None:  # noqa: F811
    from p2pkv.directory.client import Registration

    sock = connect()
    machines = [RegistrationMachine(Registration(inst(i), 1, NS, f"127.0.0.1:{2000 + i}"))
                for i in range(3)]
    now = 0.0
    rids = iter(range(1, 1000))

    def send(m: RegistrationMachine, req):
        req = msgspec.structs.replace(req, rid=next(rids))  # as DirectoryClient stamps them
        m.on_sent(req, now)
        return ask(sock, req)

    for m in machines:
        (req,) = m.on_tick(now)
        for out in m.on_reply(send(m, req), now):
            assert isinstance(send(m, out), Ok)
        assert m.state is RegState.REGISTERED
    now += 1.0
    beats = [req for m in machines for req in m.on_tick(now)]
    assert all(isinstance(b, Heartbeat) for b in beats) and len(beats) == 3
    (msg,) = protocol.batch_heartbeats(beats)
    reply = ask(sock, msgspec.structs.replace(msg, rid=next(rids)))
    by_instance = {m.registration.instance: m for m in machines}
    for instance, answer in protocol.split_heartbeats_reply(msg, reply):
        assert by_instance[instance].on_reply(answer, now) == []
    assert all(m.state is RegState.REGISTERED for m in machines)


def test_batches_are_split_and_an_older_directory_is_recognised() -> None:
    beats = [Heartbeat(instance=inst(i), epoch=1) for i in range(protocol.MAX_BEATS_PER_MESSAGE
                                                                 + 5)]
    sizes = [len(m.beats) for m in protocol.batch_heartbeats(beats)]
    assert sizes == [protocol.MAX_BEATS_PER_MESSAGE, 5]
    assert len(protocol.encode(protocol.batch_heartbeats(beats)[0])) < 400_000
    # what a directory without Heartbeats answers (it cannot decode the tag)
    with pytest.raises(msgspec.ValidationError) as e:
        msgspec.msgpack.Decoder(protocol.Union[Stats, Ok]).decode(
            protocol.encode(Heartbeats(beats=[])))
    old = Error(status=Status.BAD_REQUEST, reason=f"malformed message: {e.value}")
    assert protocol.heartbeats_unsupported(old)
