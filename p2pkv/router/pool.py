"""The instances a router sends to: their state (up, in flight) and choosing among them.

One :class:`Pool` per role (``both``; or ``prefill`` and ``decode``). Choosing builds one
:class:`~p2pkv.router.policy.Candidate` per instance in rotation from the holdings and the
in-flight counts, listed least recently chosen first, and lets the policy pick (the
cache-affinity score, or the planner's expected TTFT when the policy names a profile).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from p2pkv.keys import InstanceId
from p2pkv.router.holdings import Holdings
from p2pkv.router.metrics import RouterMetrics
from p2pkv.router.policy import Candidate, Choice, Policy, choose, choose_planned, planner_cost
from p2pkv.router.prompts import PromptKeys

logger = logging.getLogger(__name__)

ROLES = ("both", "prefill", "decode")


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """``ID=URL`` on the command line: ID is the instance's ``engine_id`` (what it registers
    with the directory under), URL its OpenAI server."""

    id: InstanceId
    url: str

    @classmethod
    def parse(cls, text: str) -> InstanceSpec:
        ident, sep, url = text.partition("=")
        if not sep or not ident or not url.startswith(("http://", "https://")):
            raise ValueError(f"instance {text!r} is not ID=http://HOST:PORT")
        return cls(InstanceId(ident), url.rstrip("/"))


@dataclass(slots=True)
class Backend:
    spec: InstanceSpec
    role: str
    up: bool = True
    in_flight: int = 0
    last_chosen: int = 0  # decision counter when last chosen (rotation order)
    health_failures: int = 0

    @property
    def id(self) -> InstanceId:
        return self.spec.id

    @property
    def url(self) -> str:
        return self.spec.url


class Pool:
    def __init__(self, role: str, specs: Iterable[InstanceSpec], holdings: Holdings,
                 policy: Policy, metrics: RouterMetrics) -> None:
        assert role in ROLES
        self.role = role
        self.backends = [Backend(s, role) for s in specs]
        self._holdings = holdings
        self._policy = policy
        self._cost = planner_cost(policy)
        self._metrics = metrics
        self._decisions = 0
        for b in self.backends:
            metrics.up.labels(b.id, role).set(1)

    def choose(self, prompt: PromptKeys | None, exclude: set[InstanceId]
               ) -> tuple[Backend, Choice] | None:
        live = sorted((b for b in self.backends if b.up and b.id not in exclude),
                      key=lambda b: b.last_chosen)
        candidates = []
        for b in live:
            cached = 0
            if prompt is not None and prompt.keys:
                cached = prompt.tokens_in_run(self._holdings.run(b.id, prompt.keys))
            candidates.append(Candidate(b.id, cached, b.in_flight))
        if self._cost is not None:
            choice = choose_planned(candidates, prompt.num_tokens if prompt else 0, self._cost,
                                    spread=self._policy.spread)
        else:
            choice = choose(candidates, self._policy)
        if choice is None:
            return None
        self._decisions += 1
        backend = next(b for b in live if b.id == choice.name)
        backend.last_chosen = self._decisions
        for s in choice.scores:
            self._metrics.score.labels(s.candidate.name).set(s.score)
        for name, seconds in choice.expected_s:
            self._metrics.expected_ttft.labels(name).set(seconds)
        self._metrics.choices.labels(self.role, choice.reason).inc()
        logger.debug("route %s -> %s (%s) [%s]", self.role, choice.name, choice.reason,
                     choice.describe())
        return backend, choice

    def mark_down(self, backend: Backend, why: str) -> None:
        if backend.up:
            logger.warning("router: %s (%s) out of rotation: %s", backend.id, backend.url, why)
        backend.up = False
        self._holdings.forget(backend.id)
        self._metrics.up.labels(backend.id, self.role).set(0)

    def mark_up(self, backend: Backend) -> None:
        if not backend.up:
            logger.info("router: %s (%s) back in rotation", backend.id, backend.url)
        backend.up = True
        backend.health_failures = 0
        self._metrics.up.labels(backend.id, self.role).set(1)
