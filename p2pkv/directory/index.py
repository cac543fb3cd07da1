"""Who holds which chunk keys: the directory's pure in-memory data structure (no I/O).

Called only by ``DirectoryServer``, one thread; time comes in as ``now`` arguments (seconds of
any monotonic clock), so tests drive leases without sleeping.

Shape, chosen for RAM (≤ 200 B per indexed chunk, see docs/architecture.md): namespace ->
key -> *holder bitmask*, an int whose bit ``h`` is set when the registration with handle ``h``
holds the key. Handles are small ints, reused lowest-first, so with up to 8 holders the
bitmask is one of CPython's cached small ints and costs no object of its own. Each
registration also keeps the set of its keys (sharing the key objects with the table) so that
dropping it costs O(its keys), not a scan of the namespace.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from p2pkv.directory.protocol import (
    MAX_KEYS_PER_REGISTRATION, MAX_REGISTRATIONS_PER_CONNECTION, Holder, InstanceInfo, Status,
)
from p2pkv.errors import DirectoryIndexError
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from p2pkv.slices import KVSlice

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Member:
    """One registration. NOTE: a new epoch gets a new Member (its handle may be reused only
    after every key bit of the old one was cleared), so entries of a previous process can
    never be mistaken for the new one's."""

    instance: InstanceId
    epoch: int
    namespace: Namespace
    address: str
    probe: str
    capabilities: tuple[str, ...]
    handle: int
    expires_at: float
    next_seq: int = 1
    keys: set[ChunkKey] = field(default_factory=set)
    counters: dict[str, int] = field(default_factory=dict)
    engine: str = ""
    """The vLLM engine this registration (one worker rank) belongs to; "" = ``instance``."""
    slice: KVSlice | None = None
    """The KV heads x layers it holds of each chunk; None = the whole model."""
    spec: str = ""
    """The namespace's fields in clear, as the instance sent them (for ``p2pkv doctor``)."""
    owner: bytes = b""
    """The connection (ZeroMQ routing id) that registered it: only it may change it while
    the lease runs."""


@dataclass(frozen=True, slots=True)
class Registered:
    """Outcome of :meth:`DirectoryIndex.register`."""

    member: Member
    joined: bool
    """False when an identical registration was only refreshed."""
    replaced: Member | None
    """The previous registration of the instance (other epoch or namespace), dropped."""


class DirectoryIndex:
    """Registrations with leases, their keys per namespace, and the leading-run lookup."""

    def __init__(self, lease_s: float, *, max_keys: int = MAX_KEYS_PER_REGISTRATION,
                 max_registrations: int = MAX_REGISTRATIONS_PER_CONNECTION) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.lease_s = lease_s
        self.max_keys = max_keys
        self.max_registrations = max_registrations
        self._owned: dict[bytes, set[InstanceId]] = {}
        self._members: dict[InstanceId, Member] = {}
        self._by_handle: dict[int, Member] = {}
        self._free_handles: list[int] = []  # heap: lowest first keeps bitmasks small
        self._next_handle = 0
        self._tables: dict[Namespace, dict[ChunkKey, int]] = {}
        self._ns_members: dict[Namespace, set[InstanceId]] = {}

    def __len__(self) -> int:
        """Number of registered instances."""
        return len(self._members)

    @property
    def num_chunks(self) -> int:
        """Distinct (namespace, key) entries."""
        return sum(len(t) for t in self._tables.values())

    def member(self, instance: InstanceId) -> Member | None:
        return self._members.get(instance)

    # -- registrations ----------------------------------------------------------------------

    def register(self, instance: InstanceId, epoch: int, namespace: Namespace, address: str,
                 probe: str, capabilities: Sequence[str], now: float, *,
                 owner: bytes = b"", engine: str = "", slice: KVSlice | None = None,
                 spec: str = "") -> Registered:
        """Add, refresh or replace a registration; raises DirectoryIndexError on refusal.

        ``owner``: the connection asking. While the lease runs, only the connection that
        registered an instance may refresh or replace it (INSTANCE_TAKEN, with
        ``retry_after_s``); at most ``max_registrations`` per connection (OVER_QUOTA).
        ``engine``/``slice``/``spec``: which vLLM engine this worker rank belongs to, the KV
        heads x layers it holds, the namespace's fields in clear."""
        old = self._members.get(instance)
        if old is not None and epoch < old.epoch:
            raise DirectoryIndexError(
                Status.STALE_EPOCH, f"instance {instance} epoch {epoch} is older than the "
                f"registered epoch {old.epoch}: a newer process of it is running")
        if old is not None and old.owner != owner and old.expires_at > now:
            raise DirectoryIndexError(
                Status.INSTANCE_TAKEN, f"instance {instance} is registered by another "
                f"connection for {old.expires_at - now:.1f} s more (unless it renews it)",
                retry_after_s=old.expires_at - now)
        mine = self._owned.get(owner, set())
        if (old is None or old.owner != owner) and len(mine) >= self.max_registrations:
            raise DirectoryIndexError(
                Status.OVER_QUOTA, f"this connection already registers {len(mine)} instances "
                f"(at most {self.max_registrations})")
        if (old is not None and old.epoch == epoch and old.namespace == namespace
                and old.probe == probe and old.engine == engine and old.slice == slice):
            old.address = address
            old.capabilities = tuple(capabilities)
            old.spec = spec
            old.expires_at = now + self.lease_s
            return Registered(old, joined=False, replaced=None)
        self._check_probe(instance, namespace, probe)
        self._check_slice(instance, namespace, slice)
        if old is not None:
            self.drop(instance)
        member = Member(instance, epoch, namespace, address, probe, tuple(capabilities),
                        self._take_handle(), now + self.lease_s, owner=owner, engine=engine,
                        slice=slice, spec=spec)
        self._members[instance] = member
        self._owned.setdefault(owner, set()).add(instance)
        self._by_handle[member.handle] = member
        self._ns_members.setdefault(namespace, set()).add(instance)
        logger.info("registered %s epoch %s namespace %s at %s%s", instance, epoch, namespace,
                    address, f" (replacing epoch {old.epoch})" if old is not None else "")
        return Registered(member, joined=True, replaced=old)

    def _check_probe(self, instance: InstanceId, namespace: Namespace, probe: str) -> None:
        for other_id in self._ns_members.get(namespace, ()):
            other = self._members[other_id]
            if other_id != instance and other.probe != probe:
                raise DirectoryIndexError(
                    Status.PROBE_MISMATCH,
                    f"probe hash {probe or '(none)'} of instance {instance} differs from "
                    f"{other.probe or '(none)'} of instance {other_id} in namespace "
                    f"{namespace}: different PYTHONHASHSEED, hash algorithm or KV layout? Their block "
                    f"hashes would never match, so {instance} is refused")

    def _check_slice(self, instance: InstanceId, namespace: Namespace,
                     slice: KVSlice | None) -> None:
        """Slices in one namespace are of one model shape (its totals are in the namespace
        fingerprint, so only a broken peer sends another)."""
        for other_id in self._ns_members.get(namespace, ()):
            other = self._members[other_id].slice
            if other_id != instance and slice and other and not slice.same_model(other):
                raise DirectoryIndexError(
                    Status.BAD_REQUEST, f"slice {slice} of instance {instance} is of another "
                    f"model shape than {other} of instance {other_id} in namespace {namespace}")

    def drop(self, instance: InstanceId) -> Member | None:
        """Forget an instance and all its keys; returns its registration (None if unknown)."""
        member = self._members.pop(instance, None)
        if member is None:
            return None
        self._remove(member, list(member.keys))
        del self._by_handle[member.handle]
        heapq.heappush(self._free_handles, member.handle)
        owned = self._owned[member.owner]
        owned.discard(instance)
        if not owned:
            del self._owned[member.owner]
        names = self._ns_members[member.namespace]
        names.discard(instance)
        if not names:
            del self._ns_members[member.namespace]
        return member

    def unregister(self, instance: InstanceId, epoch: int | None, now: float, *,
                   owner: bytes | None = None) -> Member | None:
        """Drop an instance on its own request: only its registration's epoch (a replaced
        process must not unregister its successor) and connection; unknown is no error."""
        if instance not in self._members:
            return None
        self._live(instance, epoch, owner)
        return self.drop(instance)

    def heartbeat(self, instance: InstanceId, epoch: int, seq: int, now: float, *,
                  owner: bytes | None = None) -> None:
        """Renew a lease; SEQ_GAP when publishes up to ``seq`` did not all arrive."""
        member = self._live(instance, epoch, owner)
        member.expires_at = now + self.lease_s
        if seq != member.next_seq - 1:
            raise DirectoryIndexError(
                Status.SEQ_GAP, f"instance {instance} sent publishes up to {seq}, the "
                f"directory has up to {member.next_seq - 1}; resend a snapshot")

    def touch(self, instance: InstanceId, now: float, *, epoch: int | None = None,
              owner: bytes | None = None) -> Member:
        """Any message from a member renews its lease (``epoch``, ``owner``: checked unless
        None)."""
        member = self._live(instance, epoch, owner)
        member.expires_at = now + self.lease_s
        return member

    def expire(self, now: float) -> list[Member]:
        """Drop every registration whose lease ran out; returns them."""
        gone = [m.instance for m in self._members.values() if m.expires_at <= now]
        return [m for m in (self.drop(i) for i in gone) if m is not None]

    def set_counters(self, instance: InstanceId, counters: Mapping[str, int],
                     now: float, *, epoch: int | None = None,
                     owner: bytes | None = None) -> None:
        """Replace the connector counters last reported by an instance."""
        self.touch(instance, now, epoch=epoch, owner=owner).counters = dict(counters)

    # -- keys -------------------------------------------------------------------------------

    def publish(self, instance: InstanceId, namespace: Namespace, seq: int, reset: bool,
                added: Sequence[ChunkKey], removed: Iterable[ChunkKey], now: float, *,
                epoch: int | None = None, owner: bytes | None = None) -> None:
        """Apply one Publish (reset: drop all keys first). Raises SEQ_GAP / WRONG_NAMESPACE /
        UNKNOWN_INSTANCE / STALE_EPOCH / INSTANCE_TAKEN / OVER_QUOTA without applying
        anything."""
        member = self.touch(instance, now, epoch=epoch, owner=owner)
        if member.namespace != namespace:
            raise DirectoryIndexError(
                Status.WRONG_NAMESPACE, f"instance {instance} is registered in namespace "
                f"{member.namespace}, not {namespace}")
        if not reset and seq != member.next_seq:
            raise DirectoryIndexError(
                Status.SEQ_GAP, f"instance {instance} publish seq {seq}, expected "
                f"{member.next_seq}; resend a snapshot")
        if (0 if reset else len(member.keys)) + len(added) > self.max_keys:
            raise DirectoryIndexError(
                Status.OVER_QUOTA, f"instance {instance} would hold more than "
                f"{self.max_keys} keys")
        member.next_seq = seq + 1
        if reset:
            self._remove(member, list(member.keys))
        self._add(member, added)
        self._remove(member, removed)

    def lookup(self, namespace: Namespace, keys: Sequence[ChunkKey]) -> list[Holder]:
        """Instances holding ``keys[0:run]`` contiguously, run >= 1, longest run first.

        O(len(keys)): one dict probe and a few int operations per key.
        """
        table = self._tables.get(namespace)
        if not table or not keys:
            return []
        get = table.get
        active = get(keys[0], 0)
        runs: dict[int, int] = {}
        i = 1
        n = len(keys)
        while active and i < n:
            still = active & get(keys[i], 0)
            if still != active:
                for h in _bits(active & ~still):
                    runs[h] = i
                active = still
            i += 1
        for h in _bits(active):
            runs[h] = i
        members = self._by_handle
        result = [Holder(m.instance, m.address, run, m.engine, m.slice)
                  for h, run in runs.items() for m in (members[h],)]
        result.sort(key=lambda holder: (-holder.run, holder.instance))
        return result

    # -- views ------------------------------------------------------------------------------

    def instances(self, now: float) -> list[InstanceInfo]:
        """Every registration, sorted by instance id."""
        return [InstanceInfo(instance=m.instance, namespace=m.namespace, address=m.address,
                             epoch=m.epoch, chunks=len(m.keys), counters=dict(m.counters),
                             probe=m.probe, capabilities=list(m.capabilities),
                             lease_left_ms=int((m.expires_at - now) * 1000),
                             engine=m.engine, slice=m.slice, spec=m.spec)
                for _, m in sorted(self._members.items())]

    def members(self) -> Iterator[Member]:
        return iter(list(self._members.values()))

    # -- internals --------------------------------------------------------------------------

    def _live(self, instance: InstanceId, epoch: int | None,
              owner: bytes | None = None) -> Member:
        member = self._members.get(instance)
        if member is None or (epoch is not None and epoch > member.epoch):
            raise DirectoryIndexError(Status.UNKNOWN_INSTANCE,
                                      f"unknown instance {instance} (Register first)")
        if epoch is not None and epoch < member.epoch:
            raise DirectoryIndexError(Status.STALE_EPOCH,
                                      f"instance {instance} epoch {epoch} was replaced by "
                                      f"epoch {member.epoch}")
        if owner is not None and owner != member.owner:
            raise DirectoryIndexError(Status.INSTANCE_TAKEN,
                                      f"instance {instance} is registered by another "
                                      "connection")
        return member

    def _take_handle(self) -> int:
        if self._free_handles:
            return heapq.heappop(self._free_handles)
        self._next_handle += 1
        return self._next_handle - 1

    def _add(self, member: Member, keys: Iterable[ChunkKey]) -> None:
        table = self._tables.setdefault(member.namespace, {})
        bit = 1 << member.handle
        mine = member.keys
        for key in keys:
            if key in mine:
                continue
            mine.add(key)
            table[key] = table.get(key, 0) | bit

    def _remove(self, member: Member, keys: Iterable[ChunkKey]) -> None:
        table = self._tables.get(member.namespace)
        if table is None:
            return
        clear = ~(1 << member.handle)
        mine = member.keys
        for key in keys:
            if key not in mine:
                continue
            mine.discard(key)
            rest = table[key] & clear
            if rest:
                table[key] = rest
            else:
                del table[key]
        if not table:
            del self._tables[member.namespace]


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low
