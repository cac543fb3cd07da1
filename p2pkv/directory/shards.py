"""A sharded, replicated directory as the connector and router see it: the client interface
of one directory over S shards, each a primary and (optionally) a replica process.

Keys are placed by :class:`~p2pkv.directory.ring.HashRing`. Each shard process is an
ordinary directory, and each (shard, process) pair gets an ordinary
:class:`~p2pkv.directory.client.DirectoryClient`, so leases, epochs, seqs, resync and auth
work per shard exactly as they do with one directory: an instance registers with every
process (its keys may land on any shard) and each client keeps its own registration alive.

- :meth:`ShardedClient.publish` splits the keys by shard and sends each part to both of its
  processes.
- :meth:`ShardedClient.start_lookup` splits the keys, asks each shard's primary, asks the
  replica of a shard whose primary has not answered within ``failover_s`` (or is
  unreachable), and merges the shards' runs (``ring.merge_runs``); all within the lookup's
  deadline.
- :class:`ShardedFeed` follows every shard's change feed and offers the part of the
  :class:`~p2pkv.directory.feed.FeedSubscriber` interface the router reads (``holdings``,
  ``instances``, ``sync``, ``poll``, ``wait``).

With one shard and no replica, use ``DirectoryClient`` and ``FeedSubscriber`` directly:
:func:`parse_directory` reads the one configuration string (or list) the connector and the
router take, :func:`connect` and :func:`follow` make the client and the feed it asks for.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import zmq

from p2pkv.directory.auth import Credential
from p2pkv.directory.client import DirectoryClient, wait_readable
from p2pkv.directory.feed import FeedSubscriber
from p2pkv.directory.lookups import PENDING, LookupResult
from p2pkv.directory.registration import Registration
from p2pkv.directory.protocol import FeedEvent, InstanceInfo, LookupReply
from p2pkv.directory.ring import HashRing, ShardAnswer, ShardId, merge_runs
from p2pkv.errors import ConfigError
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from p2pkv.secret import ClusterSecret

DEFAULT_FAILOVER_S = 0.05
"""A shard's primary that has not answered a Lookup this long is asked no more: its replica is."""

DEFAULT_WARMUP_S = 5.0
"""After a shard process restarts (a new ``directory_epoch``) it knows nothing until the
clients have registered and resynced it: its partner is asked first for this long."""


@dataclass(frozen=True, slots=True)
class ShardSpec:
    shard: ShardId
    primary: str
    replica: str | None = None

    @property
    def endpoints(self) -> tuple[str, ...]:
        return (self.primary,) if self.replica is None else (self.primary, self.replica)


def parse_shards(text: str) -> list[ShardSpec]:
    """``s0=tcp://h:1|tcp://h:2,s1=tcp://h:3|tcp://h:4`` (name=primary[|replica], ...)."""
    specs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, ends = part.partition("=")
        endpoints = ends.split("|")
        if not sep or not name or not 1 <= len(endpoints) <= 2 or not all(endpoints):
            raise ConfigError(f"bad shard {part!r}: expected NAME=PRIMARY[|REPLICA]")
        specs.append(ShardSpec(ShardId(name), endpoints[0],
                               endpoints[1] if len(endpoints) > 1 else None))
    if not specs or len({s.shard for s in specs}) != len(specs):
        raise ConfigError(f"no shards, or a shard named twice, in {text!r}")
    return specs


def parse_directory(value: str | Sequence[str]) -> list[ShardSpec]:
    """The connector's ``directory`` and the router's ``--directory``: one endpoint
    (``tcp://h:7420``), or shards as a comma-separated string or a list of
    ``PRIMARY[|REPLICA]`` (named s0, s1, ... in the order given: every instance and the router
    must list them in the same order), or ``parse_shards``'s named form
    (``s0=PRIMARY[|REPLICA],...``). Every endpoint is tcp:// or ipc://."""
    parts = ([p.strip() for p in value.split(",")] if isinstance(value, str)
             else [str(p).strip() for p in value])
    parts = [p for p in parts if p]
    if parts and all("=" in p.split("://", 1)[0] for p in parts):
        specs = parse_shards(",".join(parts))
    else:
        specs = []
        for i, part in enumerate(parts):
            ends = part.split("|")
            if not 1 <= len(ends) <= 2 or not all(ends):
                raise ConfigError(f"bad directory {part!r}: expected PRIMARY[|REPLICA]")
            specs.append(ShardSpec(ShardId(f"s{i}"), ends[0], ends[1] if len(ends) > 1 else None))
    if not specs:
        raise ConfigError(f"no directory endpoint in {value!r}")
    for spec in specs:
        for endpoint in spec.endpoints:
            if not endpoint.startswith(("tcp://", "ipc://")):
                raise ConfigError(f"directory endpoint {endpoint!r} is not tcp:// or ipc://")
    if len({e for s in specs for e in s.endpoints}) != sum(len(s.endpoints) for s in specs):
        raise ConfigError(f"a directory endpoint is named twice in {value!r}")
    return specs


def is_single(specs: Sequence[ShardSpec]) -> bool:
    """One directory process: the plain client and feed serve it."""
    return len(specs) == 1 and specs[0].replica is None


def connect(specs: Sequence[ShardSpec], *, secret: ClusterSecret | None = None,
            credential: Credential | None = None,
            thread_init: Callable[[], None] | None = None) -> DirectoryClient | ShardedClient:
    """The directory client for ``specs``: a ``DirectoryClient`` for one process (exactly as
    without sharding), else a ``ShardedClient``. ``secret``/``credential``: see
    ``DirectoryClient``."""
    if is_single(specs):
        return DirectoryClient(specs[0].primary, secret=secret, credential=credential,
                               thread_init=thread_init)
    return ShardedClient(specs, secret=secret, credential=credential, thread_init=thread_init)


def follow(specs: Sequence[ShardSpec], *,
           secret: ClusterSecret | None = None,
           credential: Credential | None = None) -> FeedSubscriber | ShardedFeed:
    """The change-feed replica for ``specs`` (a ``FeedSubscriber`` for one process)."""
    if is_single(specs):
        return FeedSubscriber(specs[0].primary, secret=secret, credential=credential)
    return ShardedFeed(specs, secret=secret, credential=credential)


@dataclass(slots=True)
class _ShardTry:
    client: DirectoryClient
    rid: int
    done: bool = False


@dataclass(slots=True)
class _Lookup:
    n_keys: int
    parts: dict[ShardId, list[int]]
    keys: list[ChunkKey]
    namespace: Namespace
    deadline: float
    failover_at: float
    tries: dict[ShardId, list[_ShardTry]] = field(default_factory=dict)
    order: dict[ShardId, list[DirectoryClient]] = field(default_factory=dict)
    answers: dict[ShardId, ShardAnswer] = field(default_factory=dict)


class ShardedClient:
    """The lookup, publish and registration calls of ``DirectoryClient`` over shards.

    Lookups are not thread-safe (one thread starts and polls them, as the connector's
    scheduler side does); registration and publishes are, as each client's are."""

    def __init__(self, shards: Sequence[ShardSpec], *, secret: ClusterSecret | None = None,
                 credential: Credential | None = None,
                 failover_s: float = DEFAULT_FAILOVER_S, warmup_s: float = DEFAULT_WARMUP_S,
                 clock: Callable[[], float] = time.monotonic,
                 thread_init: Callable[[], None] | None = None) -> None:
        self.ring = HashRing(s.shard for s in shards)
        self._clock = clock
        self._failover_s = failover_s
        self._warmup_s = warmup_s
        self._epochs: dict[int, tuple[int | None, float]] = {}
        """id(client) -> (last directory_epoch seen, when it changed)."""
        # NOTE: one ZeroMQ context (its I/O thread) for all 2S sockets; terminated in close.
        self._context = zmq.Context()
        self.clients: dict[ShardId, list[DirectoryClient]] = {
            s.shard: [DirectoryClient(e, secret=secret, credential=credential, clock=clock,
                                      thread_init=thread_init, context=self._context)
                      for e in s.endpoints] for s in shards}
        self._rids = itertools.count(1)
        self._lookups: dict[int, _Lookup] = {}
        self.failovers = 0

    def _all(self) -> Iterator[DirectoryClient]:
        return (c for cs in self.clients.values() for c in cs)

    # -- registration -----------------------------------------------------------------------

    def register(self, registration: Registration, wait_connected_s: float = 0.0) -> None:
        for client in self._all():
            client.register(registration, wait_connected_s)

    def publish(self, added: Iterable[ChunkKey] = (), removed: Iterable[ChunkKey] = (), *,
                lease_s: float = 0.0) -> None:
        parts: dict[ShardId, tuple[list[ChunkKey], list[ChunkKey]]] = {
            s: ([], []) for s in self.clients}
        shard_of = self.ring.shard_of
        for k in added:
            parts[shard_of(k)][0].append(k)
        for k in removed:
            parts[shard_of(k)][1].append(k)
        for shard, (a, r) in parts.items():
            if a or r:
                for client in self.clients[shard]:
                    client.publish(a, r, lease_s=lease_s)

    def report(self, counters: Mapping[str, int]) -> None:
        for client in self._all():
            client.report(counters)

    def unregister(self) -> None:
        for client in self._all():
            client.unregister()

    def close(self) -> None:
        for client in self._all():
            client.close()
        self._context.term()

    # -- lookups ----------------------------------------------------------------------------

    def start_lookup(self, namespace: Namespace, keys: Sequence[ChunkKey],
                     timeout_s: float) -> int:
        now = self._clock()
        keys = list(keys)
        entry = _Lookup(len(keys), self.ring.partition(keys), keys, namespace, now + timeout_s,
                        now + min(self._failover_s, timeout_s / 2))
        for shard in entry.parts:
            self._ask(entry, shard, 0)
        rid = next(self._rids)
        self._lookups[rid] = entry
        return rid

    def poll_lookup(self, rid: int) -> LookupResult:
        """The merged LookupReply, PENDING, or None (some shard answered from neither
        process before the deadline). Final results are returned once."""
        entry = self._lookups.get(rid)
        if entry is None:
            return None
        now = self._clock()
        for shard, tries in entry.tries.items():
            if shard in entry.answers:
                continue
            for t in tries:
                if t.done:
                    continue
                result = t.client.poll_lookup(t.rid)
                if isinstance(result, LookupReply) and self._warming(t.client, now):
                    # NOTE: a process that restarted knows nothing until it is resynced:
                    # its "nobody holds it" is not an answer while its partner may be up.
                    if len(tries) < len(self.clients[shard]):
                        t.done = True
                        continue
                if isinstance(result, LookupReply):
                    entry.answers[shard] = ShardAnswer(entry.parts[shard], result.holders)
                    break
                if result is None:
                    t.done = True  # failed or dropped: this process will not answer
            if shard not in entry.answers and len(tries) < len(self.clients[shard]) and (
                    now >= entry.failover_at or all(t.done for t in tries)):
                self.failovers += 1
                self._ask(entry, shard, len(tries))
        if len(entry.answers) == len(entry.parts):
            del self._lookups[rid]
            return LookupReply(holders=merge_runs(entry.n_keys, entry.answers))
        if now >= entry.deadline or any(
                shard not in entry.answers and all(t.done for t in tries)
                and len(tries) == len(self.clients[shard])
                for shard, tries in entry.tries.items()):
            del self._lookups[rid]
            return None
        return PENDING

    def wait_lookup(self, rid: int, max_wait_s: float) -> LookupResult:
        """Like :meth:`poll_lookup` but waits up to ``max_wait_s``: on the sockets of the
        processes still asked (``client.wait_readable``), waking for the failover point
        and the deadline too."""
        give_up = self._clock() + max_wait_s
        while True:
            result = self.poll_lookup(rid)
            now = self._clock()
            if result is not PENDING or now >= give_up:
                return result
            entry = self._lookups[rid]
            wake = min(give_up, entry.deadline)
            if entry.failover_at > now:
                wake = min(wake, entry.failover_at)
            asked = [t.client for shard, tries in entry.tries.items()
                     if shard not in entry.answers for t in tries if not t.done]
            wait_readable(asked, wake - now)

    def _warming(self, client: DirectoryClient, now: float) -> bool:
        """Did this process restart (a new directory_epoch) within ``warmup_s``?"""
        seen, changed = self._epochs.get(id(client), (None, float("-inf")))
        if client.directory_epoch != seen:
            changed = now if seen is not None else changed
            self._epochs[id(client)] = (client.directory_epoch, changed)
        return now < changed + self._warmup_s

    def _order(self, shard: ShardId) -> list[DirectoryClient]:
        """The shard's processes, a recently restarted one last."""
        now = self._clock()
        return sorted(self.clients[shard], key=lambda c: self._warming(c, now))

    def _ask(self, entry: _Lookup, shard: ShardId, which: int) -> None:
        if which == 0:
            entry.order[shard] = self._order(shard)
        client = entry.order[shard][which]
        sub = [entry.keys[p] for p in entry.parts[shard]]
        rid = client.start_lookup(entry.namespace, sub, max(0.0, entry.deadline - self._clock()))
        entry.tries.setdefault(shard, []).append(_ShardTry(client, rid))


class _UnionKeys:
    """One instance's keys over all shards (``key in`` asks the shard that owns the key)."""

    __slots__ = ("_feed", "_instance")

    def __init__(self, feed: ShardedFeed, instance: InstanceId) -> None:
        self._feed, self._instance = feed, instance

    def __contains__(self, key: object) -> bool:
        sub = self._feed.subscribers[self._feed.ring.shard_of(key)]  # type: ignore[arg-type]
        return key in sub.holdings.get(self._instance, ())

    def __iter__(self) -> Iterator[ChunkKey]:
        for sub in self._feed.subscribers.values():
            yield from sub.holdings.get(self._instance, ())


class _Holdings(Mapping[InstanceId, _UnionKeys]):
    def __init__(self, feed: ShardedFeed) -> None:
        self._feed = feed

    def __getitem__(self, instance: InstanceId) -> _UnionKeys:
        if not any(instance in s.holdings for s in self._feed.subscribers.values()):
            raise KeyError(instance)
        return _UnionKeys(self._feed, instance)

    def __iter__(self) -> Iterator[InstanceId]:
        return iter({i for s in self._feed.subscribers.values() for i in s.holdings})

    def __len__(self) -> int:
        return len(set(self))


class ShardedFeed:
    """Every shard's change feed, merged. Each shard is followed at its primary, or at its
    replica when the primary does not answer the snapshot."""

    def __init__(self, shards: Sequence[ShardSpec], *, secret: ClusterSecret | None = None,
                 credential: Credential | None = None) -> None:
        self.ring = HashRing(s.shard for s in shards)
        self._specs = {s.shard: s for s in shards}
        self._secret = secret
        self._credential = credential
        self.subscribers: dict[ShardId, FeedSubscriber] = {
            s.shard: FeedSubscriber(s.primary, secret=secret, credential=credential)
            for s in shards}
        self.holdings = _Holdings(self)

    @property
    def instances(self) -> dict[InstanceId, InstanceInfo]:
        merged: dict[InstanceId, InstanceInfo] = {}
        for sub in self.subscribers.values():
            merged.update(sub.instances)
        return merged

    def sync(self, timeout_s: float = 5.0) -> bool:
        ok = True
        for shard, sub in list(self.subscribers.items()):
            if sub.sync(timeout_s):
                continue
            spec = self._specs[shard]
            if spec.replica is not None:
                sub.close()
                sub = self.subscribers[shard] = FeedSubscriber(
                    spec.replica, secret=self._secret, credential=self._credential)
                if sub.sync(timeout_s):
                    continue
            ok = False
        return ok

    def poll(self, timeout_s: float = 0.0) -> list[FeedEvent]:
        events: list[FeedEvent] = []
        for sub in self.subscribers.values():
            events.extend(sub.poll(timeout_s / len(self.subscribers)))
        return events

    def wait(self, timeout_s: float) -> bool:
        slice_s = timeout_s / len(self.subscribers)
        return any(sub.wait(slice_s) for sub in self.subscribers.values())

    def holders(self, namespace: Namespace, key: ChunkKey) -> list[InstanceId]:
        return self.subscribers[self.ring.shard_of(key)].holders(namespace, key)

    def close(self) -> None:
        for sub in self.subscribers.values():
            sub.close()
