"""Replaying a trace through a group of policies in one process, in time order, sped up.

Called by ``p2pkv bench trace`` (one worker process per group, see ``bench/trace/``) and by
the tests. With ``speedup > 0`` request ``r`` is served at wall time
``start + r.arrival_s / speedup`` and the policies' network state (leases, feed) is serviced
while waiting; with ``speedup == 0`` the replay runs as fast as it can.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from p2pkv.sim.cluster import ClusterSpec
from p2pkv.sim.directory_view import BlockKeys
from p2pkv.sim.sharded_fleet import ShardEndpoints
from p2pkv.sim.policies import (
    DIRECTORY_POLICIES, PLANNER_SPREAD, GlobalPool, KvAware, P2pkv, RoundRobin, SimPolicy,
    p2pkv_options, uses_directory,
)
from p2pkv.sim.trace import TraceRequest

logger = logging.getLogger(__name__)

SERVICE_EVERY = 8
"""Unpaced replays service network state every this many requests."""


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    spec: ClusterSpec
    policies: tuple[str, ...]
    speedup: float = 10.0
    endpoint: str | None = None
    """The directory (needed by the p2pkv policies)."""
    keys_per_block: int = 4
    lookup_timeout_s: float = 0.5
    max_holders: int = 1
    save_pulled: bool = False
    """Save pulled chunks to the puller's store too (the connector does not)."""
    shards: tuple[ShardEndpoints, ...] = ()
    """A sharded directory (empty: the one ``endpoint``)."""
    local_host_tier: bool = True
    """Round-robin and kv-aware get each instance's host store as a local tier."""
    start_timeout_s: float = 60.0
    worker_nice: int = 0
    """Niceness the worker processes add (``os.nice``): the simulated clients yield the CPU
    to the directory (and the bench's latency probe) on a machine with few cores."""

    def __post_init__(self) -> None:
        if self.speedup < 0:
            raise ValueError("speedup must not be negative (0: as fast as possible)")
        if (any(uses_directory(p) for p in self.policies) and not self.endpoint
                and not self.shards):
            raise ValueError(f"policies {DIRECTORY_POLICIES} (p2pkv+...) need a directory "
                             "endpoint")


def reusable_blocks(trace: Sequence[TraceRequest]) -> list[int]:
    """Per request: its leading blocks that an earlier request had (any instance could
    have cached them; nothing else can be a hit)."""
    seen: set[int] = set()
    out = []
    for req in trace:
        n = 0
        for b in req.blocks:
            if b not in seen:
                break
            n += 1
        out.append(n)
        seen.update(req.blocks)
    return out


def make_policies(config: ReplayConfig) -> list[SimPolicy]:
    keys = BlockKeys(config.keys_per_block)
    made: list[SimPolicy] = []
    local_spec = config.spec if config.local_host_tier else replace(config.spec, host_tier=False)
    for name in config.policies:
        if name == "round-robin":
            made.append(RoundRobin(local_spec))
        elif name == "kv-aware":
            made.append(KvAware(local_spec))
        elif name == "global-pool":
            made.append(GlobalPool(config.spec))
        elif (opts := p2pkv_options(name)) is not None:
            made.append(P2pkv(config.spec, name=name, planner=opts.planner,
                              endpoint=config.endpoint or "", keys=keys, shards=config.shards,
                              lookup_timeout_s=config.lookup_timeout_s,
                              max_holders=max(opts.max_holders, config.max_holders),
                              save_pulled=opts.save_pulled or config.save_pulled,
                              fastest_holder=opts.fastest_holder, sticky=opts.sticky,
                              spread=PLANNER_SPREAD if opts.planner else 0.0))
        else:
            raise ValueError(f"unknown policy {name!r}")
    return made


@dataclass(frozen=True, slots=True)
class ReplayRun:
    wall_s: float
    max_lag_s: float
    """Longest the replay ran behind its schedule (0 when unpaced)."""


def replay(trace: Sequence[TraceRequest], policies: Sequence[SimPolicy], speedup: float,
           reusable: Sequence[int] | None = None) -> ReplayRun:
    reusable = reusable_blocks(trace) if reusable is None else reusable
    t0 = time.monotonic()
    max_lag = 0.0
    for k, req in enumerate(trace):
        if speedup > 0:
            target = t0 + req.arrival_s / speedup
            while True:
                left = target - time.monotonic()
                if left <= 0:
                    max_lag = max(max_lag, -left)
                    break
                _service(policies, min(left, 0.02))
            if k % SERVICE_EVERY == 0:
                _service(policies, 0.0)
        elif k % SERVICE_EVERY == 0:
            _service(policies, 0.0)
        for p in policies:
            p.serve(req, reusable[k])
    _service(policies, 0.0)
    return ReplayRun(time.monotonic() - t0, max_lag)


def _service(policies: Sequence[SimPolicy], wait_s: float) -> None:
    networked = [p for p in policies if isinstance(p, P2pkv)]
    if not networked:
        if wait_s > 0:
            time.sleep(wait_s)
        return
    share = wait_s / len(networked)
    for p in networked:
        p.service(share)
