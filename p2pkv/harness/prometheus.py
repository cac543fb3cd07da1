"""A real Prometheus server (Debian's ``prometheus`` binary) on loopback, for tests and benches.

:func:`start_prometheus` writes a scrape config for the given jobs (``job -> [host:port]``),
starts ``prometheus`` as a process of a :class:`~p2pkv.harness.cluster.LocalCluster` (so it is
stopped with the rest), waits until it is ready, and returns a :class:`Prometheus` that asks
its HTTP API. Prometheus cannot bind port 0, so the port comes from
:func:`~p2pkv.harness.cluster.free_port` (a small race, as for any fixed port).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from p2pkv.harness.cluster import LocalCluster, Proc, free_port

SCRAPE_INTERVAL_S = 1.0


def find_prometheus() -> str | None:
    """The ``prometheus`` binary on PATH (Debian: ``apt-get install prometheus``), or None."""
    return shutil.which("prometheus")


def scrape_config(jobs: dict[str, list[str]], interval_s: float = SCRAPE_INTERVAL_S) -> str:
    """prometheus.yml for static targets (YAML is a superset of JSON: written as JSON)."""
    return json.dumps({
        "global": {"scrape_interval": f"{interval_s:g}s",
                   "scrape_timeout": f"{interval_s:g}s"},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}
                           for job, targets in jobs.items()],
    }, indent=2)


@dataclass
class Prometheus:
    url: str
    proc: Proc

    def query(self, expr: str, timeout_s: float = 10.0) -> list[dict]:
        """An instant query; the ``result`` list (each with ``metric`` labels and ``value``)."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=timeout_s)
        r.raise_for_status()
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query {expr!r} failed: {body}")
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single number an expression gives (``sum(...)``), None when it has no result."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, expr: str, at_least: float, timeout_s: float = 30.0) -> float | None:
        """Poll until ``expr`` is at least ``at_least`` (scrapes come every interval)."""
        deadline = time.monotonic() + timeout_s
        while True:
            v = self.value(expr)
            if (v is not None and v >= at_least) or time.monotonic() > deadline:
                return v
            time.sleep(0.5)

    def metric_names(self) -> set[str]:
        r = httpx.get(f"{self.url}/api/v1/label/__name__/values", timeout=10.0)
        r.raise_for_status()
        return set(r.json()["data"])

    def targets(self) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/targets", timeout=10.0)
        r.raise_for_status()
        return r.json()["data"]["activeTargets"]


def start_prometheus(cluster: LocalCluster, jobs: dict[str, list[str]], *,
                     binary: str | None = None, timeout_s: float = 60.0) -> Prometheus:
    binary = binary or find_prometheus()
    if binary is None:
        raise RuntimeError("prometheus is not installed (Debian: apt-get install prometheus)")
    workdir = cluster.workdir / "prometheus"
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(scrape_config(jobs))
    port = free_port()
    proc = cluster.start_process("prometheus", [
        binary, f"--config.file={config}", f"--storage.tsdb.path={Path(workdir) / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
        "--log.level=warn"])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if not proc.alive():
            raise RuntimeError(f"prometheus exited:\n{proc.tail()}")
        try:
            if httpx.get(url + "/-/ready", timeout=2.0).status_code == 200:
                return Prometheus(url, proc)
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"prometheus not ready after {timeout_s:.0f} s:\n{proc.tail()}")
        time.sleep(0.2)
