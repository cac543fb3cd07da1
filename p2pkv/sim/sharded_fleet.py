"""A fleet of simulated instances on a sharded, replicated directory.

The trace bench's counterpart of ``directory/shards.py``: every instance registers on every
shard's primary and replica (its keys may land on any shard), a publish goes to both
processes of each shard that owns some of its keys, and a Lookup is split by shard, sent to
each primary, sent again to the replica of a shard whose primary has not answered within
``failover_s`` (or could not be reached), and merged (``ring.merge_runs``). Same interface
as :class:`~p2pkv.sim.fleet.Fleet` as far as the policies use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import zmq

from p2pkv.directory.protocol import LookupReply
from p2pkv.directory.ring import HashRing, ShardAnswer, ShardId, merge_runs
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from p2pkv.sim.fleet import Fleet, FleetStats


@dataclass(frozen=True, slots=True)
class ShardEndpoints:
    shard: ShardId
    primary: str
    replica: str | None = None


class ShardedFleet:
    def __init__(self, shards: Sequence[ShardEndpoints], namespace: Namespace,
                 instances: Sequence[InstanceId], *, keys_of: Callable[[int], list[ChunkKey]],
                 address_of: Callable[[int], str], failover_s: float = 0.05,
                 warmup_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ring = HashRing([s.shard for s in shards])
        self._clock = clock
        self._failover_s = failover_s
        self._warmup_s = warmup_s
        epoch = time.time_ns()
        self.fleets: dict[ShardId, list[Fleet]] = {}
        for s in shards:
            def mine(i: int, shard: ShardId = s.shard) -> list[ChunkKey]:
                return [k for k in keys_of(i) if self.ring.shard_of(k) == shard]

            self.fleets[s.shard] = [Fleet(endpoint, namespace, instances, keys_of=mine,
                                          address_of=address_of, epoch=epoch, clock=clock)
                                    for endpoint in (s.primary, s.replica) if endpoint]
        self._all = [f for fs in self.fleets.values() for f in fs]
        self.last_lookup_s = 0.0
        self.lookup_rtts: list[float] = []
        self.lookups_failed = 0
        self.failovers = 0

    @property
    def stats(self) -> FleetStats:
        """The sub-fleets' traffic summed; lookups counted once, at this level."""
        total = FleetStats()
        for f in self._all:
            s = f.stats
            total.sent += s.sent
            total.sent_bytes += s.sent_bytes
            total.received += s.received
            total.received_bytes += s.received_bytes
            total.by_kind.update(s.by_kind)
            total.errors.update(s.errors)
            total.snapshots += s.snapshots
            total.beats += s.beats
        total.registrations = min(f.stats.registrations for f in self._all)
        total.lookup_rtts = self.lookup_rtts
        total.lookups_failed = self.lookups_failed
        return total

    @property
    def registered(self) -> int:
        return min(f.registered for f in self._all)

    def start(self, timeout_s: float) -> None:
        for f in self._all:
            f.start(timeout_s)

    def service(self, wait_s: float = 0.0) -> None:
        share = wait_s / len(self._all)
        for f in self._all:
            f.service(share)

    def close(self) -> None:
        for f in self._all:
            f.close()

    def publish(self, idx: int, added: list[ChunkKey], removed: list[ChunkKey]) -> None:
        shard_of = self.ring.shard_of
        parts: dict[ShardId, tuple[list[ChunkKey], list[ChunkKey]]] = {}
        for k in added:
            parts.setdefault(shard_of(k), ([], []))[0].append(k)
        for k in removed:
            parts.setdefault(shard_of(k), ([], []))[1].append(k)
        for shard, (a, r) in parts.items():
            for f in self.fleets[shard]:
                f.publish(idx, a, r)

    def lookup(self, keys: Sequence[ChunkKey], timeout_s: float) -> LookupReply | None:
        """Split, ask each shard (failing over to its replica), merge; None only when some
        shard answered from neither process within ``timeout_s``."""
        t0 = time.perf_counter()
        now = self._clock()
        deadline, failover_at = now + timeout_s, now + min(self._failover_s, timeout_s / 2)
        parts = self.ring.partition(keys)
        asked: dict[ShardId, list[tuple[Fleet, int]]] = {}
        order: dict[ShardId, list[Fleet]] = {}
        for shard, positions in parts.items():
            fleets = list(self.fleets[shard])
            # NOTE: a restarted process answers "nobody" until the clients have resynced
            # it; its partner answers first meanwhile.
            if len(fleets) > 1 and now < fleets[0].restarted_at + self._warmup_s:
                fleets.reverse()
            order[shard] = fleets
            rid = fleets[0].start_lookup([keys[p] for p in positions])
            asked[shard] = [(fleets[0], rid)] if rid >= 0 else []
        answers: dict[ShardId, ShardAnswer] = {}
        failed_over: set[ShardId] = set()
        poller = zmq.Poller()
        for f in self._all:
            poller.register(f.socket, zmq.POLLIN)
        while True:
            for shard, tries in asked.items():
                if shard in answers:
                    continue
                for f, rid in tries:
                    reply = f.poll_lookup(rid)
                    if (reply is not None and shard not in failed_over
                            and len(order[shard]) > 1
                            and self._clock() < f.restarted_at + self._warmup_s):
                        reply = None  # restarted, not yet resynced: ask its partner
                        failover_at = self._clock()
                    if reply is not None:
                        answers[shard] = ShardAnswer(parts[shard], reply.holders)
                        break
            if len(answers) == len(parts):
                break
            now = self._clock()
            if now >= deadline:
                self.lookups_failed += 1
                return None
            if now >= failover_at or any(not t for s, t in asked.items() if s not in answers):
                for shard, tries in asked.items():
                    fleets = order[shard]
                    if shard not in answers and shard not in failed_over and len(fleets) > 1:
                        failed_over.add(shard)
                        rid = fleets[1].start_lookup([keys[p] for p in parts[shard]])
                        if rid >= 0:
                            tries.append((fleets[1], rid))
                        self.failovers += 1
            poller.poll(1)
        for shard, tries in asked.items():
            for f, rid in tries:
                f.cancel_lookup(rid)
        self.last_lookup_s = time.perf_counter() - t0
        self.lookup_rtts.append(self.last_lookup_s)
        return LookupReply(holders=merge_runs(len(keys), answers))
