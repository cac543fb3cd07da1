"""RegistrationMachine: the directory client's registration state machine, without sockets.

Replies and time go in, requests come out; :class:`Link` stands in for the client's socket
(stamps rids, queues or drops, tells the machine which). Time is passed in.
"""

from __future__ import annotations

import msgspec
import pytest

from p2pkv.directory.protocol import (
    HEARTBEAT_INTERVAL_S, MAX_KEYS_PER_MESSAGE, REFUSED_RETRY_INTERVALS, Error, Heartbeat,
    LookupReply, Ok, Publish, Register, RegisterReply, Report, Request, Status, Unregister,
    tick_s,
)
from p2pkv.directory.registration import RegistrationMachine, Registration, RegState
from p2pkv.keys import ChunkKey, InstanceId, Namespace

pytestmark = pytest.mark.timeout(60)

NS = Namespace("ns")
ME = Registration(InstanceId("a"), epoch=7, namespace=NS, address="127.0.0.1:7001",
                  probe="p", capabilities=("tcp",))
K = [ChunkKey(bytes([i]) * 32) for i in range(8)]
EPOCH = 1000
HB = 0.2  # the directory's heartbeat interval in these tests


class Link:
    """The client's side of the socket: numbers requests, queues them while ``up`` (or until
    ``room`` runs out), and reports each outcome to the machine as the client does."""

    def __init__(self) -> None:
        self.up = True
        self.room: int | None = None
        self.sent: list[Request] = []
        self._rid = 0

    def __call__(self, machine: RegistrationMachine, msgs: list[Request],
                 now: float) -> list[Request]:
        queued: list[Request] = []
        for msg in msgs:
            self._rid += 1
            if not self.up or self.room == 0:
                machine.on_dropped()
                break
            if self.room is not None:
                self.room -= 1
            msg = msgspec.structs.replace(msg, rid=self._rid)
            machine.on_sent(msg, now)
            queued.append(msg)
        self.sent += queued
        return queued


@pytest.fixture
def link() -> Link:
    return Link()


@pytest.fixture
def machine(link: Link) -> RegistrationMachine:
    return RegistrationMachine(ME, can_send=lambda: link.up)


def ok_reply(to: Request, epoch: int = EPOCH, heartbeat_s: float = HB) -> RegisterReply:
    return RegisterReply(rid=to.rid, directory_epoch=epoch, heartbeat_ms=int(heartbeat_s * 1000),
                         liveness=3)


def error(to: Request, status: str, reason: str = "no", epoch: int = EPOCH) -> Error:
    return Error(rid=to.rid, directory_epoch=epoch, status=status, reason=reason)


def registered(machine: RegistrationMachine, link: Link, now: float = 0.0) -> list[Request]:
    """Register and get registered; returns what the RegisterReply made the machine send."""
    [register] = link(machine, machine.on_tick(now), now)
    assert isinstance(register, Register)
    out = link(machine, machine.on_reply(ok_reply(register), now), now)
    assert machine.state is RegState.REGISTERED
    return out


def keys_of(publishes: list[Request]) -> set[ChunkKey]:
    return {k for p in publishes if isinstance(p, Publish) for k in p.added}


# -- registering --------------------------------------------------------------------------


def test_first_tick_sends_register_with_the_registration(machine, link) -> None:
    assert machine.state is RegState.UNREGISTERED
    [msg] = link(machine, machine.on_tick(0.0), 0.0)
    assert msg == Register(rid=msg.rid, instance=ME.instance, epoch=7, namespace=NS,
                           address="127.0.0.1:7001", probe="p", capabilities=["tcp"])
    assert machine.state is RegState.REGISTERING


def test_register_is_retried_every_interval_until_answered(machine, link) -> None:
    link(machine, machine.on_tick(0.0), 0.0)
    assert machine.on_tick(HEARTBEAT_INTERVAL_S - 0.01) == []
    [again] = link(machine, machine.on_tick(HEARTBEAT_INTERVAL_S), HEARTBEAT_INTERVAL_S)
    assert isinstance(again, Register)


def test_a_dropped_register_is_retried_at_the_next_tick(machine, link) -> None:
    link.up = False
    assert link(machine, machine.on_tick(0.0), 0.0) == []
    assert machine.state is RegState.UNREGISTERED
    link.up = True
    [msg] = link(machine, machine.on_tick(0.05), 0.05)
    assert isinstance(msg, Register)


def test_register_reply_registers_and_sends_the_snapshot_of_keys_recorded_before(
        machine, link) -> None:
    assert machine.publish(K[:3]) == []  # not registered: recorded only
    out = registered(machine, link)
    assert [type(m) for m in out] == [Publish]
    assert out[0].reset and out[0].seq == 1 and set(out[0].added) == set(K[:3])
    assert machine.directory_epoch == EPOCH and machine.heartbeat_s == HB
    assert machine.resyncs == 1 and machine.refused_reason is None


def test_a_reply_to_an_older_register_does_not_register(machine, link) -> None:
    [first] = link(machine, machine.on_tick(0.0), 0.0)
    link(machine, machine.on_tick(1.0), 1.0)
    assert machine.on_reply(ok_reply(first), 1.0) == []
    assert machine.state is RegState.REGISTERING


def test_other_replies_while_registering_change_nothing(machine, link) -> None:
    [register] = link(machine, machine.on_tick(0.0), 0.0)
    assert machine.on_reply(LookupReply(rid=register.rid + 5, directory_epoch=EPOCH,
                                        holders=[]), 0.1) == []
    assert machine.on_reply(Ok(rid=register.rid + 6, directory_epoch=EPOCH), 0.1) == []
    assert machine.state is RegState.REGISTERING


# -- heartbeats and publishes -------------------------------------------------------------


def test_heartbeats_every_interval_from_the_register_reply(machine, link) -> None:
    registered(machine, link, now=0.0)
    assert machine.on_tick(HB - 0.01) == []
    [hb] = link(machine, machine.on_tick(HB), HB)
    assert hb == Heartbeat(rid=hb.rid, instance=ME.instance, epoch=7, seq=1)
    assert machine.on_tick(HB + 0.1) == []
    [hb2] = link(machine, machine.on_tick(2 * HB + 0.05), 2 * HB + 0.05)
    assert isinstance(hb2, Heartbeat)


def test_tick_is_a_quarter_interval_within_10_to_250_ms(machine, link) -> None:
    assert machine.tick_s == tick_s(HEARTBEAT_INTERVAL_S) == 0.25
    registered(machine, link)
    assert machine.tick_s == pytest.approx(HB / 4)
    assert tick_s(0.01) == 0.01 and tick_s(10.0) == 0.25


def test_publish_numbers_messages_and_the_heartbeat_carries_the_last_seq(machine, link) -> None:
    registered(machine, link)
    [p2] = link(machine, machine.publish(K[3:5], []), 0.05)
    [p3] = link(machine, machine.publish([], K[3:4]), 0.06)
    assert (p2.seq, p2.reset, p2.added, p2.removed) == (2, False, K[3:5], [])
    assert (p3.seq, p3.added, p3.removed) == (3, [], K[3:4])
    [hb] = link(machine, machine.on_tick(HB), HB)
    assert isinstance(hb, Heartbeat) and hb.seq == 3
    assert machine.keys == {K[4]}


def test_publish_splits_at_max_keys_per_message(machine, link) -> None:
    registered(machine, link)
    many = [ChunkKey(i.to_bytes(32, "big")) for i in range(MAX_KEYS_PER_MESSAGE + 1)]
    out = link(machine, machine.publish(many, K[:1]), 0.1)
    assert [(len(p.added), len(p.removed), p.seq) for p in out] == [
        (MAX_KEYS_PER_MESSAGE, 0, 2), (1, 1, 3)]


def test_report_is_kept_and_resent_after_registering(machine, link) -> None:
    assert machine.report({"pulled": 1}) == []
    out = registered(machine, link)
    assert [type(m) for m in out] == [Publish, Report]
    assert out[1].counters == {"pulled": 1}
    [rep] = link(machine, machine.report({"pulled": 2}), 0.1)
    assert isinstance(rep, Report) and rep.counters == {"pulled": 2}


def test_leave_is_an_unregister() -> None:
    assert RegistrationMachine(ME).leave() == Unregister(instance=ME.instance, epoch=ME.epoch)


# -- repairs: seq gaps, drops, restarts ---------------------------------------------------


def test_seq_gap_resends_the_whole_key_set_as_a_snapshot(machine, link) -> None:
    machine.publish(K[:2])
    registered(machine, link)
    [p] = link(machine, machine.publish(K[2:3]), 0.05)
    out = link(machine, machine.on_reply(error(p, Status.SEQ_GAP, "gap"), 0.06), 0.06)
    assert [type(m) for m in out] == [Publish]
    assert out[0].reset and out[0].seq == p.seq + 1 and set(out[0].added) == set(K[:3])
    assert machine.resyncs == 2


def test_seq_gap_answering_a_publish_before_the_snapshot_is_ignored(machine, link) -> None:
    registered(machine, link)
    [p] = link(machine, machine.publish(K[:1]), 0.05)
    link(machine, machine.on_reply(error(p, Status.SEQ_GAP), 0.06), 0.06)  # snapshot sent
    assert machine.on_reply(error(p, Status.SEQ_GAP), 0.07) == []  # the same gap again
    assert machine.resyncs == 2


def test_seq_gap_snapshot_comes_before_a_due_heartbeat_with_its_seq(machine, link) -> None:
    registered(machine, link)
    [p] = link(machine, machine.publish(K[:1]), 0.05)
    out = link(machine, machine.on_reply(error(p, Status.SEQ_GAP), HB), HB)
    assert [type(m) for m in out] == [Publish, Heartbeat]
    assert out[0].reset and out[1].seq == out[0].seq


def test_a_dropped_publish_makes_a_snapshot_due(machine, link) -> None:
    machine.publish(K[:1])
    registered(machine, link)
    link.room = 0
    assert link(machine, machine.publish(K[1:2]), 0.05) == []
    assert machine.seq == 1  # the lost publish's seq is reused
    link.room = None
    out = link(machine, machine.on_tick(0.06), 0.06)
    assert [type(m) for m in out] == [Publish]
    assert out[0].reset and out[0].seq == 2 and set(out[0].added) == set(K[:2])


def test_a_batch_dropped_halfway_is_repaired_by_a_snapshot(machine, link) -> None:
    registered(machine, link)
    many = [ChunkKey(i.to_bytes(32, "big")) for i in range(MAX_KEYS_PER_MESSAGE + 1)]
    link.room = 1
    [first] = link(machine, machine.publish(many), 0.05)
    assert first.seq == 2 and machine.seq == 2
    link.room = None
    [snap, *rest] = link(machine, machine.on_tick(0.06), 0.06)
    assert snap.reset and snap.seq == 3 and len(rest) == 1


def test_no_snapshot_is_built_while_the_link_is_down(machine, link) -> None:
    registered(machine, link)
    [p] = link(machine, machine.publish(K[:1]), 0.05)
    link.up = False
    assert machine.on_reply(error(p, Status.SEQ_GAP), 0.06) == []
    assert machine.on_tick(0.1) == [] and machine.publish(K[1:2]) == []
    assert machine.resyncs == 1
    link.up = True
    [snap] = link(machine, machine.on_tick(0.15), 0.15)
    assert snap.reset and set(snap.added) == set(K[:2]) and machine.resyncs == 2


def test_new_directory_epoch_reregisters_and_republishes(machine, link) -> None:
    machine.publish(K[:2])
    machine.report({"pulled": 3})
    registered(machine, link)
    [reg2] = link(machine, machine.on_reply(Ok(rid=99, directory_epoch=EPOCH + 1), 0.5), 0.5)
    assert isinstance(reg2, Register) and machine.state is RegState.REGISTERING
    out = link(machine, machine.on_reply(ok_reply(reg2, epoch=EPOCH + 1), 0.6), 0.6)
    assert [type(m) for m in out] == [Publish, Report]
    assert out[0].reset and set(out[0].added) == set(K[:2])
    assert machine.directory_epoch == EPOCH + 1 and machine.resyncs == 2


def test_unknown_instance_reregisters(machine, link) -> None:
    registered(machine, link)
    [hb] = link(machine, machine.on_tick(HB), HB)
    [again] = link(machine, machine.on_reply(error(hb, Status.UNKNOWN_INSTANCE), HB), HB)
    assert isinstance(again, Register) and machine.state is RegState.REGISTERING


def test_errors_answering_an_older_registration_are_ignored(machine, link) -> None:
    registered(machine, link)
    [hb] = link(machine, machine.on_tick(HB), HB)
    [again] = link(machine, machine.on_reply(error(hb, Status.UNKNOWN_INSTANCE), HB), HB)
    assert machine.on_reply(error(hb, Status.STALE_EPOCH), HB) == []
    assert machine.state is RegState.REGISTERING


# -- refusals -----------------------------------------------------------------------------


def test_stale_epoch_is_refused_and_retried_every_ten_intervals(machine, link) -> None:
    # NOTE: not for good (issue 13): the newer epoch may have been a member's forgery,
    # whose lease lapses once it stops renewing it
    [register] = link(machine, machine.on_tick(0.0), 0.0)
    machine.on_reply(error(register, Status.STALE_EPOCH, "epoch 7 is older"), 0.0)
    assert machine.state is RegState.REFUSED and "older" in machine.refused_reason
    retry = REFUSED_RETRY_INTERVALS * HEARTBEAT_INTERVAL_S
    assert machine.on_tick(retry - 0.01) == []
    assert machine.publish(K[:4]) == []  # recorded, not sent while refused
    assert K[3] in machine.keys
    [again] = machine.on_tick(retry)
    assert isinstance(again, Register)


def test_instance_taken_is_retried_when_the_other_lease_lapses(machine, link) -> None:
    [register] = link(machine, machine.on_tick(0.0), 0.0)
    taken = Error(rid=register.rid, directory_epoch=EPOCH, status=Status.INSTANCE_TAKEN,
                  reason="registered by another connection", retry_after_ms=3000)
    machine.on_reply(taken, 0.0)
    assert machine.state is RegState.REFUSED
    assert machine.on_tick(3.0) == []  # not before the lease has lapsed
    [again] = link(machine, machine.on_tick(3.0 + HEARTBEAT_INTERVAL_S / 2), 3.5)
    assert isinstance(again, Register)
    assert machine.on_reply(ok_reply(again), 3.5)  # registered: the snapshot goes out
    assert machine.state is RegState.REGISTERED


def test_stale_epoch_while_registered_refuses(machine, link) -> None:
    registered(machine, link)
    [hb] = link(machine, machine.on_tick(HB), HB)
    machine.on_reply(error(hb, Status.STALE_EPOCH), HB)
    assert machine.state is RegState.REFUSED and machine.on_tick(HB + 1) == []


def test_probe_mismatch_is_retried_every_ten_intervals(machine, link) -> None:
    [register] = link(machine, machine.on_tick(0.0), 0.0)
    machine.on_reply(error(register, Status.PROBE_MISMATCH, "probe differs"), 0.0)
    assert machine.state is RegState.REFUSED and machine.refused_reason == "probe differs"
    retry = REFUSED_RETRY_INTERVALS * HEARTBEAT_INTERVAL_S
    assert machine.on_tick(retry - 0.01) == []
    [again] = link(machine, machine.on_tick(retry), retry)
    assert isinstance(again, Register) and machine.state is RegState.REFUSED
    machine.on_reply(error(again, Status.PROBE_MISMATCH, "probe differs"), retry)
    assert machine.on_tick(2 * retry - 0.01) == []
    [third] = link(machine, machine.on_tick(2 * retry), 2 * retry)
    link(machine, machine.on_reply(ok_reply(third), 2 * retry), 2 * retry)
    assert machine.state is RegState.REGISTERED and machine.refused_reason is None


def test_other_refusals_retry_after_one_interval(machine, link) -> None:
    [register] = link(machine, machine.on_tick(0.0), 0.0)
    machine.on_reply(error(register, Status.VERSION, "v9"), 0.0)
    assert machine.state is RegState.UNREGISTERED
    assert machine.on_tick(HEARTBEAT_INTERVAL_S - 0.01) == []
    [again] = link(machine, machine.on_tick(HEARTBEAT_INTERVAL_S), HEARTBEAT_INTERVAL_S)
    assert isinstance(again, Register)
