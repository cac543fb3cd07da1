"""launch/grafana/p2pkv.json points only at metrics the code exports.

p2pkv's names come from the code itself: the directory's collector on a real (unstarted)
server, the router's registry, the connector's metric table (p2pkv.vllm.stats, which
tests/test_vllm_stats.py checks against the series p2pkv.vllm.prom really creates). vLLM's
own names are looked up in the installed vLLM's metric definitions. tests/test_prometheus_vllm.py
checks the same names against what a real Prometheus scraped.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from prometheus_client.core import Metric

from p2pkv.vllm.stats import exported_names as connector_names

DASHBOARD = Path(__file__).resolve().parent.parent / "launch" / "grafana" / "p2pkv.json"
NAME = re.compile(r"\b(p2pkv_[a-z0-9_]+|vllm:[a-z0-9_:]+)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",), "summary": ("_sum", "_count", "")}


def dashboard_names() -> set[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    assert exprs
    return {m for e in exprs for m in NAME.findall(e)}


def sample_names(families: list[Metric]) -> set[str]:
    return {f.name + s for f in families for s in SUFFIXES[f.type]}


def directory_names() -> set[str]:
    from p2pkv.directory.metrics import DirectoryCollector
    from p2pkv.directory.server import DirectoryServer, ServerConfig

    server = DirectoryServer(ServerConfig(bind="tcp://127.0.0.1:0"))
    try:
        return sample_names(list(DirectoryCollector(server).collect()))
    finally:
        server.close()


def router_names() -> set[str]:
    from p2pkv.router.metrics import RouterMetrics

    return sample_names(list(RouterMetrics().registry.collect()))


def p2pkv_names() -> set[str]:
    return directory_names() | router_names() | connector_names()


def test_every_p2pkv_metric_on_the_dashboard_is_exported():
    wanted = {n for n in dashboard_names() if n.startswith("p2pkv_")}
    missing = wanted - p2pkv_names()
    assert not missing, f"dashboard panels point at metrics no code exports: {sorted(missing)}"


def test_the_dashboard_shows_the_series_issue_16_asks_for():
    names = dashboard_names()
    for name in ("p2pkv_connector_chunks_pulled_total", "p2pkv_connector_bytes_pulled_total",
                 "p2pkv_connector_remote_hit_tokens_total",
                 "p2pkv_connector_lookup_seconds_bucket", "p2pkv_directory_chunks"):
        assert name in names


def test_every_vllm_metric_on_the_dashboard_is_defined_by_vllm():
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed (run scripts/setup.sh)")
    source = (Path(spec.submodule_search_locations[0]) / "v1" / "metrics" / "loggers.py"
              ).read_text()
    defined = set(re.findall(r'name="(vllm:[a-z0-9_:]+)"', source))
    for name in (n for n in dashboard_names() if n.startswith("vllm:")):
        base = re.sub(r"(_total|_bucket|_sum|_count)$", "", name)
        assert base in defined, f"{name}: vLLM defines no metric {base}"


def test_every_panel_has_a_prometheus_datasource_and_a_query():
    board = json.loads(DASHBOARD.read_text())
    assert any(v["type"] == "datasource" for v in board["templating"]["list"])
    for panel in board["panels"]:
        assert panel["datasource"]["type"] == "prometheus", panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
