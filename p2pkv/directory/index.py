"""Who holds which chunk keys: the directory's pure in-memory data structure (no I/O).

Called only by ``DirectoryServer``, one thread; time comes in as ``now`` arguments (seconds of
any monotonic clock), so tests drive leases without sleeping.

Shape, chosen for RAM (≤ 200 B per indexed chunk whatever the number of members and holders,
see docs/architecture.md): per namespace one dict key -> *holders*, where a registration is a
small int *handle* of its namespace (reused lowest-first) and a key's holders are either the
one holder's handle (the member's own int object, shared by all its keys) or, for two or
more, the sorted handles packed as uint32 in a ``bytes`` interned per namespace (one object
per distinct holder set, reference-counted). So a chunk costs its key object and its dict
slot, not a bitmask as wide as the handle number nor a slot in a per-member set, and the
table holds no object the cyclic GC would traverse. Members keep only a count of their keys.

Dropping a member (expiry, unregister, replacement, a ``reset`` publish) therefore needs a
scan of its namespace for its handle: the member leaves at once (lookups skip handles of no
member), its handle is *retired*, and a sweep removes retired handles from the table, at
once when the namespace has at most ``SWEEP_KEYS_PER_STEP`` keys, else ``sweep()`` step by
step (the server calls it once per loop turn); a retired handle is reused only after its sweep.
"""

from __future__ import annotations

import heapq
import logging
from array import array
from collections import deque
from itertools import islice
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from p2pkv.directory.protocol import (
    MAX_KEYS_PER_REGISTRATION, MAX_REGISTRATIONS_PER_CONNECTION, TIER_LEASED, TIER_STORE, Holder,
    InstanceInfo, Status,
)
from p2pkv.directory.tiers import apply_publish
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
    chunks: int = 0
    """Keys it holds (the index keeps no set of them: see the module's docstring)."""
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
    leased: dict[ChunkKey, float] = field(default_factory=dict)
    """Issue 14: keys served from leased paged blocks only, and when (the directory's clock)
    each lease ends; every other key is in the host store."""
    quota: bytes = b""
    """Whose quota of registrations it counts against: the instance credential it was
    registered with (a CURVE directory), else its connection (``owner``)."""
    key: str = ""
    """The Z85 CURVE public key it registered with (a CURVE directory; "" otherwise): named
    in its Holders, for the puller to check the data plane's identity against."""


@dataclass(frozen=True, slots=True)
class Registered:
    """Outcome of :meth:`DirectoryIndex.register`."""

    member: Member
    joined: bool
    """False when an identical registration was only refreshed."""
    replaced: Member | None
    """The previous registration of the instance (other epoch or namespace), dropped."""


SWEEP_KEYS_PER_STEP = 2_000
"""Keys one sweep step visits (~0.5 ms here); a namespace this small is swept at once."""

Holders = int | bytes
"""One holder's handle, or two or more sorted handles packed as uint32 (interned)."""

_HANDLE = "I"
assert array(_HANDLE).itemsize == 4


def _unpack(value: bytes) -> list[int]:
    return memoryview(value).cast(_HANDLE).tolist()


def _handles(value: Holders) -> list[int]:
    return [value] if type(value) is int else _unpack(value)  # noqa: E721 - int, not bool


class _Sweep:
    """Removing retired handles from every key of a namespace, a step at a time. Its key
    list is taken when it starts: every key carrying one of its handles existed then (a
    retired handle gains no key)."""

    __slots__ = ("keys", "pos", "handles", "rest")

    def __init__(self, keys: list[ChunkKey], handles: frozenset[int]) -> None:
        self.keys = keys
        self.pos = 0
        self.handles = handles
        self.rest: dict[bytes, list[int]] = {}
        """Packed holders -> the handles left of them (many keys share one holder set)."""


class _Space:
    """One namespace's keys and handles."""

    __slots__ = ("table", "members", "_objs", "_free", "_next", "_canon", "_refs", "retired",
                 "sweep")

    def __init__(self) -> None:
        self.table: dict[ChunkKey, Holders] = {}
        self.members: dict[int, Member] = {}
        """Live registrations by handle (a retired handle is in no entry)."""
        self._objs: dict[int, int] = {}
        """handle -> the one int object stored for it (shared by every key it alone holds)."""
        self._free: list[int] = []  # heap: lowest first
        self._next = 0
        self._canon: dict[bytes, bytes] = {}
        self._refs: dict[bytes, int] = {}
        self.retired: set[int] = set()
        """Handles to sweep, not yet in a sweep."""
        self.sweep: _Sweep | None = None

    @property
    def idle(self) -> bool:
        return not (self.table or self.members or self.retired or self.sweep)

    # -- handles ----------------------------------------------------------------------------

    def take_handle(self, member: Member) -> int:
        if self._free:
            h = heapq.heappop(self._free)
        else:
            h, self._next = self._next, self._next + 1
        self._objs[h] = h
        self.members[h] = member
        return h

    def retire(self, handle: int, chunks: int) -> None:
        """The member with ``handle`` (holding ``chunks`` keys) is gone."""
        del self.members[handle]
        if chunks == 0:
            self._free_handle(handle)
            return
        self.retired.add(handle)
        if self.sweep is None and len(self.table) <= SWEEP_KEYS_PER_STEP:
            while self.step(SWEEP_KEYS_PER_STEP):
                pass

    def _free_handle(self, handle: int) -> None:
        del self._objs[handle]
        heapq.heappush(self._free, handle)

    # -- holders ----------------------------------------------------------------------------

    def _intern(self, handles: list[int]) -> Holders:
        """The stored value for sorted, distinct ``handles`` (counts a reference)."""
        if len(handles) == 1:
            return self._objs[handles[0]]
        packed = array(_HANDLE, handles).tobytes()
        canon = self._canon.get(packed)
        if canon is None:
            self._canon[packed] = packed
            self._refs[packed] = 1
            return packed
        self._refs[canon] += 1
        return canon

    def _release(self, value: bytes) -> None:
        left = self._refs[value] - 1
        if left:
            self._refs[value] = left
        else:
            del self._refs[value], self._canon[value]

    def add(self, key: ChunkKey, handle: int) -> bool:
        """``handle`` holds ``key``; False if it already did."""
        table = self.table
        value = table.get(key)
        if value is None:
            table[key] = self._objs[handle]
            return True
        if type(value) is int:  # noqa: E721
            if value == handle:
                return False
            table[key] = self._intern(sorted((value, handle)))
            return True
        handles = _unpack(value)
        if handle in handles:
            return False
        handles.append(handle)
        handles.sort()
        table[key] = self._intern(handles)
        self._release(value)
        return True

    def remove(self, key: ChunkKey, handle: int) -> bool:
        """``handle`` no longer holds ``key``; False if it did not."""
        table = self.table
        value = table.get(key)
        if value is None:
            return False
        if type(value) is int:  # noqa: E721
            if value != handle:
                return False
            del table[key]
            return True
        handles = _unpack(value)
        if handle not in handles:
            return False
        handles.remove(handle)
        table[key] = self._intern(handles)
        self._release(value)
        return True

    # -- sweeping ---------------------------------------------------------------------------

    def step(self, budget: int) -> bool:
        """Sweep up to ``budget`` keys; True while work is left."""
        if self.sweep is None:
            if not self.retired:
                return False
            self.sweep = _Sweep(list(self.table), frozenset(self.retired))
            self.retired = set()
        job = self.sweep
        table, gone, rest = self.table, job.handles, job.rest
        end = min(len(job.keys), job.pos + budget)
        get = table.get
        # NOTE: a slice, not islice: islice walks the list from its start every step, which
        # made a sweep of n keys O(n^2 / budget) (steps of 1-40 ms under the trace replay)
        for key in job.keys[job.pos:end]:
            value = get(key)
            if value is None:
                continue
            if type(value) is int:  # noqa: E721
                if value in gone:
                    del table[key]
                continue
            left = rest.get(value)
            if left is None:
                left = rest[value] = [h for h in _unpack(value) if h not in gone]
            if len(left) * 4 == len(value):
                continue
            if left:
                table[key] = self._intern(left)
            else:
                del table[key]
            self._release(value)
        job.pos = end
        if end < len(job.keys):
            return True
        for h in job.handles:
            self._free_handle(h)
        self.sweep = None
        return bool(self.retired)

    # -- lookups ----------------------------------------------------------------------------

    def runs(self, keys: Sequence[ChunkKey]) -> dict[int, int]:
        """handle -> length of its leading run of ``keys`` (retired handles included).

        O(len(keys)): a dict probe per key; work beyond that only where the holders change
        (interned values: the same holder set is the same object)."""
        get = self.table.get
        value = get(keys[0])
        if value is None:
            return {}
        active = set(_handles(value))
        runs: dict[int, int] = {}
        prev = value
        i, n = 1, len(keys)
        while i < n:
            value = get(keys[i])
            if value is not prev:
                if value is None:
                    break
                still = active.intersection(_handles(value))
                if len(still) != len(active):
                    for h in active - still:
                        runs[h] = i
                    active = still
                    if not active:
                        break
                prev = value
            i += 1
        for h in active:
            runs[h] = i
        return runs


class HoldingsCursor:
    """Every live member's keys, a part at a time (the parts of a Snapshot reply): the
    members registered when it was made (by instance and epoch), their keys as they are when
    each part is built."""

    def __init__(self, index: DirectoryIndex) -> None:
        self._index = index
        self._allowed = {(m.instance, m.epoch) for m in index.members()}
        self._spaces: deque[Namespace] = deque(sorted(index._spaces))  # noqa: SLF001
        self._namespace: Namespace | None = None
        self._keys: list[ChunkKey] = []
        self._pos = 0

    @property
    def done(self) -> bool:
        return self._pos >= len(self._keys) and not self._spaces

    def next_part(self, room: int) -> list[tuple[Member, list[ChunkKey]]]:
        """(member, keys) pairs with about ``room`` keys in all (at least one key's holders)."""
        out: dict[tuple[Namespace, int], tuple[Member, list[ChunkKey]]] = {}
        taken = 0
        spaces = self._index._spaces  # noqa: SLF001
        while taken < room:
            if self._pos >= len(self._keys):
                if not self._spaces:
                    break
                self._namespace = self._spaces.popleft()
                space = spaces.get(self._namespace)
                self._keys, self._pos = (list(space.table) if space else []), 0
                continue
            space = spaces.get(self._namespace) if self._namespace is not None else None
            if space is None:
                self._keys = []
                continue
            key = self._keys[self._pos]
            value = space.table.get(key)
            if value is not None:
                live = [m for h in _handles(value) if (m := space.members.get(h)) is not None
                        and (m.instance, m.epoch) in self._allowed]
                if taken and taken + len(live) > room:
                    break
                for m in live:
                    out.setdefault((m.namespace, m.handle), (m, []))[1].append(key)
                taken += len(live)
            self._pos += 1
        return list(out.values())


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
        self._spaces: dict[Namespace, _Space] = {}
        self._ns_members: dict[Namespace, set[InstanceId]] = {}
        self._expiries: list[tuple[float, int, Member]] = []
        """Heap of (earliest expiry, tie-break, member). NOTE: a lease only ever moves later,
        so an entry is a lower bound on its member's expiry: ``expire`` pops what is due and
        pushes back members renewed since, instead of scanning every member each tick."""
        self._pushed = 0

    def __len__(self) -> int:
        """Number of registered instances."""
        return len(self._members)

    @property
    def num_chunks(self) -> int:
        """Distinct (namespace, key) entries (while a sweep runs, also keys held only by
        members gone since)."""
        return sum(len(s.table) for s in self._spaces.values())

    @property
    def num_holdings(self) -> int:
        """(chunk, holder) pairs: the members' keys summed."""
        return sum(m.chunks for m in self._members.values())

    @property
    def sweeping(self) -> bool:
        """Retired handles are left to sweep (call :meth:`sweep`)."""
        return any(s.sweep or s.retired for s in self._spaces.values())

    def member(self, instance: InstanceId) -> Member | None:
        return self._members.get(instance)

    def keys_of(self, instance: InstanceId) -> set[ChunkKey]:
        """The keys a member holds: a scan of its namespace (tests and diagnostics)."""
        m = self._members.get(instance)
        if m is None:
            return set()
        table = self._spaces[m.namespace].table
        return {k for k, v in table.items() if m.handle in _handles(v)}

    def holdings(self) -> HoldingsCursor:
        return HoldingsCursor(self)

    def sweep(self, budget: int = SWEEP_KEYS_PER_STEP) -> None:
        """One step of removing departed members' handles from the tables."""
        for ns, space in list(self._spaces.items()):
            if space.sweep or space.retired:
                space.step(budget)
                if space.idle:
                    del self._spaces[ns]
                return

    # -- registrations ----------------------------------------------------------------------

    def register(self, instance: InstanceId, epoch: int, namespace: Namespace, address: str,
                 probe: str, capabilities: Sequence[str], now: float, *,
                 owner: bytes = b"", quota: bytes | None = None, engine: str = "",
                 slice: KVSlice | None = None, spec: str = "", key: str = "") -> Registered:
        """Add, refresh or replace a registration; raises DirectoryIndexError on refusal.

        ``owner``: the connection asking. While the lease runs, only the connection that
        registered an instance may refresh or replace it (INSTANCE_TAKEN, with
        ``retry_after_s``); at most ``max_registrations`` per ``quota`` (OVER_QUOTA; by
        default the connection, with CURVE the instance credential asking).
        ``engine``/``slice``/``spec``: which vLLM engine this worker rank belongs to, the KV
        heads x layers it holds, the namespace's fields in clear. ``key``: the CURVE key
        it registered with (see ``Member.key``)."""
        quota = owner if quota is None else quota
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
        mine = self._owned.get(quota, set())
        if (old is None or old.quota != quota) and len(mine) >= self.max_registrations:
            raise DirectoryIndexError(
                Status.OVER_QUOTA, f"this {'connection' if quota == owner else 'credential'} "
                f"already registers {len(mine)} instances (at most {self.max_registrations})")
        if (old is not None and old.epoch == epoch and old.namespace == namespace
                and old.probe == probe and old.engine == engine and old.slice == slice):
            old.address = address
            old.capabilities = tuple(capabilities)
            old.spec = spec
            old.key = key
            old.expires_at = now + self.lease_s
            return Registered(old, joined=False, replaced=None)
        self._check_probe(instance, namespace, probe)
        self._check_slice(instance, namespace, slice)
        if old is not None:
            self.drop(instance)
        member = Member(instance, epoch, namespace, address, probe, tuple(capabilities),
                        -1, now + self.lease_s, owner=owner, quota=quota, engine=engine,
                        slice=slice, spec=spec, key=key)
        member.handle = self._spaces.setdefault(namespace, _Space()).take_handle(member)
        self._members[instance] = member
        self._push_expiry(member)
        self._owned.setdefault(quota, set()).add(instance)
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
        space = self._spaces[member.namespace]
        space.retire(member.handle, member.chunks)
        if space.idle:
            del self._spaces[member.namespace]
        owned = self._owned[member.quota]
        owned.discard(instance)
        if not owned:
            del self._owned[member.quota]
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
        """Drop every registration whose lease ran out; returns them. O(log n) per member
        due or renewed since its entry, not O(members)."""
        heap = self._expiries
        gone: list[Member] = []
        while heap and heap[0][0] <= now:
            _, _, member = heapq.heappop(heap)
            if self._members.get(member.instance) is not member:
                continue  # dropped or replaced since
            if member.expires_at <= now:
                self.drop(member.instance)
                gone.append(member)
            else:
                self._push_expiry(member)
        return gone

    def _push_expiry(self, member: Member) -> None:
        self._pushed += 1
        heapq.heappush(self._expiries, (member.expires_at, self._pushed, member))

    def set_counters(self, instance: InstanceId, counters: Mapping[str, int],
                     now: float, *, epoch: int | None = None,
                     owner: bytes | None = None) -> None:
        """Replace the connector counters last reported by an instance."""
        self.touch(instance, now, epoch=epoch, owner=owner).counters = dict(counters)

    # -- keys -------------------------------------------------------------------------------

    def publish(self, instance: InstanceId, namespace: Namespace, seq: int, reset: bool,
                added: Sequence[ChunkKey], removed: Iterable[ChunkKey], now: float, *,
                epoch: int | None = None, owner: bytes | None = None,
                lease_s: float = 0.0) -> None:
        """Apply one Publish (reset: drop all keys first). ``lease_s`` > 0: ``added`` are in
        leased paged blocks until ``now + lease_s``; 0: in the host store. Raises SEQ_GAP /
        WRONG_NAMESPACE / UNKNOWN_INSTANCE / STALE_EPOCH / INSTANCE_TAKEN / OVER_QUOTA
        without applying anything."""
        member = self.touch(instance, now, epoch=epoch, owner=owner)
        if member.namespace != namespace:
            raise DirectoryIndexError(
                Status.WRONG_NAMESPACE, f"instance {instance} is registered in namespace "
                f"{member.namespace}, not {namespace}")
        if not reset and seq != member.next_seq:
            raise DirectoryIndexError(
                Status.SEQ_GAP, f"instance {instance} publish seq {seq}, expected "
                f"{member.next_seq}; resend a snapshot")
        if (0 if reset else member.chunks) + len(added) > self.max_keys:
            raise DirectoryIndexError(
                Status.OVER_QUOTA, f"instance {instance} would hold more than "
                f"{self.max_keys} keys")
        member.next_seq = seq + 1
        space = self._spaces[namespace]
        if reset and member.chunks:
            space.retire(member.handle, member.chunks)
            member.handle, member.chunks = space.take_handle(member), 0
        if reset:
            member.leased.clear()
        apply_publish(member.leased, added, removed, now + lease_s if lease_s > 0 else None)
        add, remove, h = space.add, space.remove, member.handle
        n = 0
        for key in added:
            n += add(key, h)
        for key in removed:
            n -= remove(key, h)
        member.chunks += n

    def lookup(self, namespace: Namespace, keys: Sequence[ChunkKey],
               now: float) -> list[Holder]:
        """Instances holding ``keys[0:run]`` contiguously, run >= 1, longest run first, each
        with the tier that serves the run (``Holder.tier``, issue 14).

        O(len(keys)): one dict probe per key, set operations where the holders change; a
        holder with leases out costs one more probe per key of its run.
        """
        space = self._spaces.get(namespace)
        if space is None or not keys:
            return []
        members = space.members
        result = [_holder(m, keys, run, now)
                  for h, run in space.runs(keys).items()
                  if (m := members.get(h)) is not None]
        result.sort(key=lambda holder: (-holder.run, holder.instance))
        return result

    # -- views ------------------------------------------------------------------------------

    def instances(self, now: float) -> list[InstanceInfo]:
        """Every registration, sorted by instance id."""
        return [InstanceInfo(instance=m.instance, namespace=m.namespace, address=m.address,
                             epoch=m.epoch, chunks=m.chunks, counters=dict(m.counters),
                             probe=m.probe, capabilities=list(m.capabilities),
                             lease_left_ms=int((m.expires_at - now) * 1000),
                             engine=m.engine, slice=m.slice, spec=m.spec,
                             leased_chunks=len(m.leased),
                             lease_ends_ms=_ms_left(min(m.leased.values(), default=now), now))
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


def _ms_left(until: float, now: float) -> int:
    return max(0, int((until - now) * 1000))


def _holder(m: Member, keys: Sequence[ChunkKey], run: int, now: float) -> Holder:
    """``m``'s Holder of ``keys[0:run]``: TIER_LEASED until the earliest lease among them
    ends, when any is only leased; else TIER_STORE."""
    ends = None
    if m.leased:
        got = m.leased.get
        for key in keys[:run]:
            until = got(key)
            if until is not None and (ends is None or until < ends):
                ends = until
    if ends is None:
        return Holder(m.instance, m.address, run, m.engine, m.slice, m.epoch, TIER_STORE,
                      key=m.key)
    return Holder(m.instance, m.address, run, m.engine, m.slice, m.epoch, TIER_LEASED,
                  _ms_left(ends, now), key=m.key)
