"""Prometheus endpoint of the directory (``p2pkv directory --metrics-port``).

A custom collector reads the server's counters at scrape time (no per-request metric calls
on the hot path), registered in a private registry (no global state). Rates such as
lookups/s are for Prometheus to compute (``rate(p2pkv_directory_lookups_total[1m])``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
)
from prometheus_client.registry import Collector

from p2pkv.directory.protocol import LOOKUP_BUCKETS_S

if TYPE_CHECKING:
    from p2pkv.directory.server import DirectoryServer


class DirectoryCollector(Collector):
    def __init__(self, server: DirectoryServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        s = self._server
        c = s.counters
        yield GaugeMetricFamily("p2pkv_directory_instances", "registered instances",
                                value=len(s.index))
        yield GaugeMetricFamily("p2pkv_directory_chunks", "indexed (namespace, key) entries",
                                value=s.index.num_chunks)
        yield GaugeMetricFamily("p2pkv_directory_holdings", "(chunk, holder) pairs indexed",
                                value=s.index.num_holdings)
        yield CounterMetricFamily("p2pkv_directory_lookups", "Lookup requests", value=c.lookups)
        counts = list(c.lookup_buckets)
        cumulative, buckets = 0, []
        for bound, n in zip((*LOOKUP_BUCKETS_S, float("inf")), counts):
            cumulative += n
            buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
        yield HistogramMetricFamily("p2pkv_directory_lookup_seconds",
                                    "time the directory's loop spent on a Lookup (decode, "
                                    "index, encode, send; queueing not included)",
                                    buckets=buckets, sum_value=c.lookup_seconds)
        yield CounterMetricFamily("p2pkv_directory_keys_looked_up", "keys in Lookups",
                                  value=c.keys_looked_up)
        yield CounterMetricFamily("p2pkv_directory_keys_hit", "keys in the best holder's run",
                                  value=c.keys_hit)
        yield GaugeMetricFamily("p2pkv_directory_hit_ratio", "keys hit / keys looked up",
                                value=c.keys_hit / c.keys_looked_up if c.keys_looked_up else 0.0)
        yield CounterMetricFamily("p2pkv_directory_publishes", "Publish messages applied",
                                  value=c.publishes)
        yield CounterMetricFamily("p2pkv_directory_expirations", "leases expired",
                                  value=c.expirations)
        yield CounterMetricFamily("p2pkv_directory_auth_refused", "connections refused by ZAP",
                                  value=c.auth_refused)
        refused = CounterMetricFamily("p2pkv_directory_rejected_messages",
                                      "requests answered with an Error, by status",
                                      labels=["status"])
        for status, n in sorted(dict(s.refusals).items()):
            refused.add_metric([status], n)
        yield refused


def start_metrics(server: DirectoryServer, host: str, port: int) -> int:
    """Serve /metrics on host:port (port 0: a free one) in a daemon thread; returns the port."""
    registry = CollectorRegistry()
    registry.register(DirectoryCollector(server))
    httpd, _thread = start_http_server(port, addr=host, registry=registry)
    return httpd.server_address[1]
