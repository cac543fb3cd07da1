"""Where a p2pkv remote hit's time goes: py-spy on the pulling vLLM instance.

Starts a directory and two ``vllm serve`` CPU instances with the connector; instance A computes
``--docs`` documents of ``--length`` tokens; then, with ``py-spy record`` attached to instance
B's processes (API server and engine core), B answers a question about each document (a remote
hit). Prints B's TTFTs, the connector's own pull times (from B's log), and B's sampled CPU time
by category. Needs ``pip install py-spy``; start it under ``flock /tmp/p2pkv-vllm.lock``.

    python scripts/profile_remote_hit.py --docs 5 --length 3000 --out .p2pkv-run/profile
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

from p2pkv.bench.correctness import document_tokens
from p2pkv.bench.ttft import qa_requests
from p2pkv.localcluster import LocalCluster, complete, wait_healthy
from p2pkv.model import prepare

# First match wins, tested against the whole stack (root to leaf, ';'-joined).
CATEGORIES = [
    ("pull: shm copy + digest into KV blocks", r"p2pkv/transport/(shm|staging)"),
    ("pull: tcp / other transport", r"p2pkv/transport/"),
    ("save: copy computed blocks out", r"p2pkv/vllm/.*\((save|copy_out)"),
    ("lookup + scheduler side of the connector", r"p2pkv/(vllm/scheduler|directory)"),
    ("connector, other", r"p2pkv/"),
    ("model forward (prefill of the tail + decode)", r"model_executor|forward"),
    ("vLLM scheduler / engine loop", r"vllm/v1/(core|engine)"),
    ("API server, tokenizer, detokenizer", r"entrypoints|tokeniz|detokeniz|uvicorn|fastapi"),
]


def categorize(stack: str) -> str:
    for name, pattern in CATEGORIES:
        if re.search(pattern, stack):
            return name
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=5)
    parser.add_argument("--length", type=int, default=3000)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--settle-s", type=float, default=1.5)
    parser.add_argument("--out", type=Path, default=Path(".p2pkv-run/profile"))
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    model = prepare()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    reqs = qa_requests(document_tokens(model), [args.length], args.docs, 2,
                       lambda t: tok(t, add_special_tokens=False)["input_ids"])
    firsts = [r for r in reqs if r.step == 0]
    remotes = [r for r in reqs if r.step == 1]
    raw = args.out / "remote-hit.pyspy.txt"
    with LocalCluster(args.out, model) as cluster:
        cluster.start_directory()
        insts = [cluster.start_vllm(f"inst-{i}") for i in range(2)]
        wait_healthy(insts, timeout_s=600)
        for r in firsts:
            complete(insts[r.instance].url, list(r.prompt), max_tokens=1)
        # NOTE: the puller of step 1 is the other instance than step 0's, per document.
        ttfts = []
        spies = {i: subprocess.Popen(
            [pyspy, "record", "-p", str(insts[i].proc.popen.pid), "--subprocesses",
             "--nonblocking", "--threads", "--rate", str(args.rate), "--format", "raw",
             "-o", str(raw.with_suffix(f".{i}.txt"))],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT) for i in range(2)}
        time.sleep(2.0)  # py-spy attaches
        for r in remotes:
            time.sleep(args.settle_s)
            ttfts.append(complete(insts[r.instance].url, list(r.prompt), max_tokens=1).ttft_s)
        for spy in spies.values():
            spy.send_signal(signal.SIGINT)
        for spy in spies.values():
            spy.wait(timeout=60)
        pulls = [float(m) for i in range(2) for m in re.findall(
            r"p2pkv: pulled \d+/\d+ chunks .* in ([\d.]+) ms", insts[i].proc.log.read_text())]
    by_cat: collections.Counter[str] = collections.Counter()
    for i in range(2):
        path = raw.with_suffix(f".{i}.txt")
        for line in path.read_text().splitlines() if path.exists() else ():
            stack, _, count = line.rpartition(" ")
            by_cat[categorize(stack)] += int(count)
    ms = 1000.0 / args.rate
    print(f"remote hits: {len(ttfts)}, TTFT p50 {sorted(ttfts)[len(ttfts) // 2]:.3f} s "
          f"(all: {', '.join(f'{t:.3f}' for t in ttfts)})")
    print(f"connector pull times (ms): {', '.join(f'{p:.1f}' for p in pulls)}")
    total = sum(ttfts) * 1000
    print(f"sampled CPU time on the pullers during {len(ttfts)} hits "
          f"(sum of TTFTs {total:.0f} ms; threads run in parallel):")
    for name, n in by_cat.most_common():
        print(f"  {name:<48} {n * ms / len(ttfts):8.1f} ms per hit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
