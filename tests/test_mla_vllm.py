"""MLA on real vLLM (CPU): a DeepSeek-V2-shaped random-weight model, holder at TP 2, puller at
TP 1.

MLA's latent KV is the same on every TP rank, so the TP 2 holder has one slice: only its rank
0 saves, serves and registers (its store holds each chunk once), and the puller pulls rank 0's
bytes. On a CPU without AMX vLLM turns prefix caching off for MLA (``platforms/cpu.py``), so the
reference is the holder's own answer served from p2pkv's store (its second request pulls its
own chunks back): the bytes it computed.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

if os.environ.get("P2PKV_REQUIRE_E2E") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")

import httpx  # noqa: E402

from p2pkv.harness.cluster import LocalCluster, wait_healthy  # noqa: E402
from p2pkv.harness.held import HeldWaiter  # noqa: E402
from tests.ranks import LOADED_HOST_CONFIG  # noqa: E402

CHUNK_TOKENS = 128  # chunk_tokens default (8 of MLA's 16-token CPU blocks)
MLA_BLOCK_TOKENS = 16  # vLLM's CPU MLA backend takes this block size only


def mla_model(dest: Path) -> Path:
    """A 2-layer DeepSeek-V2 with the latent size vLLM's CPU MLA kernel takes (kv_lora_rank
    512 + rope 64 = 576), no MoE layer, random weights, the demo model's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, DeepseekV2Config, DeepseekV2ForCausalLM

    from p2pkv.harness.demo_model import prepare

    if (dest / "config.json").exists():
        return dest
    src = prepare()
    tok = AutoTokenizer.from_pretrained(src)
    cfg = DeepseekV2Config(
        vocab_size=AutoConfig.from_pretrained(src).vocab_size, hidden_size=128,
        intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
        qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=2, n_routed_experts=2,
        num_experts_per_tok=1, moe_intermediate_size=64, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    DeepseekV2ForCausalLM(cfg).to(torch.float32).save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = Path(tmp_path_factory.mktemp("mla"))
    with LocalCluster(workdir, mla_model(workdir / "tiny-mla")) as c:
        c.start_directory()
        a = c.start_vllm("A", tensor_parallel_size=2, max_model_len=2048,
                         extra_config=LOADED_HOST_CONFIG)
        b = c.start_vllm("B", max_model_len=2048, extra_config=LOADED_HOST_CONFIG)
        wait_healthy([a, b], timeout_s=900)
        yield c, a, b


def generate(url: str, tokens: list[int]) -> str:
    r = httpx.post(url + "/v1/completions", json={"model": "model", "prompt": tokens,
                                                  "max_tokens": 12, "temperature": 0.0},
                   timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("length", [3 * CHUNK_TOKENS + 40, 4 * CHUNK_TOKENS])
def test_mla_chunks_are_stored_once_and_pulled_into_tp1_unchanged(cluster, length):
    c, a, b = cluster
    tokens = [random.Random(length).randrange(1000, 40000) for _ in range(length)]
    generate(a.url, tokens)  # A computes; only its rank 0 saves
    waiter = HeldWaiter(c.directory, c.model, block_size=MLA_BLOCK_TOKENS)
    waiter.wait_held("A", waiter.keys(tokens))  # published from A's save thread
    reference = generate(a.url, tokens)  # from A's own store (no vLLM prefix cache here)
    before = c.counter_totals().get("chunks_pulled", 0)
    pulled = generate(b.url, tokens)
    assert pulled == reference, (pulled, reference)
    reply = c.stats()
    assert reply is not None
    ids = {i.instance for i in reply.instances}
    assert "A" in ids and "A/1" not in ids, ids  # one slice: rank 1 neither saves nor serves
    by_id = {i.instance: i for i in reply.instances}
    assert by_id["A"].slice is not None and by_id["A"].slice.num_heads == 1
    deadline = time.monotonic() + 15  # counters reach the directory asynchronously
    while c.counter_totals().get("chunks_pulled", 0) <= before:
        assert time.monotonic() < deadline, "B did not pull"
        time.sleep(0.2)


def _counters(c, instance: str) -> dict[str, int]:
    reply = c.stats()
    return next((dict(i.counters) for i in (reply.instances if reply else ())
                 if i.instance == instance), {})


def _wait_counter(c, instance: str, key: str, floor: int, timeout_s: float = 15.0) -> int:
    deadline = time.monotonic() + timeout_s
    while (v := _counters(c, instance).get(key, 0)) <= floor and time.monotonic() < deadline:
        time.sleep(0.2)
    return v


# an MLA chunk: 8 blocks x 16 tokens x (512 + 64) latent values x fp32 x 2 layers, stored
# once per instance (by rank 0), whatever the instance's TP
MLA_CHUNK_BYTES = CHUNK_TOKENS * 576 * 4 * 2


def test_an_mla_tp2_puller_moves_each_chunk_over_the_network_once(cluster):
    """B (TP 1) computes; A (TP 2) pulls: its rank 0 pulls every chunk from B once and relays
    it to rank 1 through shared memory (``p2pkv.vllm.relay``); B serves each chunk once."""
    c, a, b = cluster
    length = 3 * CHUNK_TOKENS + 21
    tokens = [random.Random(length + 7).randrange(1000, 40000) for _ in range(length)]
    generate(b.url, tokens)
    waiter = HeldWaiter(c.directory, c.model, block_size=MLA_BLOCK_TOKENS)
    waiter.wait_held("B", waiter.keys(tokens))
    reference = generate(b.url, tokens)  # from B's own store
    time.sleep(1.0)  # B's counters after its own pull reach the directory
    served = _wait_counter(c, "B", "chunks_served", 0)
    before = _counters(c, "A")
    pulled = generate(a.url, tokens)
    assert pulled == reference, (pulled, reference)
    relayed = _wait_counter(c, "A", "bytes_relayed", before.get("bytes_relayed", 0))
    after = _counters(c, "A")
    chunks = after["chunks_pulled"] - before.get("chunks_pulled", 0)
    moved = after["bytes_pulled"] - before.get("bytes_pulled", 0)
    print(f"MLA TP2 puller: {chunks} chunks, rank 0 pulled {moved} B over the network, "
          f"relayed {relayed - before.get('bytes_relayed', 0)} B to rank 1; store bytes per "
          f"chunk {after.get('chunk_bytes')} (one copy per instance)")
    assert chunks == length // CHUNK_TOKENS, after
    assert moved == chunks * MLA_CHUNK_BYTES, "rank 0 pulls each chunk once"
    assert relayed - before.get("bytes_relayed", 0) == moved, "rank 1 takes them from rank 0"
    assert after["chunks_relayed"] - before.get("chunks_relayed", 0) == chunks
    assert after["chunk_bytes"] == MLA_CHUNK_BYTES  # A's store: one copy per chunk
    # NOTE: a worker reports its counters at its next step: let B step once (no chunk)
    generate(b.url, tokens[:20])
    assert _wait_counter(c, "B", "chunks_served", served) - served == chunks, \
        "B served each chunk once, not once per puller rank"
