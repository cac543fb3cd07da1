"""The connector's metrics in vLLM's terms: ``KVConnectorStats`` and ``KVConnectorPromMetrics``.

``P2PKVStats`` wraps a :class:`p2pkv.vllm.stats.StatsDelta` (vLLM merges the scheduler's and
the worker's with ``aggregate`` and ships ``to_dict()`` to the API server), and
``P2PKVPromMetrics`` adds those deltas to the ``p2pkv_connector_*`` series of vLLM's
``/metrics`` in the API server process (``vllm/v1/metrics/loggers.py`` calls ``observe``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from p2pkv.vllm.stats import COUNTERS, GAUGES, HISTOGRAMS, PREFIX, StatsDelta


@dataclass
class P2PKVStats(KVConnectorStats):
    def _delta(self) -> StatsDelta:
        return StatsDelta.from_dict(self.data)

    @classmethod
    def of(cls, delta: StatsDelta) -> P2PKVStats:
        return cls(data=delta.to_dict())

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        # NOTE: a new object: vLLM's log aggregator and its Prometheus logger are handed the
        # same payload, so merging in place would change what the other one reads.
        return P2PKVStats.of(self._delta().merged(StatsDelta.from_dict(other.data)))

    def reduce(self) -> dict[str, int | float]:
        return self._delta().summary()

    def is_empty(self) -> bool:
        return self._delta().is_empty()


class P2PKVPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {k: self._counter_cls(name=PREFIX + k, documentation=doc,
                                               labelnames=labelnames)
                          for k, doc in COUNTERS.items()}
        self._histograms = {k: self._histogram_cls(name=PREFIX + k, documentation=doc,
                                                   buckets=list(buckets),
                                                   labelnames=labelnames)
                            for k, (doc, buckets) in HISTOGRAMS.items()}
        # NOTE: gauges carry one more label (bucket or peer), so their children are made on
        # first use; "mostrecent": the scheduler side's latest value wins.
        self._gauges = {k: self._gauge_cls(name=PREFIX + k, documentation=doc,
                                           labelnames=[*labelnames, label],
                                           multiprocess_mode="mostrecent")
                        for k, (doc, label) in GAUGES.items()}
        self._labelvalues = {idx: list(values) for idx, values in per_engine_labelvalues.items()}
        # Children per engine up front, so every series exists (at 0) from the first scrape.
        self._per_engine = {
            idx: ({k: m.labels(*values) for k, m in self._counters.items()},
                  {k: m.labels(*values) for k, m in self._histograms.items()})
            for idx, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        delta = StatsDelta.from_dict(transfer_stats_data)
        counters, histograms = self._per_engine[engine_idx]
        for k, v in delta.counters.items():
            if k in counters and v > 0:
                counters[k].inc(v)
        for k, values in delta.observations.items():
            if k in histograms:
                for v in values:
                    histograms[k].observe(v)
        for key, value in delta.gauges.items():
            name, _, label = key.partition("|")
            if name in self._gauges:
                self._gauges[name].labels(*self._labelvalues[engine_idx], label).set(value)
