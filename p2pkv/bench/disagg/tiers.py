"""``p2pkv bench disagg --tiers``: decode TTFT served from leased paged blocks vs via the
store, side by side in one run (issue 14).

One directory, two ``kv_producer`` instances (``PL`` with ``lease_s``: tier 1, its finished
requests' chunks served in place from vLLM's paged blocks; ``PS`` without: tier 2, the chunks
saved into its host store as they complete) and one ``kv_consumer`` ``D``, all over TCP (on
one host ``auto`` would pick the shared slab, whose pins copy a leased chunk into the store
first). Per length and sample, alternating the tiers: a prompt of exactly that many tokens
(its own offset into the document, so no two share a chunk) is prefilled on the tier's
producer (1 token), then sent to ``D``, which pulls it. ``D``'s TTFT is the decode TTFT; its
answer must equal the producer's own prefix-cache answer. Counters say which tier served.
"""

from __future__ import annotations

import argparse
import time

from p2pkv.bench.report import Column, median, table
from p2pkv.harness.cluster import LocalCluster, wait_healthy
from p2pkv.harness.documents import document_tokens
from p2pkv.harness.openai_client import complete

LEASE_S = 60.0
PUBLISH_WAIT_S = 1.0
"""Between the prefill and the decode request, the same for both tiers (the lease publishes
at request end, the store as chunks complete)."""
STRIDE = 37
"""Token offset between prompts (not a block multiple: every prompt's chunks differ)."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiers", action="store_true",
                        help="decode TTFT from leased blocks vs via the store (issue 14)")
    parser.add_argument("--lengths", default="3000,8000", help="prompt lengths (--tiers)")
    parser.add_argument("--samples", type=int, default=2, help="per length and tier (--tiers)")


def _counters(cluster: LocalCluster, name: str) -> dict[str, int]:
    reply = cluster.stats()
    for info in reply.instances if reply else ():
        if info.engine == name or str(info.instance) == name:
            return dict(info.counters)
    return {}


def main(args: argparse.Namespace) -> int:
    from p2pkv.harness.model_len import max_model_len, model_positions
    from p2pkv.harness.demo_model import prepare

    model = prepare()
    lengths = [int(x) for x in args.lengths.split(",")]
    max_len = max_model_len(max(lengths), model_positions(model))
    n = 2 * args.samples * len(lengths)
    tokens = document_tokens(model, at_least=max(lengths) + STRIDE * n + 16)
    rows: list[list] = []
    with LocalCluster(args.workdir / "tiers", model) as cluster:
        cluster.start_directory()
        common = {"transport": "tcp"}
        kv = 2 + max(lengths) // 4096
        pl = cluster.start_vllm("PL", kv_role="kv_producer", max_model_len=max_len,
                                kv_cache_gib=kv, extra_config={**common, "lease_s": LEASE_S})
        ps = cluster.start_vllm("PS", kv_role="kv_producer", max_model_len=max_len,
                                kv_cache_gib=kv, extra_config=common)
        d = cluster.start_vllm("D", kv_role="kv_consumer", max_model_len=max_len,
                               kv_cache_gib=kv, extra_config=common)
        wait_healthy([pl, ps, d], timeout_s=900,
                     progress=lambda t, r: print(f"  starting: {t:.0f} s, ready {r}", flush=True))
        for inst in (pl, ps, d):
            complete(inst.url, tokens[-64:], max_tokens=2)  # warm-up
        i = 0
        for length in lengths:
            for s in range(args.samples):
                for tier, prod in (("leased", pl), ("store", ps)):
                    prompt = tokens[STRIDE * i:STRIDE * i + length]
                    i += 1
                    before_p, before_d = _counters(cluster, prod.name), _counters(cluster, "D")
                    complete(prod.url, prompt, max_tokens=1)
                    time.sleep(PUBLISH_WAIT_S)
                    dec = complete(d.url, prompt, max_tokens=args.max_tokens)
                    ref = complete(prod.url, prompt, max_tokens=args.max_tokens)
                    time.sleep(1.5)  # the counters' next report
                    now_p, now_d = _counters(cluster, prod.name), _counters(cluster, "D")
                    delta = {k: now_p.get(k, 0) - before_p.get(k, 0)
                             for k in ("chunks_served_leased", "chunks_served")}
                    pulled = now_d.get("chunks_pulled", 0) - before_d.get("chunks_pulled", 0)
                    rows.append([length, tier, s, dec.ttft_s, ref.ttft_s, pulled,
                                 delta["chunks_served_leased"], delta["chunks_served"],
                                 dec.text == ref.text])
                    print(f"  {length} {tier} #{s}: decode ttft {dec.ttft_s:.3f} s, pulled "
                          f"{pulled}", flush=True)
    return report(rows, lengths)


def report(rows: list[list], lengths: list[int]) -> int:
    print()
    print(table([Column("tokens", 6), Column("tier", 7, align="<"), Column("#", 2),
                 Column("decode_ttft_s", 13, ".3f"), Column("holder_hit_s", 12, ".3f"),
                 Column("pulled", 6), Column("leased", 6), Column("stored", 6),
                 Column("same", 5, align="<")], rows))
    print()
    summary = []
    for length in lengths:
        med = {t: median(r[3] for r in rows if r[0] == length and r[1] == t)
               for t in ("leased", "store")}
        summary.append([length, med["leased"], med["store"],
                        med["leased"] / med["store"] if med["store"] else 0.0])
    print(table([Column("tokens", 6), Column("leased median s", 15, ".3f"),
                 Column("store median s", 14, ".3f"), Column("leased/store", 12, ".2f")],
                summary))
    same = sum(r[8] for r in rows)
    print(f"\nanswers equal to the holder's own prefix-cache answer: {same}/{len(rows)}")
    return 0 if same == len(rows) else 1


