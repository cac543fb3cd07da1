"""The laptop demo: a directory, two ``vllm serve`` CPU instances with the connector, and a
long-document QA that shows the time-to-first-token drop when instance B pulls the KV that
instance A computed.

    A: question 1 about the document    (cold: computes the document's KV, saves, publishes)
    B: question 2 about the document    (remote hit: pulls the document's chunks from A)
    B: question 2 again                 (local hit: B's own prefix cache)

Run with ``p2pkv demo`` or ``launch/laptop.sh``. Everything it starts is stopped at the end,
also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from p2pkv.harness.cluster import LocalCluster, wait_healthy
from p2pkv.harness.documents import demo_questions, document, document_messages
from p2pkv.harness.openai_client import Completion, chat


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--document", type=Path, default=None,
                        help="text file to ask about (default: the bundled ~3,000-token one)")
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory (default: SmolLM2-135M-Instruct, prepared once)")
    parser.add_argument("--workdir", type=Path, default=Path(".p2pkv-run/demo"),
                        help="where process logs go")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--settle-s", type=float, default=2.0,
                        help="idle time before each timed request (see below)")


def _progress(elapsed: float, ready: list[str]) -> None:
    state = ", ".join(ready) if ready else "none yet"
    print(f"\r  starting vLLM instances (about 1-2 minutes on a laptop CPU): "
          f"{elapsed:4.0f} s, ready: {state}   ", end="", flush=True)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(args: argparse.Namespace) -> int:
    from p2pkv.harness.demo_model import prepare

    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop the instances on kill, as on Ctrl-C

    text = args.document.read_text() if args.document else document()
    questions = demo_questions()
    print("[demo] preparing the model (cached after the first run)")
    model = args.model or prepare()
    try:
        runs, stats = _run(args, model, text, questions)
    except KeyboardInterrupt:
        print("\n[demo] interrupted; everything it started has been stopped")
        return 130
    _print_report(runs, stats)
    return 0 if all(r[2].text.strip() for r in runs) else 1


def _run(args: argparse.Namespace, model: Path, document: str, questions: list[str]
         ) -> tuple[list[tuple[str, str, Completion]], dict[str, int]]:
    with LocalCluster(args.workdir, model) as cluster:
        cluster.start_directory()
        print(f"[demo] directory on {cluster.directory}; logs in {args.workdir}/")
        a = cluster.start_vllm("instance-A")
        b = cluster.start_vllm("instance-B")
        wait_healthy([a, b], args.startup_timeout, _progress)
        print()
        runs: list[tuple[str, str, Completion]] = []
        for label, inst, question in [("A cold (computes the document)", a, questions[0]),
                                      ("B remote hit (pulls from A)", b, questions[1]),
                                      ("B local hit (its own cache)", b, questions[1])]:
            # NOTE: both instances share this machine's cores. After each request vLLM's CPU
            # worker keeps spinning for about a second, which slows whatever runs next on the
            # same cores; every timed request therefore starts from an idle machine, as it
            # would with the instances on separate hosts.
            time.sleep(args.settle_s)
            print(f"[demo] {label}: {question}", flush=True)
            runs.append((label, question,
                         chat(inst.url, document_messages(document, question),
                              max_tokens=args.max_tokens)))
        return runs, _wait_for_counters(cluster)


def _wait_for_counters(cluster: LocalCluster, timeout_s: float = 5.0) -> dict[str, int]:
    """Connector counters summed over the instances, once a pull shows (or at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        totals = cluster.counter_totals()
        if totals.get("chunks_pulled") or time.monotonic() > deadline:
            return totals
        time.sleep(0.2)


def _print_report(runs: list[tuple[str, str, Completion]], counters: dict[str, int]) -> None:
    cold, remote, local = (r[2] for r in runs)
    pulled = counters.get("bytes_pulled", 0)
    chunks = counters.get("chunks_pulled", 0)
    print()
    print(f"document + question: {remote.prompt_tokens} prompt tokens")
    print(f"{'request':<34} {'TTFT':>9}  answer")
    for label, _, r in runs:
        print(f"{label:<34} {r.ttft_s:>8.3f}s  {r.text.strip()[:70]!r}")
    print(f"bytes pulled by B from A: {pulled / 1e6:.1f} MB in {chunks} chunks")
    print(f"B remote hit vs B local hit: {remote.ttft_s / local.ttft_s:.2f}x the TTFT")
    print(f"B remote hit vs A cold:      {cold.ttft_s / remote.ttft_s:.1f}x faster")
