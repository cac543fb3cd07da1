"""Pipeline parallelism on real vLLM (CPU: one worker process per stage): A at PP 2, B at
PP 1, a random-weight Llama with 4 layers and 4 KV heads.

Each of A's stages saves, registers and serves its own layers (``A``: layers 0-2, ``A/1``:
layers 2-4). PP2→PP1: B's one rank pulls layers 0-2 from A's stage 0 and 2-4 from stage 1;
PP1→PP2: each of A's stages pulls only its own layers from B. The puller's greedy output must
equal the holder's own prefix-cache output, token for token.
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

CHUNK = 128


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from p2pkv.harness.demo_model import prepare, tiny_model

    workdir = Path(tmp_path_factory.mktemp("pp"))
    model = tiny_model(workdir / "tiny-4l", prepare(), num_layers=4, num_heads=4,
                       num_kv_heads=4)
    cores = sorted(os.sched_getaffinity(0))
    with LocalCluster(workdir, model) as c:
        c.start_directory()
        # NOTE: not eager: with --enforce-eager vLLM's CPU backend skips its warm-up
        # (v1/worker/cpu_model_runner.py, warming_up_model: CompilationMode.NONE returns), so a
        # later stage never allocates its intermediate tensors and its first step fails
        # (v1/worker/gpu_model_runner.py, sync_and_gather_intermediate_tensors: assert
        # self.intermediate_tensors is not None)
        a = c.start_vllm("A", max_model_len=2048, enforce_eager=False,
                         extra_config=LOADED_HOST_CONFIG,
                         extra_args=["--pipeline-parallel-size", "2"],
                         extra_env={"VLLM_CPU_OMP_THREADS_BIND":
                                    f"{cores[0]}|{cores[1 % len(cores)]}"})
        b = c.start_vllm("B", max_model_len=2048, extra_config=LOADED_HOST_CONFIG)
        wait_healthy([a, b], timeout_s=900)
        yield c, a, b


def generate(url: str, tokens: list[int]) -> str:
    r = httpx.post(url + "/v1/completions", json={"model": "model", "prompt": tokens,
                                                  "max_tokens": 12, "temperature": 0.0},
                   timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def pulled(c: LocalCluster, instances: tuple[str, ...]) -> dict[str, int]:
    reply = c.stats()
    return {i.instance: i.counters.get("chunks_pulled", 0)
            for i in (reply.instances if reply else ()) if i.instance in instances}


def test_each_stage_registers_its_layers(cluster):
    c, a, b = cluster
    reply = c.stats()
    slices = {i.instance: (i.slice.layer_start, i.slice.layer_end) for i in reply.instances
              if i.slice is not None}
    assert slices.get("A") == (0, 2) and slices.get("A/1") == (2, 4), slices
    assert slices.get("B", (0, 4)) == (0, 4)


@pytest.mark.parametrize("direction, length", [
    ("PP2->PP1", 4 * CHUNK), ("PP2->PP1", 3 * CHUNK + 40),
    ("PP1->PP2", 4 * CHUNK),
    ("PP1->PP2", 5 * CHUNK + 3)])
def test_puller_answers_like_the_holder(cluster, direction, length):
    c, a, b = cluster
    holder, puller, pullers = ((a, b, ("B",)) if direction == "PP2->PP1"
                               else (b, a, ("A", "A/1")))
    tokens = prompt(length + (0 if direction == "PP2->PP1" else 7), length)
    published = held(c, holder.name)
    generate(holder.url, tokens)
    wait_held(c, holder.name, published, length // CHUNK)
    reference = generate(holder.url, tokens)  # the holder's own prefix cache
    before = pulled(c, pullers)
    answer = generate(puller.url, tokens)
    assert answer == reference, (answer, reference)
    want = length // CHUNK  # every full chunk
    deadline = time.monotonic() + 15  # counters reach the directory asynchronously
    while True:
        now = pulled(c, pullers)
        gained = {k: now.get(k, 0) - before.get(k, 0) for k in pullers}
        if all(v >= want for v in gained.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert gained == {k: want for k in pullers}, gained  # every stage pulls every chunk
