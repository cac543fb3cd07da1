"""Issue 14: what an idle holder with a lease out costs, measured on real vLLM (CPU).

Starts a directory and two ``kv_producer`` instances of a tiny random model: ``L`` with
leases (``--lease-s``), ``N`` without. Reports each one's process-group CPU (cores, over
``--window-s``) while idle, then while ``L`` has a lease out, and the latency of short
requests (``max_tokens`` 1, distinct prompts) sent to ``L`` while its engine waits for a
lease to end against the same requests sent to ``N``, idle with nothing held.

    python scripts/lease_idle.py [--samples 8] [--lease-s 60] [--window-s 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from p2pkv.harness.cluster import LocalCluster, wait_healthy
from p2pkv.harness.demo_model import tiny_model
from p2pkv.harness.documents import document, document_messages
from p2pkv.harness.groupcpu import group_cores
from p2pkv.harness.openai_client import CHAT, chat_body, post


def timed(url: str, body: dict) -> float:
    t0 = time.monotonic()
    post(url, CHAT, body, timeout_s=120)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--lease-s", type=float, default=60.0)
    ap.add_argument("--window-s", type=float, default=4.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lease-idle-"))
    model = tiny_model(work / "tiny")
    with LocalCluster(work, model) as c:
        c.start_directory()
        leased = c.start_vllm("L", kv_role="kv_producer", max_model_len=2048,
                              extra_config={"lease_s": args.lease_s, "transport": "tcp"})
        plain = c.start_vllm("N", kv_role="kv_producer", max_model_len=2048,
                             extra_config={"transport": "tcp"})
        wait_healthy([leased, plain], timeout_s=600)
        doc = document()
        warm = chat_body(document_messages(doc[:300], "Hi?"), max_tokens=1)
        timed(plain.url, warm)
        time.sleep(2.0)
        print(f"idle, nothing held: L {group_cores(leased.proc.popen.pid, args.window_s):.3f} "
              f"cores, N {group_cores(plain.proc.popen.pid, args.window_s):.3f} cores")
        timed(leased.url, chat_body(document_messages(doc[:5000], "Who founded it?"),
                                    max_tokens=1))
        time.sleep(1.5)  # vLLM's queue readers spin 1 s after their last message
        cores = [group_cores(leased.proc.popen.pid, args.window_s) for _ in range(2)]
        print(f"L with a lease out (8+ chunks), idle: {', '.join(f'{x:.3f}' for x in cores)} "
              "cores")
        on_l, on_n = [], []
        for i in range(args.samples):
            body = chat_body(document_messages(doc[6000 + 300 * i:6250 + 300 * i], "Who?"),
                             max_tokens=1)
            # NOTE: each request to L leaves a lease too; the next finds L waiting again
            for url, out in ((leased.url, on_l), (plain.url, on_n))[:: 1 if i % 2 else -1]:
                time.sleep(1.5)
                out.append(timed(url, body))
        for name, xs in (("L (lease out, waiting)", on_l), ("N (idle, no lease)", on_n)):
            print(f"{name}: median {statistics.median(xs) * 1000:.1f} ms, "
                  f"min {min(xs) * 1000:.1f}, max {max(xs) * 1000:.1f} "
                  f"({len(xs)} requests, max_tokens 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
