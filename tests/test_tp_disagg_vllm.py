"""Prefill/decode disaggregation across tensor-parallel sizes on real vLLM (CPU): the prefill
instance P runs at TP 2 (``kv_producer``), the decode instance D at TP 1 (``kv_consumer``).

A tiny random-weight Llama with 4 KV heads: each of P's ranks saves (and registers) heads 0-1
or 2-3 of every chunk, the prompt's partial last chunk included; D's one rank pulls both
halves of every chunk into the same blocks. The identity promise, as in
``tests/test_disagg_vllm.py``: D's greedy answer equals P's own answer to the same prompt
served from P's prefix cache (the bytes P computed), token for token; the correctness
suite's P/D cases run on the same pair, and one request goes through ``p2pkv router``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

if os.environ.get("P2PKV_REQUIRE_E2E") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")

from p2pkv.harness.cluster import LocalCluster, wait_healthy  # noqa: E402
from tests.ranks import held, prompt, wait_held  # noqa: E402
from p2pkv.harness.correctness import cluster_endpoints, pd_cases, run_cases  # noqa: E402
from p2pkv.harness.openai_client import COMPLETIONS, complete, post  # noqa: E402

CHUNK = 128  # the CPU block size; chunk_tokens defaults to one block
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from p2pkv.harness.demo_model import prepare, tiny_model

    workdir = Path(tmp_path_factory.mktemp("tpdisagg"))
    model = tiny_model(workdir / "tiny-4kv", prepare(), num_layers=2, num_heads=4,
                       num_kv_heads=4)
    with LocalCluster(workdir, model) as c:
        c.start_directory()
        common = dict(max_model_len=2048, kv_cache_gib=1)
        p = c.start_vllm("P", kv_role="kv_producer", tensor_parallel_size=2, **common)
        d = c.start_vllm("D", kv_role="kv_consumer", **common)
        wait_healthy([p, d], timeout_s=900)
        yield c, p, d, model


def answer(url: str, tokens: list[int]) -> str:
    return complete(url, tokens, max_tokens=MAX_TOKENS, stream=False).text


def rank_counter(c: LocalCluster, instance: str, key: str) -> int:
    reply = c.stats()
    return sum(i.counters.get(key, 0) for i in (reply.instances if reply else ())
               if i.instance == instance)


def wait_rank_counter(c: LocalCluster, instance: str, key: str, want: int,
                      timeout_s: float = 15.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        value = rank_counter(c, instance, key)
        if value >= want or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_both_prefill_ranks_register_their_halves(cluster):
    c, *_ = cluster
    reply = c.stats()
    assert reply is not None
    by_id = {i.instance: i for i in reply.instances}
    assert {"P", "P/1", "D"} <= set(by_id)
    assert (by_id["P"].slice.head_start, by_id["P"].slice.head_end) == (0, 2)
    assert (by_id["P/1"].slice.head_start, by_id["P/1"].slice.head_end) == (2, 4)
    assert (by_id["D"].slice.head_start, by_id["D"].slice.head_end) == (0, 4)


@pytest.mark.parametrize("length", [3 * CHUNK + 57, 3 * CHUNK])
def test_decode_at_tp1_answers_like_the_tp2_prefill_instance(cluster, length):
    c, p, d, _ = cluster
    tokens = prompt(7000 + length, length)

    since = held(c, "P")
    answer(p.url, tokens)  # P computes and saves every chunk, the partial last one too
    # NOTE: a producer saves the partial chunk once the whole prompt is computed (on a save
    # thread, after the answer); both of P's ranks must hold every new chunk before D looks
    # them up
    chunks = -(-length // CHUNK)
    wait_held(c, "P", since, chunks)
    reference = answer(p.url, tokens)  # P's own prefix-cache hit
    before = rank_counter(c, "D", "chunks_pulled")
    decoded = answer(d.url, tokens)
    # NOTE: D's one rank pulls each chunk from both of P's ranks and counts it once
    pulled = wait_rank_counter(c, "D", "chunks_pulled", before + chunks) - before
    assert decoded == reference, (decoded, reference)
    assert pulled == chunks, f"D pulled {pulled} chunks, want {chunks} (the partial one too)"


@pytest.fixture(scope="module")
def pd_results(cluster):
    c, p, d, _ = cluster
    source = prompt(99, 4000)
    ep = cluster_endpoints(c, p, d, holder_partial=True)
    return {r.case.name: r for r in run_cases(pd_cases(), source, ep)}


@pytest.mark.parametrize("name", [case.name for case in pd_cases()])
def test_correctness_pd_case(pd_results, name):
    r = pd_results[name]
    assert r.ok, r.detail


def test_router_prefills_at_tp2_and_decodes_at_tp1(cluster):
    c, p, d, model = cluster
    router = c.start_router(model, prefill=[p], decode=[d])
    tokens = prompt(4321, 2 * CHUNK + 45)
    body = {"model": "model", "prompt": tokens, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    before = rank_counter(c, "D", "chunks_pulled")
    r = post(router.url, COMPLETIONS, body, timeout_s=300)
    assert (r.headers["x-p2pkv-prefill-instance"], r.headers["x-p2pkv-instance"]) == ("P", "D")
    decoded = r.json()["choices"][0]["text"]
    reference = answer(p.url, tokens)  # P's own prefix-cache answer
    assert decoded == reference, (decoded, reference)
    assert wait_rank_counter(c, "D", "chunks_pulled", before + 3) - before == 3
