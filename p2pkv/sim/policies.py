"""The policies ``p2pkv bench trace`` compares, each on its own simulated cluster.

1. ``round-robin``: requests in turn, each instance's own prefix cache (vLLM alone).
2. ``kv-aware``: the router's scorer (``router/policy.py``) over an exact index of every
   instance's cache, no sharing (llm-d's precise prefix routing).
3. ``p2pkv``: the same scorer over the router's view (change feed + hints); the instance
   asks the real directory for the rest of the prompt and always pulls, from one holder as
   the connector does (``max_holders > 1``: also the next holders' runs, a Lookup each).
4. ``p2pkv+planner``: the planner routes (lowest expected TTFT, spreading over candidates
   within ``PLANNER_SPREAD`` of it) and the instance pulls only when the pull is expected
   to beat recomputing (``planner/decide.py``), learning each peer's link from its pulls.
   ``p2pkv+planner+save``, ``+holdersN``, ``+multi`` (``P2pkvOptions``): the same with
   connector changes not built yet: pulled chunks saved to the puller's store, pulls from
   up to N holders (one Lookup each), both (N = 4).
5. ``global-pool``: one LRU with the whole cluster's capacity, free transfers, least-queued
   routing: an upper bound (Mooncake Store with an ideal network).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from p2pkv.keys import InstanceId, Namespace
from p2pkv.planner.cost import CostModel
from p2pkv.planner.decide import RemoteRun, RouteCandidate, choose_route, plan_load
from p2pkv.router.policy import Candidate, Policy, choose
from p2pkv.sim.cache import BlockLRU, LocalHit
from p2pkv.sim.cluster import Cluster, ClusterSpec, best_per_run, leading_runs
from p2pkv.sim.directory_view import BlockKeys, FeedView
from p2pkv.sim.losses import HostIndex, LossTally, first_missing_reason
from p2pkv.sim.options import P2pkvOptions, p2pkv_options, uses_directory

__all__ = ["NAMES", "DIRECTORY_POLICIES", "P2pkvOptions", "p2pkv_options", "uses_directory",
           "SimPolicy", "RoundRobin", "KvAware", "GlobalPool", "P2pkv"]
from p2pkv.sim.fleet import Fleet
from p2pkv.sim.sharded_fleet import ShardedFleet, ShardEndpoints
from p2pkv.sim.trace import TraceRequest

NAMES = ("round-robin", "kv-aware", "p2pkv", "p2pkv+planner", "p2pkv+planner+save", "p2pkv+multi",
         "global-pool")
DIRECTORY_POLICIES = ("p2pkv", "p2pkv+planner", "p2pkv+multi")

PLANNER_SPREAD = 0.1
"""The planner's router spreads over candidates expected within 10 % of the best."""

HINT_TTL_S = 30.0
"""How long the router trusts that an instance holds what it just sent there (trace time)."""


class SimPolicy:
    name = ""

    reusable_now = 0
    """The current request's reusable leading blocks (what the global pool serves)."""

    def __init__(self, spec: ClusterSpec, *, track_holders: bool = False) -> None:
        self.spec = spec
        self.cluster = Cluster(spec, track_holders=track_holders)

    def serve(self, req: TraceRequest, reusable_blocks: int) -> None:
        self.cluster.advance(req.arrival_s)
        self.reusable_now = reusable_blocks
        self.cluster.tally.reusable_tokens += req.prefix_tokens(reusable_blocks,
                                                                self.spec.block_tokens)
        self._serve(req, req.arrival_s)

    def _serve(self, req: TraceRequest, now: float) -> None:
        raise NotImplementedError

    def service(self, wait_s: float) -> None:
        """Between requests: keep any network state alive (nothing by default)."""

    def close(self) -> None:
        pass

    def _local(self, i: int, req: TraceRequest, now: float, decision: str | None = None) -> None:
        """Serve on ``i`` from its own tiers only."""
        c = self.cluster
        hit = c.instances[i].local_hit(req.blocks)
        cached = c.count_hit(req, hit, 0)
        c.run(i, req, now, cached, c.host_load_s(hit),
              decision or ("local" if hit.blocks else "recompute"))
        c.store(i, req.blocks, hit.blocks)


class RoundRobin(SimPolicy):
    name = "round-robin"

    def __init__(self, spec: ClusterSpec) -> None:
        super().__init__(spec)
        self._turn = itertools.cycle(range(spec.instances))

    def _serve(self, req: TraceRequest, now: float) -> None:
        self._local(next(self._turn), req, now)


class KvAware(SimPolicy):
    name = "kv-aware"

    def __init__(self, spec: ClusterSpec, policy: Policy = Policy()) -> None:
        super().__init__(spec, track_holders=True)
        self._policy = policy

    def _serve(self, req: TraceRequest, now: float) -> None:
        c = self.cluster
        assert c.holders is not None
        i = _choose_by_score(c, leading_runs(c.holders, req.blocks), req, self._policy)
        self._local(i, req, now)


class GlobalPool(SimPolicy):
    name = "global-pool"

    def __init__(self, spec: ClusterSpec) -> None:
        super().__init__(spec)
        self._pool = BlockLRU(spec.instances * (spec.device_blocks + spec.host_blocks))

    def _serve(self, req: TraceRequest, now: float) -> None:
        c = self.cluster
        run = 0
        for b in req.blocks:
            if b not in self._pool:
                break
            run += 1
        cached = c.count_hit(req, LocalHit(0, 0), run)
        c.run(c.least_queued(now), req, now, cached, 0.0, "pull" if run else "recompute")
        self._pool.add(req.blocks)


class P2pkv(SimPolicy):
    """Policies 3 and 4: the router's view from the feed, real Lookups and Publishes."""

    def __init__(self, spec: ClusterSpec, *, name: str, planner: bool, endpoint: str,
                 keys: BlockKeys, lookup_timeout_s: float = 0.5,
                 shards: Sequence[ShardEndpoints] = (),
                 max_holders: int = 1, save_pulled: bool = False, spread: float = 0.0,
                 policy: Policy = Policy(), fastest_holder: bool = False,
                 sticky: bool = False,
                 fleet_factory: Callable[..., Fleet] = Fleet) -> None:
        # NOTE: the exact index of both tiers is the simulation's truth for the loss
        # attribution (``sim/losses.py``); routing and lookups never read it.
        super().__init__(spec, track_holders=True)
        self._fastest = fastest_holder
        self._sticky = sticky
        self.host_truth = HostIndex()
        self.losses = LossTally()
        self.name = name
        self._planner = planner
        self._policy = policy
        self._keys = keys
        self._timeout = lookup_timeout_s
        self._max_holders = max_holders
        self._save_pulled = save_pulled
        self._spread = spread
        self.namespace = Namespace(f"trace-{self.name}")
        prefix = name.replace("p2pkv", "p").replace("+", "")
        self.ids = [InstanceId(f"{prefix}-{i}") for i in range(spec.instances)]
        self._index = {iid: i for i, iid in enumerate(self.ids)}
        def address_of(i: int) -> str:
            return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:7000"

        self.fleet: Fleet | ShardedFleet
        if shards:
            self.fleet = ShardedFleet(shards, self.namespace, self.ids, keys_of=self._keys_of,
                                      address_of=address_of,
                                      failover_s=min(0.05, lookup_timeout_s / 4))
            feeds = [s.primary for s in shards]
        else:
            self.fleet = fleet_factory(endpoint, self.namespace, self.ids,
                                       keys_of=self._keys_of, address_of=address_of)
            feeds = [endpoint]
        self.feed = FeedView(feeds, self.namespace, self._index, keys)
        self._hints: dict[int, dict[int, float]] = {}
        self.router_cost = CostModel(spec.profile)
        self.costs = [CostModel(spec.profile) for _ in range(spec.instances)] if planner else []
        self.pull_failed = 0

    def start(self, timeout_s: float) -> None:
        self.fleet.start(timeout_s)
        self.feed.start(timeout_s)

    def service(self, wait_s: float) -> None:
        self.fleet.service(wait_s)
        self.feed.poll()

    def close(self) -> None:
        self.feed.close()
        self.fleet.close()

    def _keys_of(self, i: int) -> list:
        return self._keys.flat(self.cluster.instances[i].host)

    def _view_runs(self, req: TraceRequest, now: float) -> dict[int, int]:
        """The router's view: the feed's holders plus its unexpired hints."""
        runs = leading_runs(self.feed.holders, req.blocks)
        hinted: dict[int, set[int]] = {}
        for b in req.blocks:
            h = self._hints.get(b)
            if not h:
                break
            alive = {i for i, until in h.items() if until > now}
            if not alive:
                break
            hinted[b] = alive | self.feed.holders.get(b, set())
        for i, run in leading_runs(hinted, req.blocks).items():
            if run > runs.get(i, 0):
                runs[i] = run
        return runs

    def _hint(self, i: int, req: TraceRequest, now: float) -> None:
        until = now + HINT_TTL_S
        for b in req.blocks:
            h = self._hints.setdefault(b, {})
            h[i] = until
            if len(h) > 64:
                for j in [j for j, t in h.items() if t <= now]:
                    del h[j]

    def _route(self, req: TraceRequest, now: float) -> int:
        c = self.cluster
        runs = self._view_runs(req, now)
        if not self._planner:
            return _choose_by_score(c, runs, req, self._policy)
        bt = self.spec.block_tokens
        picks = best_per_run(runs, c.queue_key)
        idle = c.least_queued(now)
        if idle not in {i for i, _ in picks}:
            picks.append((idle, 0))
        longest = picks[0] if picks and picks[0][1] > 0 else None
        picks.sort(key=lambda pick: c.last_chosen[pick[0]])
        cands = []
        for i, run in picks:
            remote = None
            if longest is not None and longest[1] > run and longest[0] != i:
                remote = RemoteRun(self.ids[longest[0]],
                                   req.prefix_tokens(longest[1], bt) - req.prefix_tokens(run, bt))
            cands.append(RouteCandidate(self.ids[i], req.prefix_tokens(run, bt),
                                        c.queue_s(i, now), remote=remote,
                                        in_flight=c.in_flight[i]))
        choice = choose_route(self.router_cost, req.input_tokens, cands, spread=self._spread)
        assert choice is not None
        if self._sticky:
            return self._index[InstanceId(_sticky_pick(choice, cands, self._spread))]
        if choice.reason == "reroute":
            c.tally.decisions["reroute"] += 1
        return self._index[InstanceId(choice.instance)]

    def _serve(self, req: TraceRequest, now: float) -> None:
        self.feed.poll()
        c = self.cluster
        i = self._route(req, now)
        self._hint(i, req, now)
        hit = c.instances[i].local_hit(req.blocks)
        segments, lookup_s = self._lookups(i, req, hit.blocks)
        pulled, pull_s, ended = self._pull(i, req, now, hit, segments)
        decision = ("pull" if pulled else "skip-pull" if segments
                    else "local" if hit.blocks else "recompute")
        cached = c.count_hit(req, hit, pulled)
        got = hit.blocks + pulled
        if got < self.reusable_now:
            bt = self.spec.block_tokens
            assert c.holders is not None
            reason = first_missing_reason(
                req.blocks[got], i, refused=ended == "refused", holder_lost=ended == "lost",
                holders_used=len(segments), max_holders=self._max_holders,
                host=self.host_truth, engine_holders=c.holders)
            self.losses.charge(reason, req.prefix_tokens(self.reusable_now, bt)
                               - req.prefix_tokens(got, bt))
        c.run(i, req, now, cached, max(c.host_load_s(hit), lookup_s + pull_s), decision)
        added, evicted = c.store(i, req.blocks,
                                 hit.blocks + (0 if self._save_pulled else pulled))
        self.host_truth.update(i, added, evicted)
        if added or evicted:
            self.fleet.publish(i, self._keys.flat(added), self._keys.flat(evicted))

    def _lookups(self, i: int, req: TraceRequest, start: int) -> tuple[list[tuple[int, int]], float]:
        """Real Lookups for the blocks past the local hit: (holder, blocks) runs in prompt
        order, one holder each (``max_holders`` of them), and the time they took."""
        segments: list[tuple[int, int]] = []
        lookup_s = 0.0
        pos, n = start, len(req.blocks)
        while pos < n and len(segments) < self._max_holders:
            reply = self.fleet.lookup(self._keys.flat(req.blocks[pos:]), self._timeout)
            if reply is None:
                lookup_s += self._timeout
                break
            lookup_s += self.fleet.last_lookup_s
            found = None
            for h in reply.holders:
                j = self._index.get(h.instance)
                run = h.run // self._keys.per_block
                if j is None or j == i or run <= 0:
                    continue
                if found is None:
                    found = (j, run)
                    if not self._fastest:
                        break
                elif run < found[1]:
                    break
                elif self._pull_rate(i, j) > self._pull_rate(i, found[0]):
                    # NOTE: among the holders of the longest run the connector takes the
                    # first by name; ``fastest_holder`` takes the one its cost model
                    # expects fastest (a slow link would otherwise make the planner refuse)
                    found = (j, run)
            if found is None:
                break
            segments.append(found)
            pos += found[1]
        return segments, lookup_s

    def _pull_rate(self, i: int, j: int) -> float:
        """Bytes/s instance ``i`` expects from ``j``: its own estimate with the planner,
        else the link as the instances' registrations would describe it."""
        if self._planner:
            return self.costs[i].links.link(self.ids[j]).bytes_per_s
        c = self.cluster
        return min(c.instances[i].link_factor, c.instances[j].link_factor)

    def _pull(self, i: int, req: TraceRequest, now: float, hit: LocalHit,
              segments: list[tuple[int, int]]) -> tuple[int, float, str | None]:
        """Pull the segments the plan keeps, in order, from their holders (in parallel);
        returns (blocks pulled, seconds, why it ended early: "refused", "lost" or None).
        A block the holder no longer has ends the pull: the connector recomputes from the
        first missing chunk."""
        c = self.cluster
        bt = self.spec.block_tokens
        kv = self.spec.profile.kv_bytes_per_token
        pos = hit.blocks
        pull_s = 0.0
        for holder, run in segments:
            tokens = req.prefix_tokens(pos + run, bt) - req.prefix_tokens(pos, bt)
            if self._planner:
                plan = plan_load(self.costs[i], req.input_tokens, req.prefix_tokens(pos, bt),
                                 RemoteRun(self.ids[holder], tokens),
                                 host_tokens=hit.host_only * bt,
                                 queue_s=max(c.queue_s(i, now), pull_s))
                if not plan.pull:
                    return pos - hit.blocks, pull_s, "refused"
            held = c.instances[holder].host
            valid = 0
            for b in req.blocks[pos:pos + run]:
                if b not in held:
                    break
                valid += 1
            if valid:
                tokens = req.prefix_tokens(pos + valid, bt) - req.prefix_tokens(pos, bt)
                seconds = c.pull_seconds(i, holder, tokens)
                pull_s = max(pull_s, seconds)
                held.touch(req.blocks[pos:pos + valid])
                if self._planner:
                    self.costs[i].links.observe(self.ids[holder], tokens * kv, seconds,
                                                rtt_s=self.spec.profile.link.rtt_s)
                pos += valid
            if valid < run:
                self.pull_failed += 1
                c.tally.decisions["pull-missing"] += 1
                return pos - hit.blocks, pull_s, "lost"
        return pos - hit.blocks, pull_s, None


def _sticky_pick(choice, cands: list[RouteCandidate], spread: float) -> str:
    """Of the candidates expected within ``spread`` of the best (``choice.expected``): the
    shortest queue, then the most cached tokens, then the fewest in flight."""
    best = min(t for _, t in choice.expected)
    limit = best * (1 + spread)
    within = [c for c, (_, t) in zip(cands, choice.expected) if t <= limit]
    return min(within, key=lambda c: (c.queue_s, -c.local_tokens, c.in_flight)).instance


def _choose_by_score(c: Cluster, runs: dict[int, int], req: TraceRequest,
                     policy: Policy) -> int:
    """The router's scorer over the candidates that can win: per run length the least
    loaded holder, and the least loaded instance."""
    bt = c.spec.block_tokens
    picks = best_per_run(runs, c.load_key)
    idle = c.least_loaded()
    if idle not in {i for i, _ in picks}:
        picks.append((idle, 0))
    choice = choose([Candidate(str(i), req.prefix_tokens(run, bt), c.in_flight[i])
                     for i, run in picks], policy)
    assert choice is not None
    if choice.reason == "load":
        c.tally.decisions["reroute"] += 1
    return int(choice.name)
