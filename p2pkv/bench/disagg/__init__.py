"""``p2pkv bench disagg``: prefill/decode disaggregation next to one instance.

Starts a directory, ``--prefill`` ``kv_producer`` and ``--decode`` ``kv_consumer`` vLLM CPU
instances behind ``p2pkv router`` (1P1D by default, xPyD by flags), sends ``--requests``
streamed chat requests about different documents, then stops them and sends the same
requests to one plain vLLM instance (its own prefix cache on). Prints TTFT and inter-token
latency (ITL) for both, and whether each disaggregated answer equals the single instance's.
Used by ``launch/disagg.sh``.

NOTE: on one 2-core machine the P and D instances share the cores, so this shows the
mechanism and its overhead (the prefill round trip, the publish wait, the pull), not the
interference isolation P/D buys on separate machines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from p2pkv.bench.disagg import tiers as disagg_tiers
from p2pkv.bench.report import Column, median, table
from p2pkv.harness.cluster import LocalCluster, wait_healthy
from p2pkv.harness.documents import QUESTIONS, document_messages, document_parts
from p2pkv.harness.openai_client import Completion, chat


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", type=int, default=1, help="prefill instances (x)")
    parser.add_argument("--decode", type=int, default=1, help="decode instances (y)")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path(".p2pkv-run/bench-disagg"))
    disagg_tiers.add_args(parser)


def _progress(t: float, ready: list[str]) -> None:
    print(f"  starting: {t:.0f} s, ready {ready}", flush=True)


def main(args: argparse.Namespace) -> int:
    if args.tiers:
        return disagg_tiers.main(args)
    from p2pkv.harness.demo_model import prepare

    model = prepare()
    docs = document_parts(max(args.requests, 1))
    prompts = [document_messages(docs[i], QUESTIONS[i % len(QUESTIONS)])
               for i in range(args.requests)]
    with LocalCluster(args.workdir / "pd", model) as cluster:
        cluster.start_directory()
        prefill = [cluster.start_vllm(f"P{i}", kv_role="kv_producer")
                   for i in range(args.prefill)]
        decode = [cluster.start_vllm(f"D{i}", kv_role="kv_consumer")
                  for i in range(args.decode)]
        wait_healthy(prefill + decode, timeout_s=900, progress=_progress)
        router = cluster.start_router(model, prefill=prefill, decode=decode)
        chat(router.url, document_messages("warm-up", "Hi?"), max_tokens=4)
        pd = [chat(router.url, m, max_tokens=args.max_tokens) for m in prompts]
        pulled = cluster.counter_totals().get("chunks_pulled", 0)
    with LocalCluster(args.workdir / "single", model) as cluster:
        single = cluster.start_vllm("S", connector=False)
        wait_healthy([single], timeout_s=900, progress=_progress)
        chat(single.url, document_messages("warm-up", "Hi?"), max_tokens=4)
        one = [chat(single.url, m, max_tokens=args.max_tokens) for m in prompts]
    return report(args, pd, one, pulled)


def report(args: argparse.Namespace, pd: list[Completion], one: list[Completion],
           pulled: int) -> int:
    label = f"{args.prefill}P{args.decode}D"
    rows = []
    for name, answers in ((label, pd), ("single", one)):
        for i, r in enumerate(answers):
            via = (f"{r.headers.get('x-p2pkv-prefill-instance', '')}->"
                   f"{r.headers.get('x-p2pkv-instance', '')}" if name == label else "")
            rows.append([name, i, r.ttft_s, r.itl_s * 1000, r.completion_tokens, via])
    print()
    print(table([Column("config", 10, align="<"), Column("req", 3), Column("ttft_s", 7, ".2f"),
                 Column("itl_ms", 7, ".1f"), Column("tokens", 6), Column("via", align="<")],
                rows))
    print()
    print(table([Column("config", 10, align="<"), Column("TTFT median s", 14, ".2f"),
                 Column("ITL median ms", 14, ".1f")],
                ([name, median(r.ttft_s for r in answers),
                  median(r.itl_s for r in answers) * 1000]
                 for name, answers in ((label, pd), ("single", one)))))
    same = sum(a.text == b.text for a, b in zip(pd, one))
    print(f"\nchunks pulled by decode: {pulled}; answers equal to the single instance's: "
          f"{same}/{len(pd)} (a cold single prefill may round differently; the identity "
          f"test compares with the prefill instance's own cache)")
    return 0
