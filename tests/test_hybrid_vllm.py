"""Hybrid attention on real vLLM (CPU) with its hybrid KV-cache allocator on: a random-weight
Gemma-2 (sliding window 200 on layers 0 and 2, full attention on 1 and 3), two KV-cache
groups, holder A and puller B at TP 1, and holder H at TP 2 (one KV head per rank).

The puller's greedy output must equal the holder's own output for the same prompt served
from its own prefix cache, for chunk-aligned and unaligned prompts and prompts far longer
than the window. A sliding-window group keeps only the window's blocks (the others are vLLM's
null block), so the puller pulls the full-attention group of every chunk and the
sliding-window group of the chunks the window still reaches: fewer bytes than whole chunks.
From H, B's one rank pulls each of H's ranks' head (TP2→TP1), both groups' selections.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

if os.environ.get("P2PKV_REQUIRE_E2E") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")

import httpx  # noqa: E402

from p2pkv.harness.cluster import LocalCluster, wait_healthy  # noqa: E402
from tests.ranks import LOADED_HOST_CONFIG, held, prompt, wait_held  # noqa: E402

CHUNK = 128  # the CPU block size; chunk_tokens defaults to one block
WINDOW = 200
LAYERS, KV_HEADS, HEAD_SIZE = 4, 2, 64
GROUP_CHUNK_BYTES = LAYERS // 2 * KV_HEADS * CHUNK * 2 * HEAD_SIZE * 4  # one group, fp32


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from p2pkv.harness.demo_model import prepare, tiny_hybrid_model

    workdir = Path(tmp_path_factory.mktemp("hybrid"))
    model = tiny_hybrid_model(workdir / "tiny-gemma2", prepare(), num_layers=LAYERS,
                              num_kv_heads=KV_HEADS, sliding_window=WINDOW)
    with LocalCluster(workdir, model) as c:
        c.start_directory()
        a = c.start_vllm("A", max_model_len=2048, extra_config=LOADED_HOST_CONFIG)
        b = c.start_vllm("B", max_model_len=2048, extra_config=LOADED_HOST_CONFIG)
        h = c.start_vllm("H", max_model_len=2048, tensor_parallel_size=2,
                         extra_config=LOADED_HOST_CONFIG)
        wait_healthy([a, b, h], timeout_s=900)
        yield c, a, b, h


def generate(url: str, tokens: list[int]) -> str:
    r = httpx.post(url + "/v1/completions", json={"model": "model", "prompt": tokens,
                                                  "max_tokens": 12, "temperature": 0.0},
                   timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def counters(c: LocalCluster, instance: str) -> dict[str, int]:
    reply = c.stats()
    for info in reply.instances if reply else ():
        if info.instance == instance:
            return dict(info.counters)
    return {}


def test_vllm_keeps_two_groups(cluster):
    c, a, b, h = cluster
    for inst in (a, b, h):
        log = inst.proc.log.read_text(errors="replace")
        assert "Turning off hybrid kv cache manager" not in log
        assert f"groupsfullx2+sw{WINDOW}x2" in log, inst.proc.tail(60)


@pytest.mark.parametrize("holder, length", [
    ("A", 4 * CHUNK), ("A", 3 * CHUNK + 40), ("A", 8 * CHUNK + 17),
    ("H", 4 * CHUNK), ("H", 6 * CHUNK + 77)])
def test_puller_answers_like_the_holder(cluster, holder, length):
    c, a, b, h = cluster
    holder_url = {"A": a.url, "H": h.url}[holder]
    tokens = prompt(length + (1000 if holder == "H" else 0), length)
    published = held(c, holder)
    generate(holder_url, tokens)  # the holder computes and saves every group of every chunk
    wait_held(c, holder, published, length // CHUNK)
    reference = generate(holder_url, tokens)  # again, from its own prefix cache
    before = counters(c, "B")
    pulled = generate(b.url, tokens)
    assert pulled == reference, (pulled, reference)
    # the hit ends before the prompt's last token; chunks the window no longer reaches come
    # without the sliding-window group
    chunks = (length - 1) // CHUNK
    end = chunks * CHUNK
    first_windowed = (end - WINDOW + 1) // CHUNK
    want = chunks * GROUP_CHUNK_BYTES + (chunks - first_windowed) * GROUP_CHUNK_BYTES
    deadline = time.monotonic() + 15  # counters reach the directory asynchronously
    while True:
        now = counters(c, "B")
        got = {k: now.get(k, 0) - before.get(k, 0) for k in ("chunks_pulled", "bytes_pulled")}
        if got["chunks_pulled"] >= chunks or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == {"chunks_pulled": chunks, "bytes_pulled": want}, (got, now)
