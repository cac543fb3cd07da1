"""``p2pkv bench correctness``: the correctness suite on a fresh local cluster.

Starts a directory and two ``vllm serve`` CPU instances (the holder and the puller), runs the
cases of :mod:`p2pkv.correctness` (``--full`` for all of them) and exits non-zero when any
case fails.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

from p2pkv.correctness import Case, CaseResult, Endpoints, full_cases, run_cases, small_cases
from p2pkv.localcluster import LocalCluster, wait_healthy


def document_tokens(model: Path) -> list[int]:
    from transformers import AutoTokenizer

    text = resources.files("p2pkv").joinpath("data", "document.txt").read_text()
    return AutoTokenizer.from_pretrained(str(model))(text)["input_ids"]


def cluster_endpoints(cluster: LocalCluster, holder: str, puller: str,
                      settle_s: float = 0.0) -> Endpoints:
    return Endpoints(holder, puller, lambda: cluster.counter_totals().get("chunks_pulled", 0),
                     lambda: time.sleep(settle_s))


def run_suite(cluster: LocalCluster, cases: list[Case], model: Path,
              settle_s: float = 0.0) -> list[CaseResult]:
    a = cluster.start_vllm("holder")
    b = cluster.start_vllm("puller")
    wait_healthy([a, b], timeout_s=600)
    return run_cases(cases, document_tokens(model), cluster_endpoints(cluster, a.url, b.url,
                                                                       settle_s),
                     progress=lambda r: print(f"  {'ok  ' if r.ok else 'FAIL'} "
                                              f"{r.case.name:<22} {r.detail}", flush=True))


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true", help="all cases, not the CI set")
    parser.add_argument("--workdir", type=Path, default=Path(".p2pkv-run/correctness"))


def main(args: argparse.Namespace) -> int:
    from p2pkv.model import prepare

    model = prepare()
    cases = full_cases() if args.full else small_cases()
    with LocalCluster(args.workdir, model) as cluster:
        cluster.start_directory()
        results = run_suite(cluster, cases, model)
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
