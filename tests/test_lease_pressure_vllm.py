"""Memory pressure ends leases early, on real vLLM (CPU): a prefill instance (``kv_producer``)
with a long lease and a free-block watermark of 90 %. A short request's lease fits under the
watermark; a long request that follows pushes vLLM's free blocks below it, so the short
request's lease ends early and the long one is not leased (its chunks go to the store): vLLM
gets every block back long before ``lease_s``.

The watermark holds for a KV cache between ~60 and ~300 blocks (here 1 GiB of 5.9 MB blocks).
Skipped only where vLLM is not installed; CI sets P2PKV_REQUIRE_E2E=1.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

if os.environ.get("P2PKV_REQUIRE_E2E") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")

from p2pkv.harness.cluster import LocalCluster, wait_healthy  # noqa: E402
from p2pkv.harness.documents import document, document_messages  # noqa: E402
from p2pkv.harness.openai_client import CHAT, chat_body, post  # noqa: E402

from tests.test_lease_vllm import counters, usage, wait_for  # noqa: E402

LEASE_S = 120.0


def test_memory_pressure_ends_leases_early(tmp_path):
    from p2pkv.harness.demo_model import prepare

    model = prepare()
    with LocalCluster(tmp_path, model) as c:
        c.start_directory()
        p = c.start_vllm("P", kv_role="kv_producer",
                         extra_config={"lease_s": LEASE_S, "lease_min_free_fraction": 0.9,
                                       "transport": "tcp"})
        wait_healthy([p], timeout_s=600)
        short = chat_body(document_messages(document()[:2500], "Who founded it?"),
                          max_tokens=1)
        post(p.url, CHAT, short, timeout_s=300)
        assert usage(p.url) > 0, "the short request's blocks should be held by its lease"
        time.sleep(2)
        assert usage(p.url) > 0, "nothing should end the short lease yet"
        t0 = time.monotonic()
        long = chat_body(document_messages(document()[2500:13500], "What is it about?"),
                         max_tokens=1)
        post(p.url, CHAT, long, timeout_s=300)
        freed = wait_for(lambda: usage(p.url) < 1e-9 or None, 30)
        waited = time.monotonic() - t0
        assert freed, f"pressure should have ended the leases (usage {usage(p.url)})"
        assert waited < LEASE_S / 2, waited
        got = wait_for(lambda: (x := counters(c, "P")).get("leases_released", 0) >= 2 and x, 10)
        assert got, counters(c, "P")
        assert got.get("leases_granted") == 1, got  # the long request was not leased
        assert got.get("chunks_moved_to_store", 0) > 0, got
