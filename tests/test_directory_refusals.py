"""RecentRefusals: the registrations a directory lists as refused (pure; time is passed in)."""

from __future__ import annotations

import pytest

from p2pkv.directory.protocol import Register, Status
from p2pkv.directory.refusals import RecentRefusals
from p2pkv.keys import InstanceId, Namespace

pytestmark = pytest.mark.timeout(60)


def register(name: str, epoch: int = 1) -> Register:
    return Register(instance=InstanceId(name), epoch=epoch, namespace=Namespace("ns"),
                    address="127.0.0.1:1", probe="p")


def test_refusals_are_counted_listed_newest_first_and_age_out() -> None:
    memory = RecentRefusals(memory_s=60.0)
    assert memory.remember(register("a"), Status.PROBE_MISMATCH, "differs", now=0.0)
    assert not memory.remember(register("a"), Status.PROBE_MISMATCH, "differs", now=10.0)
    assert memory.remember(register("b"), Status.STALE_EPOCH, "older", now=20.0)
    listed = memory.recent(now=30.0)
    assert [(r.instance, r.status, r.count, r.age_ms) for r in listed] == [
        ("b", Status.STALE_EPOCH, 1, 10_000), ("a", Status.PROBE_MISMATCH, 2, 20_000)]
    assert [r.instance for r in memory.recent(now=75.0)] == ["b"]


def test_another_status_is_news_and_registering_forgets() -> None:
    memory = RecentRefusals(memory_s=60.0)
    memory.remember(register("a"), Status.PROBE_MISMATCH, "differs", now=0.0)
    assert memory.remember(register("a"), Status.STALE_EPOCH, "older", now=1.0)
    memory.forget(InstanceId("a"))
    assert memory.recent(now=2.0) == []


def test_at_most_limit_are_kept_oldest_dropped() -> None:
    memory = RecentRefusals(memory_s=60.0, limit=2)
    for i, name in enumerate("abc"):
        memory.remember(register(name), Status.PROBE_MISMATCH, "x", now=float(i))
    assert [r.instance for r in memory.recent(now=3.0)] == ["c", "b"]
