"""The connector's planner: pull a remote hit, or recompute it? (issue 15)

Runs in the scheduler side (EngineCore). It keeps one :class:`~p2pkv.planner.cost.CostModel`
(the cost code ``p2pkv bench trace`` and the router's ``--planner`` use) fed by this
instance's own measurements:

- **prefill speed**, from its own engine steps: the scheduler side tells it what each step
  computes (:meth:`ConnectorPlanner.step_scheduled`) and when the step's output came back
  (:meth:`ConnectorPlanner.step_done`); a step that is mostly prefill is one sample of the
  speed, as a ratio to the prior curve, in the bucket of its longest prompt;
- **per peer (holder engine) bandwidth and round trip**, from the worker ranks' real pulls
  (:class:`PullSample`, handed back through vLLM's worker metadata), fitted over pulls of
  several sizes (``FittedLinkEstimator``).

NOTE (why it is safe on by default): a fresh instance must never skip a pull that would
win. The priors are optimistic for pulls (:func:`optimistic_profile`: a slow prefill and a
fast link) unless a measured profile is named, a peer's link is trusted only from its
second pull (the first includes connecting) and forgotten ``link_max_age_s`` after its last
pull (a peer skipped as slow is tried again, since skipping it stops measuring it), and a
prompt-length bucket without a measured step keeps the slow prefill prior. So a pull is
skipped only on evidence on both sides: this peer was measured slow lately, and this
instance measured that it computes prompts of that length faster.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from p2pkv.errors import ConfigError
from p2pkv.planner.cost import CostModel, FittedLinkEstimator, Link, PrefillCurve, Profile
from p2pkv.planner.decide import LoadPlan, RemoteRun, plan_load
from p2pkv.planner.profiles import PROFILES

logger = logging.getLogger(__name__)

MIN_STEP_PREFILL_TOKENS = 64
"""A step counts as a prefill sample only with at least this many prefill tokens (and at
least half of its tokens prefill): a decode step's time says nothing of prefill speed."""

MAX_STEPS_IN_FLIGHT = 4
"""Steps scheduled and not yet answered that are remembered (vLLM's async scheduling has
two in flight; an output that never came must not shift the pairing for ever)."""

MAX_STATUS_PEERS = 8
"""Peers listed in ``p2pkv status`` (the most recently pulled from)."""


@dataclass(frozen=True, slots=True)
class PullSample:
    """One worker rank's pull for one request from one holder engine: what the link
    estimate learns from (bytes this rank received, wall time of the whole pull)."""

    peer: str
    nbytes: int
    seconds: float


@dataclass(frozen=True, slots=True)
class _Step:
    at: float
    prompt_tokens: int  # the longest prompt prefilled in the step (0: no prefill sample)
    parts: tuple[tuple[int, int], ...]


def optimistic_profile(kv_bytes_per_token: int) -> Profile:
    """Priors under which every pull wins until measured otherwise: prefill at 100 tokens/s
    (slower than any measured deployment, MEASURED.md's CPU one is ~330) and a 100 GB/s link
    with no round trip."""
    return Profile(
        name="optimistic", description="connector priors that favour pulls until measured",
        kv_bytes_per_token=max(1, kv_bytes_per_token),
        prefill=PrefillCurve(tokens_per_s=100.0), link=Link(bytes_per_s=100e9, rtt_s=0.0),
        host_load=Link(bytes_per_s=100e9), device_kv_tokens=1, host_kv_tokens=0,
        decode_s_per_token=0.0,
        sources=(("prefill", "assumption: slower than any deployment, so pulls win"),
                 ("link", "assumption: faster than any deployment, so pulls win")))


def connector_profile(name: str, kv_bytes_per_token: int) -> Profile:
    """The named profile's priors (``PROFILES``) with this instance's KV bytes per token
    (what one worker rank pulls), or :func:`optimistic_profile` for ``""``."""
    if not name:
        return optimistic_profile(kv_bytes_per_token)
    if name not in PROFILES:
        raise ConfigError(f"planner_profile {name!r} is not one of {sorted(PROFILES)}")
    return dataclasses.replace(PROFILES[name], kv_bytes_per_token=max(1, kv_bytes_per_token))


class ConnectorPlanner:
    """Pull or recompute, from this instance's measured prefill speed and peer links."""

    def __init__(self, profile: Profile, *, clock: Callable[[], float] = time.monotonic,
                 link_max_age_s: float = 60.0, min_link_samples: int = 2) -> None:
        self._clock = clock
        self._links = FittedLinkEstimator(profile.link, min_samples=min_link_samples,
                                          max_age_s=link_max_age_s)
        self.cost = CostModel(profile, links=self._links)
        self._steps: deque[_Step] = deque()
        self._last_done = -1e300
        self._last_pull_at: dict[str, float] = {}
        self.decisions = {"pull": 0, "skip": 0}

    # -- decisions ------------------------------------------------------------------------

    def decide(self, peer: str, prompt_tokens: int, local_tokens: int,
               remote_tokens: int) -> LoadPlan:
        """Pull ``remote_tokens`` (after the ``local_tokens`` hit) from ``peer``, or not."""
        self._links.expire(self._clock())
        plan = plan_load(self.cost, prompt_tokens, local_tokens, RemoteRun(peer, remote_tokens))
        self.decisions["pull" if plan.pull else "skip"] += 1
        return plan

    # -- measurements ---------------------------------------------------------------------

    def step_scheduled(self, requests: Sequence[tuple[int, int, int]]) -> None:
        """A step was handed to the workers: per request ``(prompt_tokens, computed,
        scheduled)`` (tokens already computed, tokens this step computes)."""
        parts = tuple((c, c + n) for _, c, n in requests if n > 0)
        prefill = [(p, min(c + n, p) - c) for p, c, n in requests if c < p and n > 0]
        new = sum(t for _, t in prefill)
        total = sum(e - s for s, e in parts)
        sample = new >= MIN_STEP_PREFILL_TOKENS and 2 * new >= total
        self._steps.append(_Step(self._clock(), max((p for p, _ in prefill), default=0)
                                 if sample else 0, parts))
        while len(self._steps) > MAX_STEPS_IN_FLIGHT:
            self._steps.popleft()

    def step_done(self) -> None:
        """The output of the oldest step in flight came back."""
        now = self._clock()
        if not self._steps:
            return
        step = self._steps.popleft()
        # NOTE: with two steps in flight the second starts when the first's output is back
        seconds = now - max(step.at, self._last_done)
        self._last_done = now
        if step.prompt_tokens > 0 and seconds > 0:
            self.cost.prefill.observe_step(step.prompt_tokens, step.parts, seconds)

    def observe_pulls(self, samples: Sequence[PullSample]) -> None:
        now = self._clock()
        for s in samples:
            self._links.observe(s.peer, s.nbytes, s.seconds, now=now)
            self._last_pull_at[s.peer] = now

    # -- what it shows --------------------------------------------------------------------

    def prefill_tokens_per_s(self) -> dict[int, float]:
        return self.cost.prefill.tokens_per_s()

    def links(self) -> dict[str, Link]:
        self._links.expire(self._clock())
        return self._links.measured()

    def gauges(self) -> dict[str, float]:
        """Prometheus gauges (``p2pkv.vllm.stats.GAUGES``), keyed ``name|label``."""
        out = {f"planner_prefill_tokens_per_second|{b}": v
               for b, v in self.prefill_tokens_per_s().items()}
        for peer, link in self.links().items():
            out[f"planner_peer_bytes_per_second|{peer}"] = link.bytes_per_s
            out[f"planner_peer_rtt_seconds|{peer}"] = link.rtt_s
        return out

    def status_counters(self) -> dict[str, int]:
        """Integer counters for the directory's ``Report`` (``p2pkv status``): decisions,
        prefill tokens/s per bucket, and per recent peer MB/s and round trip in µs."""
        out = {"planner_pulls": self.decisions["pull"],
               "planner_skipped": self.decisions["skip"]}
        for b, v in self.prefill_tokens_per_s().items():
            out[f"planner_prefill_tok_s_{b}"] = int(v)
        links = self.links()
        recent = sorted(links, key=lambda p: -self._last_pull_at.get(p, 0.0))[:MAX_STATUS_PEERS]
        for peer in recent:
            out[f"planner_peer_MBps_{peer}"] = int(links[peer].bytes_per_s / 1e6)
            out[f"planner_peer_rtt_us_{peer}"] = int(links[peer].rtt_s * 1e6)
        return out
