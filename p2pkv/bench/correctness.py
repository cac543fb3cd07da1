"""``p2pkv bench correctness``: the correctness suite on a fresh local cluster.

The command line over :mod:`p2pkv.harness.correctness` (which holds the cases and runs them):
starts a directory, then the suite's holder and puller (with ``--full``, also a puller with a
tiny KV cache for the preemption case), runs the small set (``--full`` for all cases,
``--cases`` for some) and exits non-zero when any case fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from p2pkv.harness.cluster import LocalCluster
from p2pkv.harness.correctness import full_cases, run_suite, small_cases


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
