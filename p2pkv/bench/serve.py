"""``p2pkv bench serve``: vLLM's own benchmark client against plain vLLM and against p2pkv.

One run, same requests (vLLM's ``prefix_repetition`` dataset, same ``--seed``), two
instances each time:

- ``plain``: two ``vllm serve`` (local prefix cache on) behind nginx, round robin: what a user
  without a cache-aware router runs;
- ``p2pkv``: a directory, two instances with the connector, ``p2pkv router`` in front.

The client is ``vllm bench serve`` itself (``p2pkv.bench.vllm_client``: the CPU wheel's ``vllm``
command cannot start, see there); its own result table is printed as it wrote it, then one
summary line per config from its result JSON (``--save-result``), plus, for p2pkv, the
connector's counters as the directory last heard them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from p2pkv.harness.cluster import Instance, LocalCluster, wait_healthy

CONFIGS = ("plain", "p2pkv")
SUMMARY = (("mean_ttft_ms", "mean TTFT ms"), ("median_ttft_ms", "median TTFT ms"),
           ("p99_ttft_ms", "p99 TTFT ms"), ("mean_itl_ms", "mean ITL ms"),
           ("mean_tpot_ms", "mean TPOT ms"), ("request_throughput", "req/s"),
           ("output_throughput", "out tok/s"))


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory (default: the prepared SmolLM2-135M)")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--num-prefixes", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--request-rate", default="1",
                        help="requests/s (Poisson; 'inf': all at once)")
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=Path(".p2pkv-run/bench-serve"))
    parser.add_argument("--json-out", type=Path, default=None,
                        help="write every config's client result JSON (and p2pkv's counters)")


def client_argv(args: argparse.Namespace, base_url: str, model: Path, result_dir: Path,
                name: str) -> list[str]:
    """``vllm bench serve`` arguments: the same dataset and schedule for every config."""
    return [sys.executable, "-m", "p2pkv.bench.vllm_client",
            "--backend", "vllm", "--base-url", base_url, "--endpoint", "/v1/completions",
            "--model", "model", "--tokenizer", str(model),
            "--dataset-name", "prefix_repetition",
            "--prefix-repetition-prefix-len", str(args.prefix_len),
            "--prefix-repetition-suffix-len", str(args.suffix_len),
            "--prefix-repetition-num-prefixes", str(args.num_prefixes),
            "--prefix-repetition-output-len", str(args.output_len),
            "--num-prompts", str(args.num_prompts), "--seed", str(args.seed),
            "--request-rate", str(args.request_rate),
            "--max-concurrency", str(args.max_concurrency),
            "--temperature", "0", "--ignore-eos",
            # its ready check would send the first prompt once more (a cache warm-up that
            # differs between configs); the instances are healthy when it starts
            "--ready-check-timeout-sec", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--result-dir", str(result_dir),
            "--result-filename", f"{name}.json", "--label", name, "--disable-tqdm"]


def run_client(argv: list[str], log: Path) -> int:
    """Run the client, its output both on our stdout and in ``log``."""
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        assert proc.stdout is not None
        show = False
        for line in proc.stdout:
            f.write(line)
            # its argument dump and the leak reports of an unrelated library are noise here
            if line.startswith(("Namespace(", "nanobind:", " - leaked")):
                continue
            show = show or "Starting main benchmark run" in line
            if show or line.startswith("WARNING"):
                print(line, end="", flush=True)
        return proc.wait()


def start_config(cluster: LocalCluster, name: str, args: argparse.Namespace, model: Path
                 ) -> Instance:
    """Two instances and the front the client talks to."""
    from p2pkv.harness.nginx import start_round_robin

    progress = lambda t, ready: print(f"  {name}: starting, {t:.0f} s, ready {ready}",  # noqa: E731
                                      flush=True)
    if name == "plain":
        instances = [cluster.start_vllm(f"{name}{i}", connector=False,
                                        max_model_len=args.max_model_len) for i in range(2)]
        wait_healthy(instances, timeout_s=900, progress=progress)
        return start_round_robin(cluster, instances)
    cluster.start_directory()
    instances = [cluster.start_vllm(f"{name}{i}", max_model_len=args.max_model_len)
                 for i in range(2)]
    wait_healthy(instances, timeout_s=900, progress=progress)
    return cluster.start_router(model, instances=instances)


def main(args: argparse.Namespace) -> int:
    from p2pkv.harness.demo_model import prepare

    model = args.model or prepare()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        print(f"unknown configs: {sorted(unknown)} (known: {', '.join(CONFIGS)})")
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name in configs:
        with LocalCluster(args.workdir / name, model) as cluster:
            try:
                front = start_config(cluster, name, args, model)
            except RuntimeError as e:  # e.g. nginx missing: the row says why
                results[name] = {"error": str(e).splitlines()[0]}
                print(f"{name}: not run: {results[name]['error']}", flush=True)
                continue
            load = os.getloadavg()[0]
            print(f"\n=== {name}: vllm bench serve -> {front.url} (load average {load:.2f})"
                  " ===", flush=True)
            rc = run_client(client_argv(args, front.url, model, args.workdir, name),
                            args.workdir / f"{name}-client.log")
            out = args.workdir / f"{name}.json"
            if rc != 0 or not out.exists():
                results[name] = {"error": f"vllm bench serve exited {rc} (see "
                                          f"{args.workdir / f'{name}-client.log'})"}
                continue
            results[name] = json.loads(out.read_text())
            results[name]["load_avg_at_start"] = load
            if name == "p2pkv":
                results[name]["p2pkv_counters"] = cluster.counter_totals()
                results[name]["router_choices"] = router_choices(front.url)
    print_summary(results)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2, default=str))
    return 0 if all("error" not in r for r in results.values()) else 1


def print_summary(results: dict[str, dict]) -> None:
    print("\n" + f"{'config':<7}" + "".join(f"{label:>16}" for _, label in SUMMARY))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<7} not run: {r['error']}")
            continue
        print(f"{name:<7}" + "".join(f"{r.get(k, float('nan')):>16.2f}" for k, _ in SUMMARY)
              + f"   ({r.get('completed', 0)}/{r.get('num_prompts', '?')} completed, load "
              f"{r.get('load_avg_at_start', float('nan')):.2f})")
    counters = results.get("p2pkv", {}).get("p2pkv_counters")
    if counters:
        keys = ("loads", "chunks_pulled", "bytes_pulled", "chunks_failed", "chunks_missing")
        print("p2pkv connector: " + ", ".join(f"{k}={counters.get(k, 0)}" for k in keys))
    choices = results.get("p2pkv", {}).get("router_choices")
    if choices:
        print("p2pkv router choices: " + ", ".join(f"{k}={v:g}" for k, v in choices.items()))


def router_choices(url: str) -> dict[str, float]:
    """The router's decisions by reason (cache, load, spread), from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return {s.labels.get("reason", "?"): s.value
            for f in text_string_to_metric_families(text) if f.name == "p2pkv_router_choices"
            for s in f.samples if s.name.endswith("_total")}
