"""``p2pkv bench ttft``: time to first token, p2pkv next to its baselines, in one run.

Two workloads, the same requests for every configuration:

- *Long-document QA*: ``--docs`` documents of each length in ``--lengths`` tokens, ``--questions``
  questions each; question ``q`` about document ``d`` goes to instance ``(d + q) % 2``, so the
  first question computes the document, the second lands on the other instance, the third
  comes back.
- *Multi-round chat*: ``--users`` conversations of ``--rounds`` turns; each turn lands on the
  other instance than the one before.

Configurations (two ``vllm serve`` CPU instances each, started one configuration at a time so
they never compete for the cores): ``plain`` (vLLM, no prefix caching), ``local`` (vLLM's own
prefix cache), ``p2pkv`` (the connector). LMCache is compared only where it is installed
(not yet wired: reported as skipped). Writes JSON and, with matplotlib, a PNG plot.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from p2pkv.bench.correctness import document_tokens
from p2pkv.localcluster import LocalCluster, complete, wait_healthy

CONFIGS: dict[str, dict] = {
    "plain": {"connector": False, "extra_args": ["--no-enable-prefix-caching"]},
    "local": {"connector": False},
    "p2pkv": {"connector": True},
}


@dataclass(frozen=True, slots=True)
class Request:
    workload: str
    group: int  # document or user
    step: int  # question or round
    length: int  # prompt tokens
    instance: int
    prompt: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Record:
    config: str
    workload: str
    group: int
    step: int
    length: int
    instance: int
    ttft_s: float
    total_s: float


def qa_requests(tokens: list[int], lengths: list[int], docs: int, questions: int,
                tokenize) -> list[Request]:
    asks = ["Who founded the cooperative?", "When was the lighthouse first lit?",
            "How many steps does the staircase have?", "Who was the last keeper?",
            "Where was the granite quarried?"]
    out = []
    for length in lengths:
        for d in range(docs):
            shift = (d * 701 + length) % len(tokens)
            doc = (tokens[shift:] + tokens[:shift])[:length]
            for q in range(questions):
                suffix = tokenize(f"\n\nQuestion: {asks[q % len(asks)]}\nAnswer:")
                out.append(Request("qa", d + 100 * length, q, length, (d + q) % 2,
                                   tuple(doc + suffix)))
    return out


def chat_requests(tokens: list[int], users: int, rounds: int, tokenize) -> list[Request]:
    out = []
    for u in range(users):
        history = tokens[u * 900:u * 900 + 800]
        for r in range(rounds):
            history = history + tokenize(f"\nUser: tell me more about part {r + 1}.\nAssistant:")
            out.append(Request("chat", u, r, len(history), (u + r) % 2, tuple(history)))
            history = history + tokenize(f" Part {r + 1} is described in the text above.")
    return out


def run_config(name: str, requests: list[Request], model: Path, workdir: Path,
               settle_s: float, progress) -> tuple[list[Record], dict]:
    with LocalCluster(workdir / name, model) as cluster:
        if CONFIGS[name]["connector"]:
            cluster.start_directory()
        insts = [cluster.start_vllm(f"{name}-{i}", **CONFIGS[name]) for i in range(2)]
        wait_healthy(insts, timeout_s=600)
        progress(0)
        records = []
        t0 = time.monotonic()
        for req in requests:
            time.sleep(settle_s)  # each request starts on an idle machine (see demo.py)
            c = complete(insts[req.instance].url, list(req.prompt))
            records.append(Record(name, req.workload, req.group, req.step, req.length,
                                  req.instance, c.ttft_s, c.total_s))
            progress(1)
        wall = time.monotonic() - t0 - settle_s * len(requests)
        counters = cluster.counter_totals() if CONFIGS[name]["connector"] else {}
    return records, {"busy_s": wall, **counters}


def kind(r) -> str:
    """first: the document/conversation is new; other: it was last computed on the other
    instance (a remote hit for p2pkv); same: it was computed on this instance before."""
    if r.step == 0:
        return "first"
    if r.workload == "chat":
        return "other"
    return "other" if r.step == 1 else "same"


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def summarize(records: list[Record], extra: dict) -> dict:
    rows = {}
    for r in records:
        rows.setdefault(f"{r.workload}/{r.length if r.workload == 'qa' else 'all'}/{kind(r)}",
                        []).append(r.ttft_s)
    return {
        "requests": len(records),
        "ttft_p50_s": _pct([r.ttft_s for r in records], 0.5),
        "ttft_p90_s": _pct([r.ttft_s for r in records], 0.9),
        "latency_p50_s": _pct([r.total_s for r in records], 0.5),
        "throughput_req_s": len(records) / max(extra.get("busy_s", 0.0), 1e-9),
        "ttft_p50_by_row_s": {k: _pct(v, 0.5) for k, v in sorted(rows.items())},
        **{k: extra[k] for k in ("bytes_pulled", "chunks_pulled", "chunks_failed")
           if k in extra},
    }


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default="1000,3000",
                        help="document lengths in tokens, comma-separated (max ~3,400)")
    parser.add_argument("--docs", type=int, default=1)
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--users", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default="plain,local,p2pkv")
    parser.add_argument("--settle-s", type=float, default=1.5)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/ttft.json"))
    parser.add_argument("--workdir", type=Path, default=Path(".p2pkv-run/bench-ttft"))


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from p2pkv.model import prepare

    model = prepare()
    tok = AutoTokenizer.from_pretrained(str(model))

    def tokenize(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    tokens = document_tokens(model)
    requests = (qa_requests(tokens, [int(x) for x in args.lengths.split(",")], args.docs,
                            args.questions, tokenize)
                + chat_requests(tokens, args.users, args.rounds, tokenize))
    configs = [c for c in args.configs.split(",") if c]
    if importlib.util.find_spec("lmcache") is None:
        print("lmcache: not installed; its comparison is skipped")
    else:
        print("lmcache: installed, but its configuration is not wired into this bench yet")
    results: dict = {"requests_per_config": len(requests), "configs": {}, "records": []}
    with tqdm(total=len(requests) * len(configs), desc="requests", unit="req") as bar:
        for name in configs:
            bar.set_postfix_str(f"{name}: starting instances")
            def progress(n: int, name: str = name) -> None:
                bar.set_postfix_str(f"{name}: running")
                bar.update(n)

            records, extra = run_config(name, requests, model, args.workdir, args.settle_s,
                                        progress)
            results["configs"][name] = summarize(records, extra)
            results["records"] += [asdict(r) for r in records]
    _report(results, args.out)
    return 0


def _report(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    configs = results["configs"]
    names = list(configs)
    print("TTFT p50 (s) by workload/length/kind "
          "(first = new prefix, other = last computed on the other instance, same = on this one)")
    print(f"{'row':<22}" + "".join(f"{n:>10}" for n in names))
    for row in next(iter(configs.values()))["ttft_p50_by_row_s"]:
        print(f"{row:<22}" + "".join(f"{configs[n]['ttft_p50_by_row_s'][row]:>10.3f}"
                                      for n in names))
    print(f"{'all: TTFT p50':<22}" + "".join(f"{configs[n]['ttft_p50_s']:>10.3f}" for n in names))
    print(f"{'all: TTFT p90':<22}" + "".join(f"{configs[n]['ttft_p90_s']:>10.3f}" for n in names))
    print(f"{'all: latency p50':<22}"
          + "".join(f"{configs[n]['latency_p50_s']:>10.3f}" for n in names))
    print(f"{'throughput req/s':<22}"
          + "".join(f"{configs[n]['throughput_req_s']:>10.3f}" for n in names))
    print(f"{'MB pulled':<22}"
          + "".join(f"{configs[n].get('bytes_pulled', 0) / 1e6:>10.1f}" for n in names))
    if "p2pkv" in configs:
        p = configs["p2pkv"]["ttft_p50_by_row_s"]
        for row in p:
            if row.endswith("/other"):
                for base in ("plain", "local"):
                    if base in configs:
                        b = configs[base]["ttft_p50_by_row_s"][row]
                        print(f"{row}: p2pkv {p[row]:.3f} s vs {base} {b:.3f} s "
                              f"({b / p[row]:.1f}x faster)")
    print(f"wrote {out}")
    _plot(results, out.with_suffix(".png"))


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in results["configs"]:
        rows = [r for r in results["records"] if r["config"] == name and r["workload"] == "qa"
                and r["step"] == 1]
        lengths = sorted({r["length"] for r in rows})
        ax.plot(lengths, [statistics.median(r["ttft_s"] for r in rows if r["length"] == n)
                          for n in lengths], marker="o", label=name)
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("TTFT p50, question on the other instance (s)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Long-document QA on 2 vLLM CPU instances")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")
