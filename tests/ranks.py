"""Helpers for the real-vLLM tests at TP/PP > 1: token prompts and waiting for every worker
rank of an engine to publish a request's chunks (saves run on a save thread, after the
answer; ranks keep earlier cases' chunks, so counts are taken relative to a snapshot)."""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from p2pkv.harness.cluster import LocalCluster


LOADED_HOST_CONFIG: dict[str, object] = {"lookup_timeout_s": 2.0}
"""Connector settings of the instances in these tests (``extra_config``).

NOTE: these tests assert that every chunk is pulled, so a lookup must not time out. A 2-CPU
host running a TP/PP instance (one process per rank, each spinning on vLLM's shared-memory
queues while a request runs), a second instance, the directory and the test can starve the
directory for longer than the default 250 ms: measured 2026-12-04 (a probe beside
tests/test_pp_vllm.py's cluster, 12 PP2 pulls, Stats round trips every 20 ms during the
requests): p50 0.7 ms, p99 50.6 ms, max 414 ms; CI saw one PP2 lookup time out at 250 ms
(0 of 5 chunks pulled, correct answer by recompute). A timeout there is the deadline doing
its job (tests/test_vllm_scheduler.py and ``p2pkv bench faults`` test that); what these tests
check is the pull path, so they give the directory 2 s."""


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(length)]


def held(c: LocalCluster, engine: str) -> dict[str, int]:
    """Chunks published by each registered rank of ``engine`` ("A", "A/1", ...)."""
    reply = c.stats()
    return {i.instance: i.chunks for i in (reply.instances if reply else ())
            if i.instance == engine or i.instance.startswith(engine + "/")}


def wait_held(c: LocalCluster, engine: str, before: dict[str, int], new: int,
              timeout_s: float = 15.0) -> None:
    """Wait until every rank of ``engine`` has published ``new`` more chunks than in
    ``before`` (saves are asynchronous: a puller asking earlier would find fewer)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = held(c, engine)
        if now and all(n >= before.get(k, 0) + new for k, n in now.items()):
            return
        time.sleep(0.1)
    raise AssertionError(f"{engine} did not publish {new} more chunks on every rank")
