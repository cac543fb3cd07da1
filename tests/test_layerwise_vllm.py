"""Layer-wise loads on real vLLM (CPU): a puller with ``load_mode: layerwise`` gives the
holder's own prefix-cache answer, chunk-aligned or not, concurrent, under preemption, and after
the holder died mid-way (recomputed, the answer the puller gives cold).

The holder loads asynchronously (the default); the pullers load layer-wise. A prompt whose every
token is held (chunk-aligned, every chunk held) stays an asynchronous load (vLLM must recompute
its last token, see ``SchedulerSide.get_num_new_matched_tokens``): that case checks the
fallback. Skipped only where vLLM is not installed; CI sets P2PKV_REQUIRE_E2E=1, which turns
that skip into a failure.
"""

from __future__ import annotations

import os
import time

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

if os.environ.get("P2PKV_REQUIRE_E2E") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")

from p2pkv.harness.cluster import LocalCluster, wait_healthy  # noqa: E402
from p2pkv.harness.correctness import (  # noqa: E402
    SMALL_CACHE_BLOCKS,
    SMALL_CACHE_MAX_MODEL_LEN,
    Case,
    cluster_endpoints,
    preemption_cases,
    run_case,
)
from p2pkv.harness.documents import document_tokens  # noqa: E402
from p2pkv.harness.openai_client import complete  # noqa: E402

LAYERWISE = {"load_mode": "layerwise", "layer_groups": 4}
B = 128

CASES = [
    Case("aligned-whole-prompt-async", 4 * B, offset=0),
    Case("aligned-plus-one", 4 * B + 1, offset=600),
    Case("unaligned", 4 * B + 37, offset=1000),
    Case("long-unaligned", 16 * B + 101, offset=300),
    Case("concurrent-x4", 3 * B + 5, offset=2200, concurrent=4),
    *preemption_cases(B),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from p2pkv.harness.demo_model import prepare

    model = prepare()
    with LocalCluster(tmp_path_factory.mktemp("layerwise"), model) as c:
        c.start_directory()
        insts = [c.start_vllm("holder"), c.start_vllm("puller", extra_config=LAYERWISE),
                 c.start_vllm("small-puller", extra_config=LAYERWISE,
                              max_model_len=SMALL_CACHE_MAX_MODEL_LEN,
                              extra_args=["--num-gpu-blocks-override", str(SMALL_CACHE_BLOCKS)])]
        wait_healthy(insts, timeout_s=600)
        yield c, insts, document_tokens(model)


def layerwise_loads(c: LocalCluster) -> int:
    return c.counter_totals().get("loads_layerwise", 0)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layerwise_pull_gives_the_holders_answer(cluster, case):
    c, (holder, puller, small), tokens = cluster
    ep = cluster_endpoints(c, holder, puller, small)
    before = layerwise_loads(c)
    result = run_case(case, tokens, ep)
    assert result.ok, result.detail
    after = _wait_counter(c, before, expect=case.name != "aligned-whole-prompt-async")
    if case.name == "aligned-whole-prompt-async":
        assert after == before, "a whole-prompt hit must stay an asynchronous load"
    else:
        assert after > before, "the puller did not load layer-wise"


def _wait_counter(c: LocalCluster, before: int, expect: bool, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + (timeout_s if expect else 1.0)
    while True:
        now = layerwise_loads(c)
        if (expect and now > before) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def test_a_dead_holder_means_recompute_with_the_cold_answer(cluster):
    c, (holder, puller, _), tokens = cluster
    prompt = list(tokens[2600:2600 + 5 * B + 9])  # no earlier case's prompt reaches it
    assert len(prompt) == 5 * B + 9
    complete(holder.url, prompt, stream=False)  # the holder computes, saves, publishes
    cold = complete(puller.url, prompt, stream=False, cache_salt="cold").text
    failed_before = c.counter_totals().get("chunks_failed", 0)
    holder.proc.kill()  # a crash: the directory still points at it
    answer = complete(puller.url, prompt, stream=False, timeout_s=300).text
    assert answer == cold
    deadline = time.monotonic() + 10
    while c.counter_totals().get("chunks_failed", 0) <= failed_before:
        assert time.monotonic() < deadline, "the puller should have tried, failed, recomputed"
        time.sleep(0.2)
