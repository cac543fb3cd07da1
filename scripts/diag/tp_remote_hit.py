"""Where a TP 2 puller's remote hit goes (issue 11): A at TP 2 holds, B (TP 1) and C (TP 2)
pull; prints each TTFT (with its send time, epoch seconds) and the ranks' ``pulled`` lines.
Issue 11's diagnosis also logged ``TIMING`` lines (epoch seconds at the scheduler's hit, each
rank's load start and end, the scheduler seeing the load finished) from a temporary patch to
scheduler.py, worker.py and connector.py; the script prints such lines where they exist.

    PYTHONPATH=$PWD flock /tmp/p2pkv-vllm.lock timeout 600 \
        python scripts/diag/tp_remote_hit.py OUT [ROUNDS] [LENGTH]

Per round: A computes a new document (question 0); C asks question 1 (remote hit from A),
then question 2 (local hit); B the same. Prints each TTFT; OUT/<name>/ holds the logs.
"""
import re
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from p2pkv.bench.ttft import qa_requests
from p2pkv.harness.cluster import LocalCluster, wait_healthy
from p2pkv.harness.demo_model import prepare, tiny_model
from p2pkv.harness.documents import document_tokens
from p2pkv.harness.openai_client import complete
from tests.ranks import held, wait_held

OUT = Path(sys.argv[1]).resolve()
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
LENGTH = int(sys.argv[3]) if len(sys.argv) > 3 else 1500
SETTLE = 2.0


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    src = prepare()
    model = tiny_model(OUT / "tiny-30l-4kv", src, num_layers=30, num_heads=4, num_kv_heads=4)
    tok = AutoTokenizer.from_pretrained(str(model))
    reqs = qa_requests(document_tokens(model), [LENGTH], ROUNDS, 3,
                       lambda t: tok(t, add_special_tokens=False)["input_ids"])
    rows = []
    with LocalCluster(OUT / "cluster", model) as c:
        c.start_directory()
        a = c.start_vllm("A", tensor_parallel_size=2, kv_cache_gib=1, max_model_len=2048)
        b = c.start_vllm("B", kv_cache_gib=1, max_model_len=2048)
        cc = c.start_vllm("C", tensor_parallel_size=2, kv_cache_gib=1, max_model_len=2048)
        t0 = time.monotonic()
        wait_healthy([a, b, cc], timeout_s=500)
        print(f"healthy after {time.monotonic() - t0:.0f} s", flush=True)
        for inst in (a, b, cc):  # first requests are slower
            complete(inst.url, "Warm-up: say hello.", max_tokens=2)
        for d in range(ROUNDS):
            q = {r.step: r for r in reqs if r.group == d + 100 * LENGTH}
            since = held(c, "A")
            time.sleep(SETTLE)
            cold = complete(a.url, list(q[0].prompt), max_tokens=1)
            wait_held(c, "A", since, LENGTH // 128)
            for inst in (cc, b):
                for step, kind in ((1, "remote"), (2, "local")):
                    time.sleep(SETTLE)
                    sent = time.time()
                    r = complete(inst.url, list(q[step].prompt))
                    rows.append((d, inst.name, kind, r.ttft_s, sent))
                    print(f"round {d} {inst.name} {kind:6} ttft {r.ttft_s:.3f} s "
                          f"(sent {sent:.3f}); A cold {cold.ttft_s:.3f}", flush=True)
        logs = {i.name: i.proc.log.read_text() for i in (a, b, cc)}
    for name, text in logs.items():
        (OUT / f"{name}.log").write_text(text)
    for name in ("C", "B"):
        print(f"--- {name} TIMING / pulled lines")
        for line in logs[name].splitlines():
            if "TIMING" in line or "pulled" in line or "not pulling" in line:
                print(line[-200:])


if __name__ == "__main__":
    main()
