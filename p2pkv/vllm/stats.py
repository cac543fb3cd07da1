"""The connector's metrics: what it counts and measures, and how the numbers travel.

vLLM's connector stats API carries them into vLLM's own ``/metrics``: every step each side
hands vLLM what changed since the last step (``StatsDelta``: counter increments and the
latencies observed), vLLM merges the scheduler's and the worker's deltas in EngineCore, sends
them to the API server with its scheduler stats, and there ``p2pkv.vllm.prom`` adds them to
Prometheus counters and histograms named ``p2pkv_connector_*`` (labels ``model_name`` and
``engine``, as vLLM's own). This module is the table of those metrics and the pure merging,
free of vLLM, so that tests and the Grafana dashboard check can read the names.

NOTE: a side's numbers reach vLLM only when vLLM steps. A holder that is idle while peers
pull from it shows its ``chunks_served`` at its next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PREFIX = "p2pkv_connector_"

COUNTERS: dict[str, str] = {
    # scheduler side (EngineCore)
    "lookups": "directory lookups started",
    "lookup_timeouts": "lookups without a reply within lookup_timeout_s (a miss)",
    "remote_hit_tokens": "prompt tokens planned to be pulled from peers",
    "loads_planned": "requests planned to pull",
    "pulls_skipped": "remote hits not pulled: the planner expected recomputing to be faster",
    # worker side
    "loads": "pulls finished (one per request)",
    "loads_layerwise": "of those, loaded layer group by layer group (load_mode layerwise)",
    "chunks_pulled": "chunks pulled from peers",
    "bytes_pulled": "bytes pulled from peers",
    "chunks_missing": "chunks the holder no longer had",
    "chunks_failed": "chunks not pulled: peer gone, deadline, checksum (recomputed)",
    "chunks_saved": "chunks copied into this instance's store",
    "chunks_served": "chunks this instance's store served to peers",
}
"""Counter key -> help text; exported as ``p2pkv_connector_<key>_total``."""

HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "lookup_seconds": ("directory lookup latency as the scheduler sees it (start to reply, "
                       "timeouts included)",
                       (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)),
    "pull_seconds": ("one request's pull (all its chunks, one holder)",
                     (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)),
}
"""Histogram key -> (help text, buckets); exported as ``p2pkv_connector_<key>``."""


GAUGES: dict[str, tuple[str, str]] = {
    "planner_prefill_tokens_per_second": (
        "the planner's measured prefill speed of whole prompts, by prompt-length bucket",
        "bucket"),
    "planner_peer_bytes_per_second": ("the planner's measured pull bandwidth per peer engine",
                                      "peer"),
    "planner_peer_rtt_seconds": ("the planner's measured fixed time per pull, per peer engine",
                                 "peer"),
}
"""Gauge key -> (help text, its extra label); exported as ``p2pkv_connector_<key>``, set from
``StatsDelta.gauges`` entries keyed ``"<key>|<label value>"`` (scheduler side, when a
measurement changed them)."""


def exported_names() -> set[str]:
    """Every sample name the connector's metrics add to vLLM's ``/metrics``."""
    names = {f"{PREFIX}{k}_total" for k in COUNTERS} | {PREFIX + k for k in GAUGES}
    for k in HISTOGRAMS:
        names |= {f"{PREFIX}{k}{s}" for s in ("_bucket", "_sum", "_count")}
    return names


@dataclass(slots=True)
class StatsDelta:
    """What changed since the last hand-over: counter increments and observed latencies."""

    counters: dict[str, int] = field(default_factory=dict)
    observations: dict[str, list[float]] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    """Current values (``GAUGES`` key ``|`` label value); a later one replaces an earlier."""

    def is_empty(self) -> bool:
        return (not any(self.counters.values()) and not any(self.observations.values())
                and not self.gauges)

    def to_dict(self) -> dict[str, dict]:
        """Plain data (msgpack-able: it crosses vLLM's process boundaries)."""
        out: dict[str, dict] = {"counters": dict(self.counters),
                                "observations": {k: list(v) for k, v in self.observations.items()}}
        if self.gauges:
            out["gauges"] = dict(self.gauges)
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> StatsDelta:
        data = data or {}
        return cls({k: int(v) for k, v in (data.get("counters") or {}).items()},
                   {k: [float(x) for x in v]
                    for k, v in (data.get("observations") or {}).items()},
                   {k: float(v) for k, v in (data.get("gauges") or {}).items()})

    def merged(self, other: StatsDelta) -> StatsDelta:
        """A new delta with both (neither input is changed)."""
        counters = dict(self.counters)
        for k, v in other.counters.items():
            counters[k] = counters.get(k, 0) + v
        observations = {k: list(v) for k, v in self.observations.items()}
        for k, v in other.observations.items():
            observations.setdefault(k, []).extend(v)
        return StatsDelta(counters, observations, {**self.gauges, **other.gauges})

    def summary(self) -> dict[str, int | float]:
        """Counters, and each latency's count and mean in ms (vLLM's periodic log line)."""
        out: dict[str, int | float] = {k: v for k, v in sorted(self.counters.items()) if v}
        for k, v in sorted(self.observations.items()):
            if v:
                out[f"{k}_count"] = len(v)
                out[f"{k.removesuffix('_seconds')}_mean_ms"] = round(sum(v) / len(v) * 1e3, 3)
        return out


class DeltaTracker:
    """Turns running counters into deltas: ``take(now)`` returns what grew since the last
    take, plus the observations recorded in between. Not thread-safe: callers lock."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self._observations: dict[str, list[float]] = {}

    def observe(self, key: str, value: float) -> None:
        self._observations.setdefault(key, []).append(value)

    def take(self, counters: dict[str, int]) -> StatsDelta:
        delta = {k: v - self._last.get(k, 0) for k, v in counters.items()
                 if v != self._last.get(k, 0)}
        self._last = dict(counters)
        observations, self._observations = self._observations, {}
        return StatsDelta(delta, observations)
