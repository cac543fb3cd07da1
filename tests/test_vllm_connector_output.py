"""What vLLM's scheduler hands the connector after each step (``update_connector_output``)
reaches both of its users: the planner (step timing, pull samples: its gauges in /metrics)
and the lease book (``finished_sending``). Issue 15: after the merge of the planner with the
leases the class had two such methods, the second replaced the first, and the planner's
prefill gauge never appeared in Prometheus."""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="the connector subclasses vLLM's connector base")

from vllm.v1.outputs import KVConnectorOutput  # noqa: E402

from p2pkv.keys import Namespace  # noqa: E402
from p2pkv.vllm.config import ConnectorConfig  # noqa: E402
from p2pkv.vllm.connector import P2PKVConnector  # noqa: E402
from p2pkv.vllm.metadata import P2PKVWorkerMeta  # noqa: E402
from p2pkv.vllm.planning import ConnectorPlanner, PullSample, optimistic_profile  # noqa: E402
from p2pkv.vllm.scheduler import SchedulerSide  # noqa: E402

from tests.test_vllm_scheduler import (  # noqa: E402
    BLOCK,
    FakeDirectory,
    _planner_step,
    request,
)

PACKAGE = Path(__file__).resolve().parent.parent / "p2pkv"


def _scheduler_connector(clock) -> tuple[P2PKVConnector, SchedulerSide]:
    """A scheduler-role connector around a real SchedulerSide (planner and leases on),
    without vLLM's engine behind it."""
    config = ConnectorConfig(directory="tcp://127.0.0.1:1", lease_s=5.0)
    side = SchedulerSide(config, namespace=Namespace("ns"), block_size=BLOCK, chunk_blocks=1,
                         can_load=True, can_save=True, directory=FakeDirectory(), clock=clock,
                         planner=ConnectorPlanner(optimistic_profile(1000), clock=clock),
                         free_blocks=lambda: (90, 100))
    connector = object.__new__(P2PKVConnector)
    connector._scheduler, connector._worker = side, None
    return connector, side


def test_update_connector_output_feeds_the_planner_and_ends_leases():
    now = [0.0]
    connector, side = _scheduler_connector(lambda: now[0])
    r = request("r", 2)
    r.num_computed_tokens = 2 * BLOCK
    side.get_num_new_matched_tokens(r, 0)
    assert side.request_finished("r", status="FINISHED_STOPPED", block_ids=([1, 2],))
    # a prefill step of a 512-token prompt, answered 0.5 s later, with two pulls from "b"
    side.build_meta(_planner_step(new=[("p", 512, 0, 512)]), lambda _: ([],))
    now[0] += 0.5
    connector.update_connector_output(KVConnectorOutput(
        finished_sending={"r"},
        kv_connector_worker_meta=P2PKVWorkerMeta([PullSample("b", 10_000, 0.01),
                                                  PullSample("b", 40_000, 0.03)])))
    stats = connector.get_kv_connector_stats()
    assert stats is not None
    gauges = stats.data["gauges"]
    prefill = {k: v for k, v in gauges.items()
               if k.startswith("planner_prefill_tokens_per_second|")}
    assert prefill and all(v > 0 for v in prefill.values())
    assert gauges["planner_peer_bytes_per_second|b"] > 0
    assert len(side._book) == 0  # the lease left the book with finished_sending


def test_the_planners_gauges_reach_the_prometheus_series():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from p2pkv.vllm.prom import P2PKVPromMetrics

    now = [0.0]
    connector, side = _scheduler_connector(lambda: now[0])
    side.build_meta(_planner_step(new=[("p", 300, 0, 300)]), lambda _: ([],))
    now[0] += 0.25
    connector.update_connector_output(KVConnectorOutput(
        kv_connector_worker_meta=P2PKVWorkerMeta()))
    registry = CollectorRegistry()
    types = {cls: functools.partial(cls, registry=registry)
             for cls in (Counter, Gauge, Histogram)}
    prom = P2PKVPromMetrics(SimpleNamespace(kv_transfer_config=None), types,
                            ["model_name", "engine"], {0: ["model", "0"]})
    stats = connector.get_kv_connector_stats()
    assert stats is not None
    prom.observe(stats.data, 0)
    samples = [s for f in text_string_to_metric_families(generate_latest(registry).decode())
               for s in f.samples
               if s.name == "p2pkv_connector_planner_prefill_tokens_per_second"]
    assert samples and max(s.value for s in samples) > 0
    assert {s.labels["engine"] for s in samples} == {"0"} and all(
        s.labels["bucket"] for s in samples)


def _duplicate_methods(tree: ast.AST) -> list[tuple[str, str, int]]:
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        seen: dict[str, int] = {}
        for item in node.body:
            if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            decorators = {ast.unparse(d) for d in item.decorator_list}
            if any(d.endswith((".setter", ".deleter", "overload")) for d in decorators):
                continue  # a property's setter, typing overloads: meant to share the name
            if item.name in seen:
                out.append((node.name, item.name, item.lineno))
            seen[item.name] = item.lineno
    return out


def test_no_class_in_the_package_defines_a_method_twice():
    """A second ``def`` of a name in a class body replaces the first without a word (what a
    merge left in ``P2PKVConnector``, issue 15)."""
    found = [(path.relative_to(PACKAGE.parent), *d) for path in sorted(PACKAGE.rglob("*.py"))
             for d in _duplicate_methods(ast.parse(path.read_text(), str(path)))]
    assert found == []
