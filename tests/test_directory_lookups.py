"""Lookups: the directory client's lookups in flight (pure, no I/O; time is passed in)."""

from __future__ import annotations

import pytest

from p2pkv.directory.lookups import PENDING, PURGE_ABOVE, RESULT_GRACE_S, Lookups
from p2pkv.directory.protocol import Error, Holder, LookupReply, Ok, Status
from p2pkv.keys import InstanceId

pytestmark = pytest.mark.timeout(60)

REPLY = LookupReply(rid=1, directory_epoch=5, holders=[Holder(InstanceId("a"), "h:1", 2)])


def test_reply_before_the_deadline_is_the_result_once() -> None:
    table = Lookups()
    table.start(1, deadline=1.0, now=0.0)
    assert table.result(1, 0.5) is PENDING and table.deadline(1) == 1.0
    table.on_reply(REPLY)
    assert table.result(1, 2.0) == REPLY  # polled late, still the answer
    assert table.result(1, 2.0) is None and len(table) == 0


def test_no_reply_by_the_deadline_is_none() -> None:
    table = Lookups()
    table.start(1, deadline=1.0, now=0.0)
    assert table.result(1, 1.0) is None
    table.on_reply(REPLY)
    assert table.result(1, 1.1) is None


def test_a_reply_read_late_counts_and_a_refusal_is_none() -> None:
    table = Lookups()
    table.start(1, deadline=1.0, now=0.0)
    table.on_reply(REPLY)  # read past the deadline, before anyone was told "miss": it counts
    assert table.result(1, 1.6) is REPLY
    table.start(2, deadline=1.0, now=0.0)
    table.on_reply(Error(rid=2, status=Status.BAD_REQUEST))
    assert table.result(2, 0.2) is None


def test_replies_to_other_requests_and_unknown_rids() -> None:
    table = Lookups()
    table.start(1, deadline=1.0, now=0.0)
    table.on_reply(Ok(rid=7))
    assert table.result(1, 0.2) is PENDING and table.result(7, 0.2) is None


def test_a_dropped_lookup_ends_as_none_at_once() -> None:
    table = Lookups()
    table.dropped(3, now=0.0)
    assert table.result(3, 0.0) is None


def test_unpolled_lookups_are_purged_past_their_deadline_or_grace() -> None:
    table = Lookups()
    for rid in range(PURGE_ABOVE):
        table.start(rid, deadline=1.0, now=0.0)
    table.on_reply(LookupReply(rid=0, holders=[]))
    table.start(PURGE_ABOVE, deadline=9.0, now=2.0)
    table.start(PURGE_ABOVE + 1, deadline=9.0, now=2.0)  # above the limit: purge
    assert len(table) == 3  # the answered one is kept for its grace, and the new two
    assert table.result(0, 1.0 + RESULT_GRACE_S) == LookupReply(rid=0, holders=[])
