"""``p2pkv bench router``: does the router send a document's later questions to its holder?

Starts a directory, ``--instances`` vLLM CPU instances and ``p2pkv router``, then sends
``--requests`` chat requests over ``--docs`` documents in a shuffled order (``--concurrency``
at a time). A request about a document already asked about is a *repeat*; it went to a
*holder* if an earlier request about that document was answered by the same instance. Prints
the holder fraction of repeats (goal: >= 90 %), TTFT of first and repeated questions, and
the router's decisions by reason.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import statistics
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import httpx

from p2pkv.harness.cluster import LocalCluster, document_messages, wait_healthy

QUESTIONS = ["Who founded the cooperative?", "When was the lighthouse first lit?",
             "How many steps does the staircase have?", "Who was the last keeper?",
             "Where was the granite quarried?", "What happened in the storm?"]


@dataclass(frozen=True, slots=True)
class Streamed:
    """One streamed OpenAI request as a client sees it."""

    text: str
    ttft_s: float
    total_s: float
    completion_tokens: int
    headers: dict[str, str]

    @property
    def itl_s(self) -> float:
        """Mean inter-token latency after the first token."""
        return (self.total_s - self.ttft_s) / max(1, self.completion_tokens - 1)


def stream_chat(url: str, messages: list[dict[str, str]], max_tokens: int,
                timeout_s: float = 600.0) -> Streamed:
    body = {"model": "model", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    ttft = None
    parts: list[str] = []
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout_s) as r:
        r.raise_for_status()
        headers = dict(r.headers)
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens", 0)
            text = ((chunk.get("choices") or [{}])[0].get("delta") or {}).get("content") or ""
            if text and ttft is None:
                ttft = time.monotonic() - t0
            parts.append(text)
    total = time.monotonic() - t0
    return Streamed("".join(parts), ttft if ttft is not None else total, total, tokens, headers)


def documents(n: int) -> list[str]:
    text = resources.files("p2pkv").joinpath("data", "document.txt").read_text()
    size = len(text) // n
    return [text[i * size:(i + 1) * size] for i in range(n)]


def schedule(docs: int, requests: int, seed: int) -> list[tuple[int, int]]:
    """(document, question) pairs: every document at least once, the rest shuffled in."""
    rng = random.Random(seed)
    picks = list(range(docs)) + [rng.randrange(docs) for _ in range(requests - docs)]
    rng.shuffle(picks)
    seen: dict[int, int] = {}
    out = []
    for d in picks:
        out.append((d, seen.get(d, 0) % len(QUESTIONS)))
        seen[d] = seen.get(d, 0) + 1
    return out


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path(".p2pkv-run/bench-router"))


def main(args: argparse.Namespace) -> int:
    from p2pkv.harness.demo_model import prepare

    model = prepare()
    docs = documents(args.docs)
    plan = schedule(args.docs, args.requests, args.seed)
    with LocalCluster(args.workdir, model) as cluster:
        cluster.start_directory()
        instances = [cluster.start_vllm(f"I{i}") for i in range(args.instances)]
        wait_healthy(instances, timeout_s=900,
                     progress=lambda t, ready: print(f"  starting: {t:.0f} s, ready {ready}",
                                                     flush=True))
        router = cluster.start_router(model, instances=instances)
        print(f"router {router.url} in front of {[i.name for i in instances]}", flush=True)

        def one(job: tuple[int, int]) -> Streamed:
            d, q = job
            return stream_chat(router.url, document_messages(docs[d], QUESTIONS[q]),
                               args.max_tokens)

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, plan))
        wall = time.monotonic() - t0
        metrics = httpx.get(router.url + "/metrics", timeout=10).text
    return report(plan, results, wall, metrics)


def report(plan: list[tuple[int, int]], results: list[Streamed], wall: float,
           metrics: str) -> int:
    served: dict[int, set[str]] = {}
    repeats = hits = 0
    first_ttft, repeat_ttft = [], []
    print(f"{'#':>3} {'doc':>3} {'instance':>8} {'route':>6} {'cached':>6} {'ttft_s':>7} holder")
    for i, ((d, _q), r) in enumerate(zip(plan, results)):
        where = r.headers.get("x-p2pkv-instance", "?")
        before = served.setdefault(d, set())
        mark = ""
        if before:
            repeats += 1
            hits += where in before
            mark = "yes" if where in before else "NO"
            repeat_ttft.append(r.ttft_s)
        else:
            first_ttft.append(r.ttft_s)
        before.add(where)
        print(f"{i:>3} {d:>3} {where:>8} {r.headers.get('x-p2pkv-route', '?'):>6} "
              f"{r.headers.get('x-p2pkv-cached-tokens', '?'):>6} {r.ttft_s:>7.2f} {mark}")
    share = hits / repeats if repeats else 1.0
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    print(f"\nrepeated-document requests sent to a holder: {hits}/{repeats} = {share:.0%}")
    print(f"TTFT median: first question {med(first_ttft):.2f} s, "
          f"repeats {med(repeat_ttft):.2f} s; wall {wall:.1f} s")
    for line in metrics.splitlines():
        if line.startswith("p2pkv_router_choices_total"):
            print(line)
    return 0 if share >= 0.9 else 1
