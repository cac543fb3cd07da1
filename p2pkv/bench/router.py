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
import random
import time
from pathlib import Path

import httpx

from p2pkv.bench.report import Column, median, table
from p2pkv.harness.cluster import LocalCluster, wait_healthy
from p2pkv.harness.documents import QUESTIONS, document_messages, document_parts
from p2pkv.harness.openai_client import Completion, chat


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
    docs = document_parts(args.docs)
    plan = schedule(args.docs, args.requests, args.seed)
    with LocalCluster(args.workdir, model) as cluster:
        cluster.start_directory()
        instances = [cluster.start_vllm(f"I{i}") for i in range(args.instances)]
        wait_healthy(instances, timeout_s=900,
                     progress=lambda t, ready: print(f"  starting: {t:.0f} s, ready {ready}",
                                                     flush=True))
        router = cluster.start_router(model, instances=instances)
        print(f"router {router.url} in front of {[i.name for i in instances]}", flush=True)

        def one(job: tuple[int, int]) -> Completion:
            d, q = job
            return chat(router.url, document_messages(docs[d], QUESTIONS[q]),
                        max_tokens=args.max_tokens)

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, plan))
        wall = time.monotonic() - t0
        metrics = httpx.get(router.url + "/metrics", timeout=10).text
    return report(plan, results, wall, metrics)


def report(plan: list[tuple[int, int]], results: list[Completion], wall: float,
           metrics: str) -> int:
    served: dict[int, set[str]] = {}
    repeats = hits = 0
    first_ttft, repeat_ttft = [], []
    rows = []
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
        rows.append([i, d, where, r.headers.get("x-p2pkv-route", "?"),
                     r.headers.get("x-p2pkv-cached-tokens", "?"), r.ttft_s, mark])
    print(table([Column("#", 3), Column("doc", 3), Column("instance", 8), Column("route", 6),
                 Column("cached", 6), Column("ttft_s", 7, ".2f"), Column("holder", align="<")],
                rows))
    share = hits / repeats if repeats else 1.0
    print(f"\nrepeated-document requests sent to a holder: {hits}/{repeats} = {share:.0%}")
    print(f"TTFT median: first question {median(first_ttft):.2f} s, "
          f"repeats {median(repeat_ttft):.2f} s; wall {wall:.1f} s")
    for line in metrics.splitlines():
        if line.startswith("p2pkv_router_choices_total"):
            print(line)
    return 0 if share >= 0.9 else 1
