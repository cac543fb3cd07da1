"""DirectoryIndex: registrations, publishes and leading-run lookups (pure, no I/O)."""

from __future__ import annotations

import pytest

from p2pkv.directory.index import DirectoryIndex, DirectoryIndexError
from p2pkv.keys import ChunkKey, InstanceId, Namespace

pytestmark = pytest.mark.timeout(30)

NS, OTHER = Namespace("ns"), Namespace("other")
A, B, C = InstanceId("a"), InstanceId("b"), InstanceId("c")
K = [ChunkKey(bytes([i]) * 32) for i in range(8)]


def runs(index: DirectoryIndex, keys: list[ChunkKey], ns: Namespace = NS) -> list[tuple]:
    return [(h.instance, h.address, h.run) for h in index.lookup(ns, keys)]


@pytest.fixture
def index() -> DirectoryIndex:
    index = DirectoryIndex()
    index.register(A, 1, NS, "a:1")
    index.register(B, 1, NS, "b:1")
    return index


def test_lookup_runs_are_leading_and_sorted(index: DirectoryIndex) -> None:
    index.publish(A, NS, K[:2], [])
    index.publish(B, NS, K[:4], [])
    assert runs(index, K[:5]) == [("b", "b:1", 4), ("a", "a:1", 2)]


def test_a_gap_ends_the_run(index: DirectoryIndex) -> None:
    index.publish(A, NS, [K[0], K[1], K[3]], [])
    assert runs(index, K[:4]) == [("a", "a:1", 2)]


def test_keys_not_starting_at_the_first_do_not_count(index: DirectoryIndex) -> None:
    index.publish(A, NS, K[1:4], [])
    assert runs(index, K[:4]) == []
    assert runs(index, K[1:4]) == [("a", "a:1", 3)]


def test_ties_sort_by_instance(index: DirectoryIndex) -> None:
    index.publish(B, NS, K[:3], [])
    index.publish(A, NS, K[:3], [])
    assert runs(index, K[:3]) == [("a", "a:1", 3), ("b", "b:1", 3)]


def test_empty_and_unknown_lookups(index: DirectoryIndex) -> None:
    index.publish(A, NS, K[:3], [])
    assert runs(index, []) == []
    assert runs(index, K[:3], ns=OTHER) == []


def test_namespaces_are_separate(index: DirectoryIndex) -> None:
    index.register(C, 1, OTHER, "c:1")
    index.publish(A, NS, K[:2], [])
    index.publish(C, OTHER, K[:3], [])
    assert runs(index, K[:3]) == [("a", "a:1", 2)]
    assert runs(index, K[:3], ns=OTHER) == [("c", "c:1", 3)]


def test_remove_and_duplicates(index: DirectoryIndex) -> None:
    index.publish(A, NS, K[:3] + K[:3], [])
    assert index.chunks(A) == 3
    index.publish(A, NS, [], [K[1], K[7]])
    assert index.chunks(A) == 2
    assert runs(index, K[:3]) == [("a", "a:1", 1)]


def test_publish_adds_then_removes(index: DirectoryIndex) -> None:
    index.publish(A, NS, [K[0]], [K[0]])
    assert index.chunks(A) == 0


def test_new_epoch_drops_old_entries(index: DirectoryIndex) -> None:
    index.publish(A, NS, K[:3], [])
    index.publish(B, NS, K[:1], [])
    assert index.register(A, 2, NS, "a:2") == 3
    assert index.chunks(A) == 0
    assert runs(index, K[:3]) == [("b", "b:1", 1)]
    index.publish(A, NS, K[:2], [])
    assert runs(index, K[:3]) == [("a", "a:2", 2), ("b", "b:1", 1)]


def test_same_epoch_reregister_keeps_entries_and_updates_address(index: DirectoryIndex) -> None:
    index.publish(A, NS, K[:2], [])
    assert index.register(A, 1, NS, "a:9") == 0
    assert runs(index, K[:2]) == [("a", "a:9", 2)]


def test_new_namespace_drops_old_entries(index: DirectoryIndex) -> None:
    index.publish(A, NS, K[:2], [])
    index.register(A, 1, OTHER, "a:1")
    assert runs(index, K[:2]) == []
    assert index.chunks(A) == 0


def test_unregistered_or_wrong_namespace_publish_errors(index: DirectoryIndex) -> None:
    with pytest.raises(DirectoryIndexError, match="unknown instance"):
        index.publish(C, NS, K[:1], [])
    with pytest.raises(DirectoryIndexError, match="namespace"):
        index.publish(A, OTHER, K[:1], [])
    with pytest.raises(DirectoryIndexError):
        index.set_counters(C, {"x": 1})
    assert index.chunks(C) == 0


def test_drop_instance(index: DirectoryIndex) -> None:
    index.publish(A, NS, K[:3], [])
    index.publish(B, NS, K[:3], [])
    assert index.drop_instance(A) == 3
    assert index.drop_instance(A) == 0
    assert runs(index, K[:3]) == [("b", "b:1", 3)]
    assert len(index) == 1


def test_instances_report_chunks_and_counters(index: DirectoryIndex) -> None:
    index.publish(B, NS, K[:2], [])
    index.set_counters(B, {"chunks_pulled": 5})
    infos = index.instances()
    assert [(i.instance, i.address, i.epoch, i.chunks) for i in infos] == [
        ("a", "a:1", 1, 0), ("b", "b:1", 1, 2)]
    assert infos[1].counters == {"chunks_pulled": 5}


def test_no_storage_left_after_everything_is_dropped(index: DirectoryIndex) -> None:
    index.publish(A, NS, K, [])
    index.publish(B, NS, K, [])
    index.drop_instance(A)
    index.publish(B, NS, [], K)
    assert index._holders == {}
