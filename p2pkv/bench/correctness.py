"""``p2pkv bench correctness``: the correctness suite on a fresh local cluster.

Starts a directory and two ``vllm serve`` CPU instances (the holder and the puller; with
``--full``, also a puller with a tiny KV cache for the preemption case), runs the cases of
:mod:`p2pkv.harness.correctness` (``--full`` for all of them, ``--cases`` for some) and exits non-zero
when any case fails.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

import httpx

from p2pkv.harness.correctness import (SMALL_CACHE_BLOCKS, SMALL_CACHE_MAX_MODEL_LEN, Case, CaseResult,
                               Endpoints, full_cases, run_cases, small_cases)
from p2pkv.harness.cluster import LocalCluster, wait_healthy


def document_tokens(model: Path) -> list[int]:
    from transformers import AutoTokenizer

    text = resources.files("p2pkv").joinpath("data", "document.txt").read_text()
    return AutoTokenizer.from_pretrained(str(model))(text)["input_ids"]


def preemptions(url: str, timeout_s: float = 5.0) -> int:
    """vLLM's ``vllm:num_preemptions_total`` from an instance's Prometheus metrics."""
    text = httpx.get(url + "/metrics", timeout=timeout_s).text
    return int(sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("vllm:num_preemptions_total")))


def cluster_endpoints(cluster: LocalCluster, holder: str, puller: str,
                      settle_s: float = 0.0, small_puller: str = "") -> Endpoints:
    return Endpoints(holder, puller, lambda: cluster.counter_totals().get("chunks_pulled", 0),
                     lambda: time.sleep(settle_s), small_puller,
                     (lambda: preemptions(small_puller)) if small_puller else (lambda: 0))


def run_suite(cluster: LocalCluster, cases: list[Case], model: Path,
              settle_s: float = 0.0) -> list[CaseResult]:
    """Start the holder and the puller (and, for ``small_cache`` cases, a puller with a tiny
    KV cache) and run the cases in order."""
    insts = [cluster.start_vllm("holder"), cluster.start_vllm("puller")]
    if any(c.small_cache for c in cases):
        insts.append(cluster.start_vllm(
            "small-puller", max_model_len=SMALL_CACHE_MAX_MODEL_LEN,
            extra_args=["--num-gpu-blocks-override", str(SMALL_CACHE_BLOCKS)]))
    wait_healthy(insts, timeout_s=600)
    ep = cluster_endpoints(cluster, insts[0].url, insts[1].url, settle_s,
                           insts[2].url if len(insts) > 2 else "")
    return run_cases(cases, document_tokens(model), ep,
                     progress=lambda r: print(f"  {'ok  ' if r.ok else 'FAIL'} "
                                              f"{r.case.name:<22} {r.detail}", flush=True))


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true", help="all cases, not the CI set")
    parser.add_argument("--cases", default="",
                        help="only these cases (comma-separated names from the full set)")
    parser.add_argument("--workdir", type=Path, default=Path(".p2pkv-run/correctness"))


def main(args: argparse.Namespace) -> int:
    from p2pkv.harness.demo_model import prepare

    model = prepare()
    cases = full_cases() if args.full or args.cases else small_cases()
    if args.cases:
        names = args.cases.split(",")
        unknown = sorted(set(names) - {c.name for c in cases})
        if unknown:
            raise SystemExit(f"unknown cases {unknown}")
        cases = [c for c in cases if c.name in names]
    with LocalCluster(args.workdir, model) as cluster:
        cluster.start_directory()
        results = run_suite(cluster, cases, model)
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
