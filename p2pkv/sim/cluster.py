"""The simulated cluster one policy runs on: N instances, their load, and the tally.

Used by ``sim/policies.py``. Time is the trace's (simulated seconds). Each instance
prefills one request at a time, in arrival order (``busy_until``); a request waits for its
turn while its host-tier blocks load and its pull runs, then computes what is not cached.
Decode is counted only as load (in-flight requests until the last output token).
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from p2pkv.planner.cost import Profile
from p2pkv.sim.cache import BlockLRU, LocalHit, SimInstance
from p2pkv.sim.trace import TraceRequest


WINDOW_S = 30.0
"""Trace seconds per window of the hit-rate time series."""


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    instances: int
    profile: Profile
    block_tokens: int = 512
    host_tier: bool = True
    """Give every instance its host store (for the policies without sharing: a local CPU
    offload tier), so that the comparison is about sharing, not capacity."""
    slow_fraction: float = 0.0
    """Share of instances whose link runs at ``slow_factor`` of the profile's bandwidth."""
    slow_factor: float = 0.05
    seed: int = 15

    def __post_init__(self) -> None:
        if self.instances < 1 or not 0 <= self.slow_fraction <= 1 or self.slow_factor <= 0:
            raise ValueError("ClusterSpec: instances >= 1, 0 <= slow_fraction <= 1, "
                             "slow_factor > 0")

    @property
    def device_blocks(self) -> int:
        return max(1, self.profile.device_kv_tokens // self.block_tokens)

    @property
    def host_blocks(self) -> int:
        return self.profile.host_kv_tokens // self.block_tokens if self.host_tier else 0


@dataclass(slots=True)
class Tally:
    """What one policy did with the trace, in tokens and estimated times."""

    requests: int = 0
    prompt_tokens: int = 0
    reusable_tokens: int = 0
    """Leading tokens of prompts whose blocks some earlier request had (the most any
    policy can serve from cache)."""
    local_tokens: int = 0
    host_tokens: int = 0
    """Of the local tokens, those loaded from the host store."""
    pulled_tokens: int = 0
    decisions: Counter = field(default_factory=Counter)
    ttfts: list[float] = field(default_factory=list)
    windows: dict[int, list[int]] = field(default_factory=dict)
    """Trace-time window -> [prompt tokens, tokens from cache] (``WINDOW_S`` each)."""

    @property
    def saved_tokens(self) -> int:
        return self.local_tokens + self.pulled_tokens

    @property
    def recomputed_tokens(self) -> int:
        """Reusable prefix tokens computed again."""
        return self.reusable_tokens - self.saved_tokens


class Cluster:
    def __init__(self, spec: ClusterSpec, *, track_holders: bool = False) -> None:
        self.spec = spec
        rng = random.Random(spec.seed)
        slow = set(rng.sample(range(spec.instances), round(spec.slow_fraction * spec.instances)))
        self.instances = [SimInstance(i, BlockLRU(spec.device_blocks), BlockLRU(spec.host_blocks),
                                      link_factor=spec.slow_factor if i in slow else 1.0)
                          for i in range(spec.instances)]
        self.in_flight = [0] * spec.instances
        self.last_chosen = [0] * spec.instances
        """When each instance was last given a request (a counter): ties go to the least
        recently chosen, as the router lists candidates."""
        self._turns = 0
        self._ends: list[tuple[float, int]] = []
        self.holders: dict[int, set[int]] | None = {} if track_holders else None
        """block -> instances holding it in either tier (KV-aware routing's index)."""
        self.tally = Tally()

    # -- load -------------------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Requests whose last output token is before ``now`` are no longer in flight."""
        ends = self._ends
        while ends and ends[0][0] <= now:
            _, i = heapq.heappop(ends)
            self.in_flight[i] -= 1

    def queue_s(self, i: int, now: float) -> float:
        return max(0.0, self.instances[i].busy_until - now)

    def load_key(self, i: int) -> tuple[int, int]:
        return self.in_flight[i], self.last_chosen[i]

    def queue_key(self, i: int) -> tuple[float, int]:
        return self.instances[i].busy_until, self.last_chosen[i]

    def least_loaded(self) -> int:
        """Fewest requests in flight (ties: least recently chosen)."""
        return min(range(len(self.in_flight)), key=self.load_key)

    def least_queued(self, now: float) -> int:
        """Shortest prefill queue (ties: least recently chosen)."""
        busy = [max(now, inst.busy_until) for inst in self.instances]
        return min(range(len(busy)), key=lambda i: (busy[i], self.last_chosen[i]))

    # -- serving ----------------------------------------------------------------------------

    def pull_seconds(self, puller: int, holder: int, tokens: int) -> float:
        """The true time of a pull (the planner only sees its measurements)."""
        link = self.spec.profile.link
        factor = min(self.instances[puller].link_factor, self.instances[holder].link_factor)
        return link.rtt_s + tokens * self.spec.profile.kv_bytes_per_token / (
            link.bytes_per_s * factor)

    def run(self, i: int, req: TraceRequest, now: float, cached_tokens: int,
            ready_delay_s: float, decision: str) -> float:
        """Queue and prefill ``req`` on instance ``i`` with ``cached_tokens`` not computed,
        its KV ready ``ready_delay_s`` after arrival; returns the estimated TTFT."""
        inst = self.instances[i]
        profile = self.spec.profile
        self._turns += 1
        self.last_chosen[i] = self._turns
        start = max(now + ready_delay_s, inst.busy_until)
        compute = profile.prefill.seconds(req.input_tokens, cached_tokens)
        inst.busy_until = start + compute
        inst.busy_s += compute
        inst.requests += 1
        ttft = inst.busy_until - now
        self.in_flight[i] += 1
        heapq.heappush(self._ends, (inst.busy_until + req.output_tokens
                                    * profile.decode_s_per_token, i))
        t = self.tally
        t.requests += 1
        t.prompt_tokens += req.input_tokens
        t.decisions[decision] += 1
        t.ttfts.append(ttft)
        return ttft

    def count_hit(self, req: TraceRequest, local: LocalHit, pulled_blocks: int) -> int:
        """Tally the cached tokens of a request; returns them."""
        bt = self.spec.block_tokens
        local_tokens = req.prefix_tokens(local.blocks, bt)
        cached = req.prefix_tokens(local.blocks + pulled_blocks, bt)
        host = sum(req.block_tokens(j, bt) for j in range(local.blocks - local.host_only,
                                                            local.blocks)) if local.host_only else 0
        t = self.tally
        t.local_tokens += local_tokens
        t.host_tokens += host
        t.pulled_tokens += cached - local_tokens
        w = t.windows.setdefault(int(req.arrival_s // WINDOW_S), [0, 0])
        w[0] += req.input_tokens
        w[1] += cached
        return cached

    def store(self, i: int, blocks: Sequence[int], computed_from: int) -> tuple[list[int], list[int]]:
        """After the prefill: every block is in the engine's cache, the computed ones
        (``blocks[computed_from:]``) are saved to the host store (pulled and hit blocks are
        not saved again). Returns the host store's (added, evicted) blocks."""
        inst = self.instances[i]
        inst.host.touch(blocks[:computed_from])
        dev_added, dev_evicted = inst.device.add(blocks)
        host_added, host_evicted = inst.host.add(blocks[computed_from:])
        if self.holders is not None:
            holders = self.holders
            for b in dev_added:
                holders.setdefault(b, set()).add(i)
            for b in host_added:
                holders.setdefault(b, set()).add(i)
            for b in (*dev_evicted, *host_evicted):
                if not inst.holds(b):
                    s = holders.get(b)
                    if s is not None:
                        s.discard(i)
                        if not s:
                            del holders[b]
        return host_added, host_evicted

    def host_load_s(self, local: LocalHit) -> float:
        """Loading the host-only blocks of a local hit into the engine's cache."""
        if local.host_only == 0:
            return 0.0
        profile = self.spec.profile
        return profile.host_load.seconds(local.host_only * self.spec.block_tokens
                                         * profile.kv_bytes_per_token)


def leading_runs(index: dict[int, set[int]], blocks: Sequence[int]) -> dict[int, int]:
    """instance -> leading blocks of ``blocks`` it holds contiguously (run >= 1)."""
    if not blocks:
        return {}
    first = index.get(blocks[0])
    if not first:
        return {}
    active = set(first)
    runs: dict[int, int] = {}
    n = len(blocks)
    i = 1
    while active and i < n:
        nxt = index.get(blocks[i])
        if not nxt:
            for h in active:
                runs[h] = i
            return runs
        dropped = active - nxt
        if dropped:
            for h in dropped:
                runs[h] = i
            active -= dropped
        i += 1
    for h in active:
        runs[h] = n
    return runs


def best_per_run(runs: dict[int, int], key: Callable[[int], tuple]) -> list[tuple[int, int]]:
    """For each distinct run length, the instance with the lowest ``key(instance)`` (its
    load): (instance, run), longest run first. Among equal runs a scorer never prefers the
    busier one."""
    best: dict[int, int] = {}
    best_key: dict[int, tuple] = {}
    for inst, run in runs.items():
        k = key(inst)
        if run not in best or k < best_key[run]:
            best[run], best_key[run] = inst, k
    return [(inst, run) for run, inst in sorted(best.items(), reverse=True)]
