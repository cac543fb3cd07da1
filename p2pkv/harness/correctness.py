"""Correctness suite for reused KV: pulled KV must never change an answer.

Each case sends one prompt (token ids, so lengths are exact) to the *holder* twice — cold, then
again so it is served from the holder's own prefix cache (the reference) — and to the *puller*,
which pulls the holder's chunks. The puller's greedy output must equal the reference token for
token. The holder computed those bytes, so a corrupted or misplaced pull shows up as a
different answer. The holder saves and publishes on a save thread, maybe after answering, so
each case waits (with a deadline, :mod:`p2pkv.harness.held`) until the directory shows the
holder holding the prompt's chunks before it asks the puller. Each case also checks whether chunks were pulled when they should (and were
not when they must not be, e.g. across ``cache_salt`` tenants).

:func:`run_suite` starts the holder and the pullers in a :class:`LocalCluster`;
:func:`run_cases` runs cases against instances someone else started (the P/D test's).
``p2pkv bench correctness`` (:mod:`p2pkv.bench.correctness`) is the command line over this
module; the end-to-end tests run its small set and its P/D set.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from p2pkv.harness.cluster import Instance, LocalCluster, wait_healthy
from p2pkv.harness.documents import document_tokens
from p2pkv.harness.held import HeldWaiter, NotHeld
from p2pkv.harness.openai_client import complete

MAX_TOKENS = 16


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    num_tokens: int
    offset: int = 0  # where in the token source the prompt starts (distinct prompts per case)
    holder_salt: str | None = None
    puller_salt: str | None = None
    concurrent: int = 1
    expect_pull: bool = True
    distinct_stride: int = 0
    """Non-zero: concurrent request ``i`` has its own prompt, starting ``i * distinct_stride``
    tokens after ``offset`` (no shared blocks); zero: they all send the same prompt."""
    small_cache: bool = False
    """Pull into the puller with a tiny KV cache, so that the concurrent requests preempt each
    other; the case fails unless vLLM preempted at least one."""


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: Case
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the holder and the puller answer, and how to read the cluster's pulled chunks."""

    holder: str
    puller: str
    chunks_pulled: Callable[[], int]
    small_puller: str = ""
    """A puller with a tiny KV cache, for ``small_cache`` cases (empty: they fail)."""
    preemptions: Callable[[], int] = field(default=lambda: 0)
    """How many requests the small puller has preempted so far."""
    wait_held: Callable[[Sequence[int], str | None], float | None] = field(
        default=lambda tokens, salt: None)
    """Return once the directory shows the holder holding the chunks it saves for a prompt
    (token ids, ``cache_salt``), returning the seconds waited; raise :class:`NotHeld` at its
    deadline. The holder saves and publishes on a save thread, after its answer may have come
    back."""
    puller_counters: Callable[[str], dict[str, int]] = field(default=lambda url: {})
    """A puller's connector counters (from its ``/metrics``), to say why nothing was pulled."""


def small_cases(block: int = 128) -> list[Case]:
    """Fast enough for CI: aligned, unaligned, shorter than a chunk, concurrent, tenants."""
    return [
        Case("chunk-aligned", 4 * block, offset=0),
        Case("unaligned", 4 * block + 37, offset=1000),
        Case("shorter-than-a-chunk", block - 28, offset=2000, expect_pull=False),
        Case("concurrent-x4", 3 * block + 5, offset=2200, concurrent=4),
        Case("other-tenant-salt", 3 * block + 9, offset=2700, holder_salt="tenant-a",
             puller_salt="tenant-b", expect_pull=False),
        Case("same-tenant-salt", 3 * block + 9, offset=2700, holder_salt="tenant-a",
             puller_salt="tenant-a"),
    ]


def full_cases(block: int = 128) -> list[Case]:
    return small_cases(block) + [
        Case("long-aligned", 16 * block, offset=100),
        Case("long-unaligned", 16 * block + 101, offset=300),
        Case("exactly-one-chunk", block, offset=3000),
        Case("one-chunk-plus-one", block + 1, offset=3100),
        Case("concurrent-x12", 6 * block + 77, offset=1500, concurrent=12),
        *preemption_cases(block),
    ]


def pd_cases(block: int = 128) -> list[Case]:
    """For a prefill instance (holder, ``kv_producer``) and a decode instance (puller,
    ``kv_consumer``): the decode pulls the prompt's partial chunk too and computes only the
    last token; the answer must still be the prefill instance's own."""
    return [
        Case("pd-unaligned", 4 * block + 37, offset=400),
        Case("pd-chunk-aligned", 3 * block, offset=1300),
        Case("pd-one-block-plus-one", block + 1, offset=2100),
        Case("pd-shorter-than-a-block", block - 28, offset=2500, expect_pull=False),
        Case("pd-concurrent-x3", 2 * block + 70, offset=2900, concurrent=3),
        Case("pd-other-tenant-salt", 2 * block + 9, offset=1750, holder_salt="tenant-a",
             puller_salt="tenant-b", expect_pull=False),
    ]


def preemption_cases(block: int = 128) -> list[Case]:
    """Eight different prompts that end 4 tokens before a block boundary, at once, into a
    puller with ~23 usable blocks: about four fit, and their decodes need one more block each,
    so vLLM preempts running requests (and a preempted request's KV is looked up, pulled or
    recomputed again when it resumes)."""
    return [Case("preempted-x8", 5 * block - 4, offset=200, concurrent=8, distinct_stride=97,
                 small_cache=True)]


SMALL_CACHE_BLOCKS = 24
"""``--num-gpu-blocks-override`` for the small puller (one block is vLLM's null block)."""
SMALL_CACHE_MAX_MODEL_LEN = 2048


def _answer(url: str, prompt: Sequence[int], salt: str | None) -> str:
    return complete(url, prompt, max_tokens=MAX_TOKENS, stream=False, cache_salt=salt).text


def run_case(case: Case, tokens: Sequence[int], ep: Endpoints) -> CaseResult:
    starts = [case.offset + i * case.distinct_stride for i in range(case.concurrent)]
    prompts = [list(tokens[s:s + case.num_tokens]) for s in starts]
    if any(len(p) != case.num_tokens for p in prompts):
        return CaseResult(case, False, f"token source too short for {case.num_tokens} tokens")
    puller = ep.small_puller if case.small_cache else ep.puller
    if not puller:
        return CaseResult(case, False, "no puller with a small KV cache was started")
    references: dict[int, str] = {}
    waited = 0.0
    for start, prompt in zip(starts, prompts):
        if start not in references:
            _answer(ep.holder, prompt, case.holder_salt)  # computes, saves, publishes
            try:
                # its save thread may publish after the answer: wait until the directory has it
                waited = max(waited, float(ep.wait_held(prompt, case.holder_salt) or 0.0))
            except NotHeld as e:
                return CaseResult(case, False, f"holder: {e}")
            references[start] = _answer(ep.holder, prompt, case.holder_salt)  # own cache
    before, preempted_before = ep.chunks_pulled(), ep.preemptions()
    with concurrent.futures.ThreadPoolExecutor(case.concurrent) as pool:
        outputs = list(pool.map(lambda p: _answer(puller, p, case.puller_salt), prompts))
    pulled = _pulled_since(ep, before, case.expect_pull)
    wrong = [(o, references[s]) for s, o in zip(starts, outputs) if o != references[s]]
    if wrong:
        return CaseResult(case, False, f"puller said {wrong[0][0]!r}, holder said {wrong[0][1]!r}")
    if case.expect_pull and pulled == 0:
        return CaseResult(case, False, "no chunk was pulled (the holder held them all; puller "
                                       f"counters {ep.puller_counters(puller)})")
    if not case.expect_pull and pulled:
        return CaseResult(case, False, f"{pulled} chunks were pulled where none may be")
    detail = (f"identical output, {pulled} chunks pulled (the holder's publish was seen "
              f"{waited * 1000:.0f} ms after its answer)")
    if case.small_cache:
        preempted = ep.preemptions() - preempted_before
        if not preempted:
            return CaseResult(case, False, f"{detail}, but vLLM preempted nothing")
        detail += f", {preempted} preemptions"
    return CaseResult(case, True, detail)


def _pulled_since(ep: Endpoints, before: int, expect: bool, timeout_s: float = 15.0) -> int:
    """Counters reach the directory asynchronously (the puller reports them in the step that
    hands vLLM the pulled request, before its answer): wait for them when a pull is expected,
    and give a pull that must not happen a moment to show up."""
    deadline = time.monotonic() + (timeout_s if expect else 1.0)
    while True:
        pulled = ep.chunks_pulled() - before
        if (expect and pulled) or time.monotonic() > deadline:
            return pulled
        time.sleep(0.2)


def run_cases(cases: Sequence[Case], tokens: Sequence[int], ep: Endpoints,
              progress: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    results = []
    for case in cases:
        result = run_case(case, tokens, ep)
        results.append(result)
        if progress is not None:
            progress(result)
    return results


def preemptions(url: str, timeout_s: float = 5.0) -> int:
    """vLLM's ``vllm:num_preemptions_total`` from an instance's Prometheus metrics."""
    text = httpx.get(url + "/metrics", timeout=timeout_s).text
    return int(sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("vllm:num_preemptions_total")))


def connector_counters(url: str, timeout_s: float = 5.0) -> dict[str, int]:
    """An instance's ``p2pkv_connector_*_total`` counters from its Prometheus metrics."""
    out: dict[str, int] = {}
    try:
        text = httpx.get(url + "/metrics", timeout=timeout_s).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name.startswith("p2pkv_connector_") and name.endswith("_total"):
            key = name.removeprefix("p2pkv_connector_").removesuffix("_total")
            out[key] = out.get(key, 0) + int(float(rest.split()[-1]))
    return out


def cluster_endpoints(cluster: LocalCluster, holder: Instance, puller: Instance,
                      small_puller: Instance | None = None, *, holder_partial: bool = False,
                      held_timeout_s: float = 60.0) -> Endpoints:
    """The instances' URLs, with the pulled chunks as ``cluster``'s directory counts them.
    ``holder_partial``: the holder is a ``kv_producer`` (it saves prompts' partial chunks)."""
    waiter = HeldWaiter(cluster.directory, cluster.model)
    small = small_puller.url if small_puller is not None else ""

    def wait_held(tokens: Sequence[int], salt: str | None) -> float:
        keys = waiter.keys(tokens, salt, partial=holder_partial)
        return waiter.wait_held(holder.name, keys, held_timeout_s)

    return Endpoints(holder.url, puller.url,
                     lambda: cluster.counter_totals().get("chunks_pulled", 0), small,
                     (lambda: preemptions(small)) if small else (lambda: 0),
                     wait_held, connector_counters)


def run_suite(cluster: LocalCluster, cases: list[Case], model: Path) -> list[CaseResult]:
    """Start the holder and the puller (and, for ``small_cache`` cases, a puller with a tiny
    KV cache) and run the cases in order."""
    insts = [cluster.start_vllm("holder"), cluster.start_vllm("puller")]
    if any(c.small_cache for c in cases):
        insts.append(cluster.start_vllm(
            "small-puller", max_model_len=SMALL_CACHE_MAX_MODEL_LEN,
            extra_args=["--num-gpu-blocks-override", str(SMALL_CACHE_BLOCKS)]))
    wait_healthy(insts, timeout_s=600)
    ep = cluster_endpoints(cluster, insts[0], insts[1], insts[2] if len(insts) > 2 else None)
    return run_cases(cases, document_tokens(model), ep,
                     progress=lambda r: print(f"  {'ok  ' if r.ok else 'FAIL'} "
                                              f"{r.case.name:<22} {r.detail}", flush=True))
