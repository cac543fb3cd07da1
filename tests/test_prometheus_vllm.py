"""A real Prometheus (Debian's ``prometheus``) scrapes the directory, the router and two real
vLLM CPU instances; after a remote hit its HTTP API has p2pkv's series next to vLLM's own.

The instances name the connector by the short form (``"kv_connector":"P2PKVConnector"``
without ``kv_connector_module_path``), so this is also the end-to-end check of p2pkv's vLLM
plugin entry point. The tiny random-weight model is enough: only plumbing is checked.

Skipped where vLLM or the prometheus binary is missing; under CI (``CI=true`` with
``P2PKV_REQUIRE_E2E=1``) a missing prometheus fails instead: scripts/setup.sh installs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REQUIRED = os.environ.get("P2PKV_REQUIRE_E2E") == "1"
if not REQUIRED:
    pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")

from p2pkv.harness.cluster import (  # noqa: E402
    LocalCluster,
    free_port,
    kv_transfer_config,
    wait_healthy,
)
from p2pkv.harness.documents import document_messages, document_part  # noqa: E402
from p2pkv.harness.held import HeldWaiter  # noqa: E402
from p2pkv.harness.openai_client import chat, chat_body  # noqa: E402
from p2pkv.harness.prometheus import find_prometheus, start_prometheus  # noqa: E402

if find_prometheus() is None:
    reason = ("Debian's prometheus is not installed (scripts/setup.sh installs it with apt "
              "when run as root: apt-get install prometheus)")
    if REQUIRED and os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)

DASHBOARD = Path(__file__).resolve().parent.parent / "launch" / "grafana" / "p2pkv.json"


def short_form(directory: str, name: str) -> list[str]:
    """--kv-transfer-config naming the connector by its registered name only."""
    config = json.loads(kv_transfer_config(directory, engine_id=name))
    del config["kv_connector_module_path"]
    return ["--kv-transfer-config", json.dumps(config)]


def host_port(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from p2pkv.harness.demo_model import tiny_model

    workdir = Path(tmp_path_factory.mktemp("prometheus"))
    model = tiny_model(workdir / "tiny")
    with LocalCluster(workdir, model) as c:
        metrics_port = free_port()
        ready = workdir / "directory.endpoint"
        directory = c.start_process("directory", [
            sys.executable, "-m", "p2pkv", "directory", "--bind", "tcp://127.0.0.1:0",
            "--ready-file", str(ready), "--metrics-port", str(metrics_port)])
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text().strip()):
            assert directory.alive() and time.monotonic() < deadline, directory.tail()
            time.sleep(0.05)
        c.directory = ready.read_text().strip()
        a = c.start_vllm("A", connector=False, max_model_len=2048, extra_args=short_form(c.directory, "A"))
        b = c.start_vllm("B", connector=False, max_model_len=2048, extra_args=short_form(c.directory, "B"))
        wait_healthy([a, b], timeout_s=600)
        router = c.start_router(model, instances=[a, b])
        prom = start_prometheus(c, {
            "p2pkv-directory": [f"127.0.0.1:{metrics_port}"],
            "p2pkv-router": [host_port(router.url)],
            "vllm": [host_port(a.url), host_port(b.url)],
        })
        yield c, a, b, router, prom


def test_prometheus_has_p2pkv_series_after_a_remote_hit(stack):
    c, a, b, router, prom = stack
    messages = document_messages(document_part(0, 6), "Who founded the cooperative?")
    chat(a.url, messages, max_tokens=4)  # A computes and publishes
    waiter = HeldWaiter(c.directory, c.model)  # A publishes from its save thread: wait for it
    waiter.wait_held("A", waiter.chat_keys(chat_body(messages, max_tokens=4)))
    chat(b.url, messages, max_tokens=4)  # B pulls A's chunks: a remote hit
    chat(router.url, document_messages(document_part(1, 6), "Why?"), max_tokens=4)

    pulled = prom.wait_value("sum(p2pkv_connector_chunks_pulled_total)", 1)
    assert pulled is not None and pulled >= 1, "no pulled chunks in Prometheus"
    assert prom.wait_value("sum(p2pkv_connector_bytes_pulled_total)", 1) > 0
    assert prom.wait_value("sum(p2pkv_connector_remote_hit_tokens_total)", 128) >= 128
    assert prom.wait_value("sum(p2pkv_connector_lookup_seconds_count)", 1) >= 1
    buckets = prom.query("p2pkv_connector_lookup_seconds_bucket")
    assert len({s["metric"]["le"] for s in buckets}) > 3  # a histogram, not a counter
    # the connector's planner measured A's prefill steps (issue 15)
    assert prom.wait_value("max(p2pkv_connector_planner_prefill_tokens_per_second)", 1) > 0
    assert prom.wait_value("max(p2pkv_directory_chunks)", 1) >= 1
    assert prom.wait_value("max(p2pkv_directory_instances)", 2) == 2
    assert prom.wait_value("sum(p2pkv_router_requests_total)", 1) >= 1
    # p2pkv's series sit in vLLM's own /metrics: per instance, beside vLLM's own
    per_instance = prom.query('p2pkv_connector_chunks_pulled_total{job="vllm"}')
    assert {s["metric"]["instance"] for s in per_instance} == {host_port(a.url),
                                                                host_port(b.url)}
    assert prom.wait_value('count(vllm:prompt_tokens_total{job="vllm"})', 2) == 2
    ups = {t["labels"]["job"]: t["health"] for t in prom.targets()}
    assert set(ups.values()) == {"up"} and len(ups) == 3, prom.targets()


def test_p2pkv_status_shows_the_planners_figures(stack):
    """A's scheduler side hands its planner's figures to its workers, which report them to
    the directory: ``p2pkv status`` lists them (after the remote-hit test's steps)."""
    c, a, b, router, prom = stack
    chat(a.url, document_messages(document_part(2, 6), "When?"), max_tokens=4)
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run([sys.executable, "-m", "p2pkv", "status", "--directory",
                              c.directory, "--timeout", "5"], capture_output=True, text=True,
                             timeout=30)
        if "planner_prefill_tok_s_" in out.stdout:
            break
        assert time.monotonic() < deadline, out.stdout + out.stderr
        time.sleep(1)
    assert "planner_pulls" in out.stdout, out.stdout


def test_every_dashboard_metric_is_in_prometheus(stack):
    from tests.test_grafana_dashboard import dashboard_names

    c, a, b, router, prom = stack
    names = prom.metric_names()
    missing = dashboard_names() - names
    assert not missing, f"dashboard metrics Prometheus never scraped: {sorted(missing)}"


def test_vllm_logs_the_connector_stats(stack):
    """vLLM's periodic log line ("KV Transfer metrics: ...") carries p2pkv's summary."""
    c, a, b, router, prom = stack
    deadline = time.monotonic() + 30
    while "KV Transfer metrics:" not in b.proc.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, b.proc.tail()
        time.sleep(1)
    line = next(x for x in b.proc.log.read_text().splitlines() if "KV Transfer metrics:" in x)
    assert "chunks_pulled=" in line, line
    assert httpx.get(b.url + "/metrics", timeout=10).status_code == 200
