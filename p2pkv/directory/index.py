"""Who holds which chunk keys: the directory's pure in-memory data structure (no I/O).

Called only by ``DirectoryServer``, one thread. Shape: namespace -> key -> holders, where a
holder is a small int *handle* of one registration (instance + epoch) rather than its id
string, and each registration keeps the set of its keys so it can be dropped without a scan.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from p2pkv.directory.protocol import Holder, InstanceInfo
from p2pkv.keys import ChunkKey, InstanceId, Namespace

logger = logging.getLogger(__name__)


class DirectoryIndexError(ValueError):
    """A request the index cannot apply (unknown instance, wrong namespace)."""


@dataclass(slots=True)
class _Member:
    """One registration. NOTE: ``handle`` changes on every re-registration with a new epoch,
    so entries of the previous process can never be mistaken for the new one's."""

    instance: InstanceId
    epoch: int
    namespace: Namespace
    address: str
    handle: int
    keys: set[ChunkKey] = field(default_factory=set)
    counters: dict[str, int] = field(default_factory=dict)


class DirectoryIndex:
    """Registrations, their keys per namespace, and the leading-run lookup."""

    def __init__(self) -> None:
        self._members: dict[InstanceId, _Member] = {}
        self._by_handle: dict[int, _Member] = {}
        # NOTE: holder tuples are tiny (how many peers cache the same chunk) and never empty:
        # a key with no holders left is deleted.
        self._holders: dict[Namespace, dict[ChunkKey, tuple[int, ...]]] = {}
        self._next_handle = 0

    def __len__(self) -> int:
        """Number of registered instances."""
        return len(self._members)

    def register(self, instance: InstanceId, epoch: int, namespace: Namespace,
                 address: str) -> int:
        """Add or refresh an instance; returns how many of its old keys were dropped.

        The same epoch and namespace only updates the address (a repeated Register is
        harmless); a different epoch (restarted process) or namespace starts from no keys.
        """
        old = self._members.get(instance)
        if old is not None and old.epoch == epoch and old.namespace == namespace:
            old.address = address
            return 0
        dropped = self.drop_instance(instance) if old is not None else 0
        member = _Member(instance, epoch, namespace, address, self._next_handle)
        self._next_handle += 1
        self._members[instance] = member
        self._by_handle[member.handle] = member
        logger.info("registered %s epoch %s namespace %s at %s (dropped %s old keys)",
                    instance, epoch, namespace, address, dropped)
        return dropped

    def drop_instance(self, instance: InstanceId) -> int:
        """Forget an instance and all its keys; returns how many keys it held (0 if unknown)."""
        member = self._members.pop(instance, None)
        if member is None:
            return 0
        del self._by_handle[member.handle]
        dropped = len(member.keys)
        self._remove(member, list(member.keys))
        logger.info("dropped %s epoch %s (%s keys)", instance, member.epoch, dropped)
        return dropped

    def publish(self, instance: InstanceId, namespace: Namespace,
                added: Iterable[ChunkKey], removed: Iterable[ChunkKey]) -> None:
        """Apply one Publish: add then remove keys for a registered instance."""
        member = self._member(instance)
        if member.namespace != namespace:
            raise DirectoryIndexError(
                f"instance {instance} is registered in namespace {member.namespace}, "
                f"not {namespace}")
        self._add(member, added)
        self._remove(member, removed)

    def set_counters(self, instance: InstanceId, counters: Mapping[str, int]) -> None:
        """Replace the connector counters last reported by an instance."""
        self._member(instance).counters = dict(counters)

    def chunks(self, instance: InstanceId) -> int:
        """How many keys an instance holds (0 if unknown)."""
        member = self._members.get(instance)
        return len(member.keys) if member is not None else 0

    def instances(self) -> list[InstanceInfo]:
        """Every registration, sorted by instance id."""
        return [InstanceInfo(m.instance, m.namespace, m.address, m.epoch, len(m.keys),
                             dict(m.counters))
                for _, m in sorted(self._members.items())]

    def lookup(self, namespace: Namespace, keys: Sequence[ChunkKey]) -> list[Holder]:
        """Instances holding ``keys[0:run]`` contiguously, run >= 1, longest run first."""
        table = self._holders.get(namespace)
        if not table or not keys:
            return []
        active = table.get(keys[0], ())
        runs: dict[int, int] = {}
        for i in range(1, len(keys)):
            if not active:
                break
            holders = table.get(keys[i], ())
            still = tuple(h for h in active if h in holders)
            for h in active:
                if h not in still:
                    runs[h] = i
            active = still
        for h in active:
            runs[h] = len(keys)
        result = [Holder(self._by_handle[h].instance, self._by_handle[h].address, run)
                  for h, run in runs.items()]
        result.sort(key=lambda holder: (-holder.run, holder.instance))
        return result

    def _member(self, instance: InstanceId) -> _Member:
        member = self._members.get(instance)
        if member is None:
            raise DirectoryIndexError(f"unknown instance {instance} (Register first)")
        return member

    def _add(self, member: _Member, keys: Iterable[ChunkKey]) -> None:
        table = self._holders.setdefault(member.namespace, {})
        for key in keys:
            if key in member.keys:
                continue
            member.keys.add(key)
            table[key] = table.get(key, ()) + (member.handle,)

    def _remove(self, member: _Member, keys: Iterable[ChunkKey]) -> None:
        table = self._holders.get(member.namespace)
        if table is None:
            return
        for key in keys:
            if key not in member.keys:
                continue
            member.keys.discard(key)
            rest = tuple(h for h in table[key] if h != member.handle)
            if rest:
                table[key] = rest
            else:
                del table[key]
        if not table:
            del self._holders[member.namespace]
