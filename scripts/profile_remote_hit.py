"""Where a p2pkv remote (or local) hit's time goes: py-spy on the pulling vLLM instance.

Starts a directory and two ``vllm serve`` CPU instances with the connector; instance A computes
``--docs`` documents of ``--length`` tokens; then, with ``py-spy record`` attached to instance
B's processes (API server, engine core and worker), B answers a question about each document
(a remote hit). With ``--hit local`` B first answers one question about each document without
py-spy, then a second one, profiled: a local prefix-cache hit (``--no-connector``: the same on
plain vLLM, where B computes the documents itself). Prints B's TTFTs, the connector's own pull
times (from B's log), and B's sampled CPU time by category and process. Needs
``pip install py-spy``; start it under ``flock /tmp/p2pkv-vllm.lock``.

    python scripts/profile_remote_hit.py --docs 5 --length 3000 --out .p2pkv-run/profile
    python scripts/profile_remote_hit.py --hit local --docs 6 --out .p2pkv-run/profile-local
    python scripts/profile_remote_hit.py --hit cold --docs 4 --out .p2pkv-run/profile-cold
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from p2pkv.bench.ttft import qa_requests
from p2pkv.harness.cluster import LocalCluster, wait_healthy
from p2pkv.harness.demo_model import prepare
from p2pkv.harness.documents import document_tokens
from p2pkv.harness.openai_client import complete

# The deepest frame that matches a rule names the sample (so a numpy copy inside a pull counts
# as the pull, and a thread blocked in Event.wait counts as waiting).
RULES = [
    ("blocked (waits, polls, accept)",
     r"Event\.wait|Condition\.wait|connection\.py.*wait|_accept_loop|selectors|\bpoll\b"),
    ("vLLM engine<->worker IPC spin-wait", r"shm_broadcast"),
    ("save: copy computed blocks out", r"copy_out|p2pkv/vllm/saver|p2pkv/vllm/worker\.py.*\bsave"),
    ("pull: transport (slab read / socket + digest)", r"p2pkv/transport/"),
    ("pull: destination views (KVLayout)", r"p2pkv/vllm/layout"),
    ("lookup (scheduler side, directory client)", r"p2pkv/(vllm/scheduler|directory)"),
    ("connector, other", r"p2pkv/"),
    ("model forward", r"model_executor|attn|_custom_ops|vllm/ir/"),
    ("vLLM scheduler", r"vllm/v1/core"),
    ("vLLM engine / worker loop", r"vllm/v1/(engine|executor|worker)"),
    ("API server (HTTP, tokenizer, detokenizer)", r"entrypoints|uvloop|tokeniz|detokeniz"),
]


def categorize(stack: str) -> str:
    """``stack``: one py-spy raw line's frames, root first, ';'-separated."""
    frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
    for frame in reversed(frames):
        for name, pattern in RULES:
            if re.search(pattern, frame):
                return name
    return "other"


def process_of(stack: str) -> str:
    """The sampled process: with ``--subprocesses`` py-spy nests each child's
    ``process PID:"cmdline"`` frame under its parent's; vLLM retitles its processes
    (``VLLM::EngineCore``, ``VLLM::Worker``), the API server stays ``python``."""
    procs = [f for f in stack.split(";") if f.startswith("process ")]
    if not procs:
        return "?"
    cmd = procs[-1].partition(":")[2].strip('"').split()
    return cmd[0].rsplit("/", 1)[-1] if cmd else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=6,
                        help="half answered without py-spy (baseline TTFT), half with")
    parser.add_argument("--length", type=int, default=3000)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--settle-s", type=float, default=1.5)
    parser.add_argument("--out", type=Path, default=Path(".p2pkv-run/profile"))
    parser.add_argument("--hit", choices=("remote", "local", "cold"), default="remote")
    parser.add_argument("--no-connector", action="store_true",
                        help="plain vLLM (with --hit local: the baseline)")
    args = parser.parse_args()
    if args.no_connector and args.hit == "remote":
        parser.error("--no-connector needs --hit local or cold")
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    model = prepare()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    reqs = qa_requests(document_tokens(model), [args.length], args.docs, 3,
                       lambda t: tok(t, add_special_tokens=False)["input_ids"])
    firsts = [r for r in reqs if r.step == 0]
    remotes = [r for r in reqs if r.step == 1]
    connector = not args.no_connector
    raw = args.out / f"{args.hit}-hit.pyspy.txt"
    with LocalCluster(args.out, model) as cluster:
        if connector:
            cluster.start_directory()
        if args.hit == "cold":  # B alone; every request a new document
            holder = puller = cluster.start_vllm("inst-1", connector=connector)
            wait_healthy([puller], timeout_s=600)
            remotes = firsts
            complete(puller.url, "Warm-up: say hello.", max_tokens=2)  # a first request is slower
        else:
            holder, puller = (cluster.start_vllm(f"inst-{i}", connector=connector)
                              for i in range(2))
            wait_healthy([holder, puller], timeout_s=600)
        for r in firsts if connector and args.hit != "cold" else ():
            complete(holder.url, list(r.prompt), max_tokens=1)
        if args.hit == "local":  # B computes (or pulls) each document, then hits it locally
            for r in remotes:
                time.sleep(args.settle_s)
                complete(puller.url, list(r.prompt), max_tokens=1)
            remotes = [r for r in reqs if r.step == 2]
        half = len(remotes) // 2

        def ask(reqs: list) -> list[float]:
            out = []
            for r in reqs:
                time.sleep(args.settle_s)
                out.append(complete(puller.url, list(r.prompt), max_tokens=1).ttft_s)
            return out

        baseline = ask(remotes[:half])
        spy = subprocess.Popen(
            [pyspy, "record", "-p", str(puller.proc.popen.pid), "--subprocesses",
             "--nonblocking", "--threads", "--rate", str(args.rate), "--format", "raw",
             "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        time.sleep(3.0)  # py-spy attaches
        ttfts = ask(remotes[half:])
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
        pulls = [float(m) for m in re.findall(r"p2pkv: pulled \d+/\d+ chunks .* in ([\d.]+) ms",
                                              puller.proc.log.read_text())]
    by_cat: collections.Counter[str] = collections.Counter()
    by_proc: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in raw.read_text().splitlines() if raw.exists() else ():
        stack, _, count = line.rpartition(" ")
        by_cat[categorize(stack)] += int(count)
        by_proc[process_of(stack), categorize(stack)] += int(count)
    ms = 1000.0 / args.rate

    def fmt(ts: list[float]) -> str:
        return f"p50 {sorted(ts)[len(ts) // 2]:.3f} s ({', '.join(f'{t:.3f}' for t in ts)})"

    print(f"{args.hit}-hit TTFT without py-spy: {fmt(baseline)}")
    print(f"{args.hit}-hit TTFT with py-spy:    {fmt(ttfts)}")
    print(f"connector pull times (ms), in order: {', '.join(f'{p:.1f}' for p in pulls)}")
    print(f"sampled time in the puller's processes per profiled hit, all threads "
          f"(settle gaps included; {args.rate} Hz):")
    for name, n in by_cat.most_common():
        print(f"  {name:<48} {n * ms / len(ttfts):8.1f} ms")
    print("by process (top categories):")
    for (proc, name), n in sorted(by_proc.items(), key=lambda kv: (kv[0][0], -kv[1])):
        if n * ms / len(ttfts) >= 1.0:
            print(f"  {proc[:24]:<24} {name:<48} {n * ms / len(ttfts):8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
