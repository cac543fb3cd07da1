"""Tensor parallelism on real vLLM (CPU: one worker process per rank), including pulls between
instances at different TP.

Three instances of a tiny random-weight Llama with 4 KV heads: A at TP 2, B at TP 1, C at TP 2.
Every identity test compares the puller's greedy output with the holder's own output for the
same prompt served from its own prefix cache (the bytes the holder computed): TP2→TP1 (B's
only rank pulls both of A's ranks), TP2→TP2 (each of C's ranks pulls its own rank of A),
TP1→TP2 (each of C's ranks pulls its half of the heads of B's one rank). Prompts are token ids
of chunk-aligned and unaligned lengths. Last, a holder rank dies: the puller recomputes, and
its answer is its own cold answer (the same prompt under another ``cache_salt``).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

if os.environ.get("P2PKV_REQUIRE_E2E") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")

import httpx  # noqa: E402

from p2pkv.harness.cluster import LocalCluster, wait_healthy  # noqa: E402
from tests.ranks import LOADED_HOST_CONFIG, held, prompt, wait_held  # noqa: E402

CHUNK = 128  # the CPU block size; chunk_tokens defaults to one block
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from p2pkv.harness.demo_model import prepare, tiny_model

    workdir = Path(tmp_path_factory.mktemp("tp"))
    model = tiny_model(workdir / "tiny-4kv", prepare(), num_layers=2, num_heads=4,
                       num_kv_heads=4)
    with LocalCluster(workdir, model) as c:
        # NOTE: a long lease keeps a killed rank listed while the dead-rank test pulls
        c.start_directory(env={"P2PKV_HEARTBEAT_LIVENESS": "30"})
        common = dict(max_model_len=2048, kv_cache_gib=1, extra_config=LOADED_HOST_CONFIG)
        a = c.start_vllm("A", tensor_parallel_size=2, **common)
        b = c.start_vllm("B", **common)
        cc = c.start_vllm("C", tensor_parallel_size=2, **common)
        wait_healthy([a, b, cc], timeout_s=900)
        yield c, a, b, cc


def generate(url: str, tokens: list[int], salt: str | None = None) -> str:
    body = {"model": "model", "prompt": tokens, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    if salt is not None:
        body["cache_salt"] = salt
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    out = r.json()
    assert out["usage"]["prompt_tokens"] == len(tokens)
    return out["choices"][0]["text"]


def counters(c: LocalCluster, engine: str) -> dict[str, int]:
    """Counters summed over an engine's registered ranks ("A", "A/1", ...)."""
    reply = c.stats()
    totals: dict[str, int] = {}
    for info in reply.instances if reply else ():
        if info.instance == engine or info.instance.startswith(engine + "/"):
            for k, v in info.counters.items():
                totals[k] = totals.get(k, 0) + v
    return totals


def wait_counter_above(c: LocalCluster, engine: str, key: str, floor: int,
                       timeout_s: float = 15.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        value = counters(c, engine).get(key, 0)
        if value > floor or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_every_rank_registers_its_slice(cluster):
    c, *_ = cluster
    reply = c.stats()
    assert reply is not None
    by_id = {i.instance: i for i in reply.instances}
    assert {"A", "A/1", "B", "C", "C/1"} <= set(by_id)
    assert (by_id["A"].slice.head_start, by_id["A"].slice.head_end) == (0, 2)
    assert (by_id["A/1"].slice.head_start, by_id["A/1"].slice.head_end) == (2, 4)
    assert (by_id["B"].slice.head_start, by_id["B"].slice.head_end) == (0, 4)
    assert by_id["A/1"].engine == "A" and by_id["A"].namespace == by_id["B"].namespace


@pytest.mark.parametrize("holder, puller, length", [
    ("A", "B", 3 * CHUNK),  # TP2 -> TP1, chunk-aligned
    ("A", "B", 3 * CHUNK + 57),  # TP2 -> TP1, unaligned
    ("A", "C", 2 * CHUNK + 70),  # TP2 -> TP2
    ("B", "C", 3 * CHUNK),  # TP1 -> TP2, aligned
    ("B", "C", 2 * CHUNK + 31),  # TP1 -> TP2, unaligned
])
def test_puller_answers_like_the_holders_own_prefix_cache(cluster, holder, puller, length):
    c, *instances = cluster
    url = {i.name: i.url for i in instances}
    tokens = prompt(hash((holder, puller, length)) & 0xFFFF, length)
    since = held(c, holder)
    generate(url[holder], tokens)  # the holder computes, saves and publishes
    wait_held(c, holder, since, length // CHUNK)
    reference = generate(url[holder], tokens)  # its own prefix-cache hit
    before = counters(c, puller).get("chunks_pulled", 0)
    pulled = generate(url[puller], tokens)
    ranks = 2 if puller == "C" else 1
    # NOTE: each rank reports its counters on its own heartbeat: wait for all of them, not
    # for the first rank's report (seen in CI: 2 of 4 counted)
    after = wait_counter_above(c, puller, "chunks_pulled",
                               before + ranks * (length // CHUNK) - 1)
    assert after - before == ranks * (length // CHUNK), "every rank pulls every full chunk"
    assert pulled == reference, (pulled, reference)


def _worker_pids(proc_pid: int) -> list[int]:
    """The vLLM worker processes below ``proc_pid`` (their names end in the TP rank)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        pgid = int(stat.rsplit(")", 1)[1].split()[2])
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        if pgid == proc_pid and ("Worker" in name or b"Worker" in cmd):
            out.append(int(entry))
    return sorted(out)


def _pgid_pids(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                out.append(int(entry))
    return out


def _gone(pid: int) -> bool:
    """``pid`` has exited (a zombie's sockets are closed too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _refuses(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def _recovered_tokens(log: Path) -> list[int]:
    """Tokens vLLM's scheduler rescheduled after load errors, one entry per recovery."""
    pattern = re.compile(r"Recovered from KV load failure: \d+ request\(s\) rescheduled "
                         r"\((\d+) tokens affected\)")
    return [int(m.group(1)) for m in pattern.finditer(log.read_text(errors="replace"))]


def test_a_dead_holder_rank_means_every_rank_recomputes(cluster):
    """A's rank 1 dies (SIGKILL) while the directory still lists it; A's rank 0 lives on.

    Deterministic: A's engine and API server are stopped first (SIGSTOP), so vLLM does not
    shut the rest of A down when its worker dies, and C pulls only once the dead rank's
    data-plane port refuses connections (the directory's lease, 30 s here, still lists it).
    C's rank 0 pulls its half from A's rank 0; C's rank 1 finds its holder gone at once
    (connection refused, or end of file on a pooled connection), well inside the pull
    deadline; vLLM unions the ranks' failed blocks, so both ranks recompute every chunk."""
    c, a, b, cc = cluster
    tokens = prompt(4242, 3 * CHUNK + 9)
    cold = generate(cc.url, tokens, salt="cold")  # C's own answer, computed from scratch
    since = held(c, "A")
    generate(a.url, tokens)
    wait_held(c, "A", since, 3)
    workers = _worker_pids(a.proc.popen.pid)
    assert len(workers) == 2, workers
    rest = [p for p in _pgid_pids(a.proc.popen.pid) if p not in workers]
    reply = c.stats()
    address = {i.instance: i.address for i in reply.instances}["A/1"]
    before = {k: (counters(c, "C").get(k, 0)) for k in ("chunks_pulled", "chunks_failed")}
    recoveries = len(_recovered_tokens(cc.proc.log))
    try:
        for pid in rest:
            os.kill(pid, signal.SIGSTOP)
        os.kill(workers[-1], signal.SIGKILL)  # A's rank 1 (its worker's pid is the higher)
        deadline = time.monotonic() + 60
        while not (_gone(workers[-1]) and _refuses(address)):
            assert time.monotonic() < deadline, "A's rank 1 did not die within 60 s"
            time.sleep(0.05)
        listed = {i.instance for i in c.stats().instances}
        assert {"A", "A/1"} <= listed, listed
        t0 = time.monotonic()
        answer = generate(cc.url, tokens)
        elapsed = time.monotonic() - t0
    finally:
        for pid in rest:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        a.proc.kill()
    assert answer == cold, (answer, cold)
    after = {k: wait_counter_above(c, "C", k, before[k]) for k in before}
    assert after["chunks_failed"] - before["chunks_failed"] == 3, "C's rank 1 failed all 3"
    assert after["chunks_pulled"] - before["chunks_pulled"] == 3, "C's rank 0 pulled all 3"
    # NOTE: rank 0's three good chunks are recomputed too: vLLM's KVOutputAggregator unions
    # the ranks' failed blocks, so no block is half pulled, half computed
    deadline = time.monotonic() + 10
    while len(recovered := _recovered_tokens(cc.proc.log)[recoveries:]) < 1:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert recovered == [3 * CHUNK], recovered
    # NOTE: a dead holder fails fast (refused / closed), not at the 5 s pull deadline
    assert elapsed < 4.0, f"the request took {elapsed:.1f} s: the dead rank was not seen at once"
