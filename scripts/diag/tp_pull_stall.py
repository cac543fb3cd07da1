"""Pulls into a TP 2 instance, round after round, with the CPU watched (issue 11's stall).

    PYTHONPATH=$PWD flock /tmp/p2pkv-vllm.lock python scripts/diag/tp_pull_stall.py OUT [ROUNDS]

The test_tp_vllm cluster (A at TP 2, B at TP 1, C at TP 2, a 4-KV-head tiny model); each round
A and B compute a prompt, C pulls it. OUT/repro.log: each pull's time and whether every
rank pulled every chunk; OUT/samples.jsonl: every thread of the cluster's processes every
0.25 s (a normal-priority sampler, starved with the rest); OUT/rt.jsonl: /proc/stat and the
busiest threads every 0.2 s from a SCHED_FIFO sampler (cpu_sampler.py, needs root), which
runs through a starvation. NODUMP unset: py-spy dumps every process when a pull is slow.
"""
import os, random, subprocess, sys, threading, time, json
from pathlib import Path
import httpx
from p2pkv.harness.cluster import LocalCluster, wait_healthy
from p2pkv.harness.demo_model import prepare, tiny_model

CHUNK = 128
OUT = Path(sys.argv[1]); OUT.mkdir(parents=True, exist_ok=True)
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 6
LAYERS = int(os.environ.get("LAYERS", "2"))
PYSPY = "/work/main/.venv/bin/py-spy"
log = open(OUT / "repro.log", "a", buffering=1)
def say(*a):
    print(time.strftime("%H:%M:%S"), f"{time.time():.3f}", *a, file=log); print(*a, flush=True)

def pids_of(pgid):
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                st = open(f"/proc/{e}/stat").read()
            except OSError:
                continue
            if int(st.rsplit(")", 1)[1].split()[2]) == pgid:
                out.append(int(e))
    return out

def threads(pid):
    rows = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return rows
    for t in tids:
        try:
            st = open(f"/proc/{pid}/task/{t}/stat").read()
            wchan = open(f"/proc/{pid}/task/{t}/wchan").read()
        except OSError:
            continue
        name = st[st.index("(")+1:st.rindex(")")]
        f = st.rsplit(")", 1)[1].split()
        rows.append((int(t), name, f[0], int(f[11]) + int(f[12]), int(f[36]), wchan))
    return rows

class Sampler(threading.Thread):
    def __init__(self, groups):
        super().__init__(daemon=True); self.groups = groups; self.stop = False
        self.f = open(OUT / "samples.jsonl", "a", buffering=1)
    def run(self):
        while not self.stop:
            now = time.time(); snap = {}
            for name, pgid in self.groups.items():
                for pid in pids_of(pgid):
                    snap[f"{name}:{pid}"] = threads(pid)
            self.f.write(json.dumps({"t": now, "s": snap}) + "\n")
            time.sleep(0.25)

def dump(groups, tag):
    for name, pgid in groups.items():
        if name == "directory":
            continue
        for pid in pids_of(pgid):
            try:
                r = subprocess.run([PYSPY, "dump", "--pid", str(pid)], capture_output=True,
                                   text=True, timeout=20)
                say(f"--- py-spy {tag} {name} pid {pid} ---\n{r.stdout}{r.stderr}")
            except Exception as e:
                say("py-spy failed", pid, e)

def prompt(seed, n):
    rng = random.Random(seed); return [rng.randrange(1000, 40000) for _ in range(n)]

def gen(url, toks):
    r = httpx.post(url + "/v1/completions", json={"model": "model", "prompt": toks,
                   "max_tokens": 12, "temperature": 0.0}, timeout=600)
    r.raise_for_status(); return r.json()["choices"][0]["text"]

def main():
    model = tiny_model(OUT / "tiny-4kv", prepare(), num_layers=LAYERS, num_heads=4, num_kv_heads=4)
    with LocalCluster(OUT / "cluster", model) as c:
        d = c.start_directory()
        common = dict(max_model_len=2048, kv_cache_gib=1)
        extra = json.loads(os.environ.get("EXTRA_ENV", "{}"))
        a = c.start_vllm("A", tensor_parallel_size=2, extra_env=extra, **common)
        b = c.start_vllm("B", extra_env=extra, **common)
        cc = c.start_vllm("C", tensor_parallel_size=2, extra_env=extra, **common)
        wait_healthy([a, b, cc], timeout_s=900)
        groups = {"A": a.proc.popen.pid, "B": b.proc.popen.pid, "C": cc.proc.popen.pid,
                  "directory": d.popen.pid}
        s = Sampler(groups); s.start()
        rt = c.start_process("rt", ["chrt", "-f", "20", sys.executable, str(Path(__file__).with_name("cpu_sampler.py")), str(OUT / "rt.jsonl")])
        url = {"A": a.url, "B": b.url, "C": cc.url}
        fails = 0
        for i in range(ROUNDS):
            for holder in ("A", "B"):
                n = 3 * CHUNK + (i * 37) % CHUNK
                toks = prompt(1000 * i + ord(holder), n)
                gen(url[holder], toks); time.sleep(0.5); ref = gen(url[holder], toks)
                time.sleep(0.5)
                before = c.counter_totals().get("chunks_pulled", 0)
                done = threading.Event(); res = {}
                def go():
                    res["t0"] = time.monotonic(); res["out"] = gen(url["C"], toks)
                    res["dt"] = time.monotonic() - res["t0"]; done.set()
                say(f"round {i} {holder}->C start")
                th = threading.Thread(target=go); th.start()
                if not done.wait(1.5) and not os.environ.get("NODUMP"):
                    say(f"round {i} {holder}->C slow: dumping")
                    dump(groups, f"r{i}{holder}")
                th.join()
                time.sleep(1.0)
                after = c.counter_totals().get("chunks_pulled", 0)
                ok = after - before == 2 * (n // CHUNK)
                fails += not ok
                say(f"round {i} {holder}->C dt {res['dt']:.2f}s pulled {after-before} "
                    f"want {2*(n//CHUNK)} same={res['out']==ref} {'OK' if ok else 'FAIL'}")
        s.stop = True
        say(f"fails {fails}/{2*ROUNDS}")

main()
