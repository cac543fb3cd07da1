"""``p2pkv bench ttft``: time to first token, p2pkv next to its baselines, in one run.

Two workloads, the same requests for every configuration:

- *Long-document QA*: ``--docs`` documents of each length in ``--lengths`` tokens, ``--questions``
  questions each; question ``q`` about document ``d`` goes to instance ``(d + q) % 2``, so the
  first question computes the document, the second lands on the other instance, the third
  comes back.
- *Multi-round chat*: ``--users`` conversations of ``--rounds`` turns; each turn lands on the
  other instance than the one before.

``--repeats`` runs the whole workload that many times with new documents and conversations, so
every row has that many samples (p50 and p90 reported).

Configurations (two ``vllm serve`` CPU instances each, started one configuration at a time so
they never compete for the cores): ``plain`` (vLLM, no prefix caching), ``local`` (vLLM's own
prefix cache), ``p2pkv`` (the connector, same-host shared memory), ``p2pkv-tcp`` (the connector
over TCP), ``p2pkv-layerwise`` (the connector loading remote hits layer-wise within the step that
computes the rest, ``load_mode: layerwise``), and, only where LMCache is installed (:mod:`p2pkv.harness.lmcache`), ``lmcache``
(LMCache's multiprocess server over TCP) and ``lmcache-shm`` (its same-host shared-memory mode),
and ``vllm-p2p``: vLLM's own P2P tier (:mod:`p2pkv.harness.vllm_p2p`), each request naming the
other instance as its source; where vLLM cannot start it (its CPU backend), the run records
why (``not_run``: vLLM's exception and the source line that raised it).
Tensor parallelism, run only when named in ``--configs`` and with a ``--model`` whose KV heads
split over 2 ranks (the demo model's 3 do not): ``p2pkv-tp2`` (both instances at TP 2) and
``p2pkv-tp2-tp1`` (instance 0 at TP 2, instance 1 at TP 1; its rows say which instance's TP
served them, ``@tp2``/``@tp1``, and a remote hit is compared with the local hit at the same
TP). Their JSON has each worker rank's bytes pulled.
Before the timed requests each instance answers a warm-up prompt of its own, which the other
instance then asks too (untimed, its pulls not counted; ``--no-warm-up`` skips it): vLLM's
first forward passes on an instance are slow (2.4 s against 0.3 s at TP 2 here) and would
land on whichever row the instance serves first, instance 1's being the first remote hit.
Every run ends with the *overhead table* (:mod:`p2pkv.harness.overhead`): a cold miss and a
local hit on plain vLLM, on p2pkv and (where installed) on LMCache, one instance each, started
together and measured interleaved (``--overhead-samples`` documents), all with the same
placement of vLLM's threads. ``--only-overhead`` runs the overhead table alone,
``--overhead-samples 0`` skips it, ``--overhead-setups`` picks its setups. Writes JSON and,
with matplotlib, a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from p2pkv.bench.report import Column, median, pct, plot_lines, table
from p2pkv.harness import lmcache, overhead, vllm_p2p
from p2pkv.harness.cluster import Instance, LocalCluster, free_port, reserved_cpus, wait_healthy
from p2pkv.harness.documents import QUESTIONS, document_tokens
from p2pkv.harness.model_len import max_model_len, model_positions
from p2pkv.harness.openai_client import complete


@dataclass(frozen=True, slots=True)
class Config:
    """How one configuration's two instances are started."""

    prefix_caching: bool = True
    connector: bool = False
    """p2pkv's connector (and a directory)."""
    transport: str = "auto"
    """p2pkv's data plane (``auto`` is shared memory on one host)."""
    lmcache: str = ""
    """LMCache's mode (:data:`p2pkv.harness.lmcache.MODES`); empty: no LMCache."""
    tp: tuple[int, int] = (1, 1)
    """Tensor parallelism of instance 0 and instance 1."""
    vllm_p2p: bool = False
    """vLLM's own P2P tier (:mod:`p2pkv.harness.vllm_p2p`); where it cannot start, the row says
    why."""
    load_mode: str = "async"
    """p2pkv's ``load_mode`` (``layerwise``: :mod:`p2pkv.vllm.layerwise`)."""


CONFIGS: dict[str, Config] = {
    "plain": Config(prefix_caching=False),
    "local": Config(),
    "p2pkv": Config(connector=True),
    "p2pkv-tcp": Config(connector=True, transport="tcp"),
    "p2pkv-layerwise": Config(connector=True, load_mode="layerwise"),
    "lmcache": Config(lmcache="tcp"),
    "lmcache-shm": Config(lmcache="shm"),
    "p2pkv-tp2": Config(connector=True, tp=(2, 2)),
    "p2pkv-tp2-tp1": Config(connector=True, tp=(2, 1)),
    "vllm-p2p": Config(vllm_p2p=True),
}
DEFAULT_CONFIGS = [name for name, c in CONFIGS.items() if c.tp == (1, 1)]


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


def _rotated(tokens: list[int], shift: int) -> list[int]:
    shift %= len(tokens)
    return tokens[shift:] + tokens[:shift]


def qa_requests(tokens: list[int], lengths: list[int], docs: int, questions: int,
                tokenize) -> list[Request]:
    asks = QUESTIONS[:5]  # the five that every published run asked
    out = []
    for length in lengths:
        for d in range(docs):
            doc = _rotated(tokens, d * 701 + length)[:length]
            for q in range(questions):
                suffix = tokenize(f"\n\nQuestion: {asks[q % len(asks)]}\nAnswer:")
                out.append(Request("qa", d + 100 * length, q, length, (d + q) % 2,
                                   tuple(doc + suffix)))
    return out


def chat_requests(tokens: list[int], users: int, rounds: int, tokenize) -> list[Request]:
    out = []
    for u in range(users):
        history = _rotated(tokens, u * 977)[:800]
        for r in range(rounds):
            history = history + tokenize(f"\nUser: tell me more about part {r + 1}.\nAssistant:")
            out.append(Request("chat", u, r, len(history), (u + r) % 2, tuple(history)))
            history = history + tokenize(f" Part {r + 1} is described in the text above.")
    return out


def start_instances(cluster: LocalCluster, name: str,
                    tiers: dict[int, vllm_p2p.TierAddress] | None = None,
                    max_len: int = 4096) -> list[Instance]:
    config = CONFIGS[name]
    args = [] if config.prefix_caching else ["--no-enable-prefix-caching"]
    env: dict[str, str] = {}
    if config.vllm_p2p:
        assert tiers is not None
        for i in range(2):
            tiers[i] = vllm_p2p.TierAddress("127.0.0.1", free_port())
        return [cluster.start_vllm(f"{name}-{i}", connector=False, max_model_len=max_len,
                                   extra_args=[
            *args, "--kv-transfer-config",
            vllm_p2p.kv_transfer_config(tiers[i], engine_id=f"{name}-{i}")]) for i in range(2)]
    if config.connector:
        cluster.start_directory()
    if config.lmcache:
        args += lmcache.start_server(cluster, config.lmcache).vllm_args()
        env = lmcache.ENV
    return [cluster.start_vllm(f"{name}-{i}", connector=config.connector, extra_args=args,
                               extra_config={"transport": config.transport,
                                             "load_mode": config.load_mode}, extra_env=env,
                               tensor_parallel_size=config.tp[i], max_model_len=max_len)
            for i in range(2)]


WARM_UP_REPEATS = 30
"""Sentences in a warm-up prompt: ~300 tokens (more than two 128-token blocks)."""


def warm_up_prompts(n: int) -> list[str]:
    """One prompt per instance, longer than two blocks, like no document (it never shares a
    first block with a timed request)."""
    return [f"Warm-up {i}: " + "the quick brown fox jumps over the lazy dog. " * WARM_UP_REPEATS
            for i in range(n)]


def warm_up_plan(n: int, cross: bool) -> list[tuple[int, int]]:
    """(prompt, instance) in the order sent: instance i computes prompt i, then (``cross``)
    the next instance asks it too."""
    out = []
    for i in range(n):
        out.append((i, i))
        if cross and n > 1:
            out.append((i, (i + 1) % n))
    return out


def warm_up(insts: list[Instance], cross: bool, settle_s: float) -> int:
    """Untimed requests before the workload; returns how many were sent.

    NOTE (issue 11): an instance's first requests pay vLLM's first forward passes (measured,
    CPU, eager: a TP 2 instance's first request 2.4 s, later ones 0.3 s for the same work).
    Without a warm-up that lands on whichever row the instance serves first: instance 1's
    first request is the first document's remote hit, so the remote-hit row took the warm-up
    and the local-hit row (instance 0, warm by then) did not. ``cross`` also asks each
    prompt on the other instance (a remote hit with the connector: its data-plane
    connections and peer slab maps are made here, as in a running cluster)."""
    prompts = warm_up_prompts(len(insts))
    for p, i in warm_up_plan(len(insts), cross):
        time.sleep(settle_s)  # the computing instance publishes its chunks
        complete(insts[i].url, prompts[p], max_tokens=2)
    return len(warm_up_plan(len(insts), cross))


def run_config(name: str, requests: list[Request], model: Path, workdir: Path,
               settle_s: float, progress, max_len: int = 4096,
               warm: bool = True) -> tuple[list[Record], dict]:
    with LocalCluster(workdir / name, model) as cluster:
        tiers: dict[int, vllm_p2p.TierAddress] = {}
        insts = start_instances(cluster, name, tiers, max_len)
        try:
            wait_healthy(insts, timeout_s=600)
        except RuntimeError:
            if not tiers:
                raise
            dead = next(i for i in insts if not i.proc.alive())
            raise vllm_p2p.NotRunnable(vllm_p2p.start_failure(dead.proc.log)) from None
        # NOTE: vLLM's P2P tier pulls only from a source each request names: no cross asks
        warmed = warm_up(insts, cross=not tiers, settle_s=settle_s) if warm else 0
        base, base_rank = _counters(cluster, name)  # the warm-up's pulls are not the run's
        progress(0)
        records = []
        t0 = time.monotonic()
        for n, req in enumerate(requests):
            time.sleep(settle_s)  # each request starts on an idle machine (see demo.py)
            # vLLM's P2P tier pulls only from the peer the request names: the other instance
            extra = ({"kv_transfer_params": vllm_p2p.source_params(
                tiers[1 - req.instance], f"{name}-{n}")} if tiers and req.step else None)
            c = complete(insts[req.instance].url, list(req.prompt), extra_body=extra)
            records.append(Record(name, req.workload, req.group, req.step, req.length,
                                  req.instance, c.ttft_s, c.total_s))
            progress(1)
        wall = time.monotonic() - t0 - settle_s * len(requests)
        counters, per_rank = _counters(cluster, name)
        counters.update({k: counters[k] - base.get(k, 0) for k in PULL_COUNTERS
                         if k in counters})
        per_rank = {k: v - base_rank.get(k, 0) for k, v in per_rank.items()}
    extra = {"busy_s": wall, "tp": CONFIGS[name].tp, "warm_up_requests": warmed, **counters}
    if per_rank:
        extra["bytes_pulled_by_rank"] = per_rank
    return records, extra


PULL_COUNTERS = ("loads", "chunks_pulled", "bytes_pulled", "chunks_missing", "chunks_failed")
"""Counters the warm-up's pulls are taken off (the others are the instances' totals)."""


def _counters(cluster: LocalCluster, name: str) -> tuple[dict[str, int], dict[str, int]]:
    """The connector's counters summed over the instances, and (TP configs) each registered
    worker rank's bytes pulled; empty without a connector."""
    if not CONFIGS[name].connector:
        return {}, {}
    stats = cluster.stats() if CONFIGS[name].tp != (1, 1) else None
    return cluster.counter_totals(), {i.instance: i.counters.get("bytes_pulled", 0)
                                      for i in (stats.instances if stats else ())}


def kind(r) -> str:
    """first: the document/conversation is new; other: it was last computed on the other
    instance (a remote hit for p2pkv); same: it was computed on this instance before."""
    if r.step == 0:
        return "first"
    if r.workload == "chat":
        return "other"
    return "other" if r.step == 1 else "same"


def summarize(records: list[Record], extra: dict) -> dict:
    rows = {}
    tp = extra.get("tp", (1, 1))
    for r in records:
        at = f"@tp{tp[r.instance]}" if tp[0] != tp[1] else ""
        rows.setdefault(f"{r.workload}/{r.length if r.workload == 'qa' else 'all'}/{kind(r)}"
                        f"{at}", []).append(r.ttft_s)
    return {
        "requests": len(records),
        "ttft_p50_s": pct([r.ttft_s for r in records], 0.5),
        "ttft_p90_s": pct([r.ttft_s for r in records], 0.9),
        "latency_p50_s": pct([r.total_s for r in records], 0.5),
        "throughput_req_s": len(records) / max(extra.get("busy_s", 0.0), 1e-9),
        "samples_by_row": {k: len(v) for k, v in sorted(rows.items())},
        "ttft_p50_by_row_s": {k: pct(v, 0.5) for k, v in sorted(rows.items())},
        "ttft_p90_by_row_s": {k: pct(v, 0.9) for k, v in sorted(rows.items())},
        **{k: extra[k] for k in ("warm_up_requests", "bytes_pulled", "chunks_pulled",
                                 "chunks_failed", "bytes_pulled_by_rank") if k in extra},
    }


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default="1000,3000",
                        help="document lengths in tokens, comma-separated (above the "
                             "bundled document's ~3,560 tokens it is repeated in other "
                             "orders; at most the model's positions minus 128: 8,064 for "
                             "the demo model)")
    parser.add_argument("--docs", type=int, default=1)
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--users", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3,
                        help="run the workload this many times with new documents and "
                             "conversations (samples per row)")
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory (default: the demo model, SmolLM2-135M)")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help="comma-separated; the lmcache ones run only where LMCache is "
                             "installed")
    parser.add_argument("--overhead-samples", type=int, default=6,
                        help="documents for the overhead table (cold miss and local hit "
                             "with and without a connector, interleaved); a multiple of the "
                             "setups (2 or 3) gives each setup each place in the order "
                             "equally; 0: no overhead table")
    parser.add_argument("--only-overhead", action="store_true",
                        help="run only the overhead table (no --configs)")
    parser.add_argument("--overhead-setups", default=",".join(overhead.DEFAULT_SETUPS),
                        help="setups of the overhead table (plain vllm always; lmcache only "
                             "where installed; vllm-control: a second plain vLLM instance, "
                             "the A/A control of what identical instances differ by)")
    parser.add_argument("--settle-s", type=float, default=1.5)
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                        help="time each instance's first requests too (by default each "
                             "instance first answers untimed warm-up prompts)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/ttft.json"))
    parser.add_argument("--workdir", type=Path, default=Path(".p2pkv-run/bench-ttft"))


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from p2pkv.harness.demo_model import prepare

    model = args.model or prepare()
    tok = AutoTokenizer.from_pretrained(str(model))

    def tokenize(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    lengths = [int(x) for x in args.lengths.split(",")]
    try:
        max_len = max_model_len(max(lengths), model_positions(model))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    # NOTE: a margin above the longest prompt, so that every document's rotation differs
    tokens = document_tokens(model, at_least=max(lengths) + 1024)
    requests = (qa_requests(tokens, lengths,
                            args.docs * args.repeats, args.questions, tokenize)
                + chat_requests(tokens, args.users * args.repeats, args.rounds, tokenize))
    configs = [] if args.only_overhead else [c for c in args.configs.split(",") if c]
    if args.only_overhead and args.overhead_samples <= 0:
        raise SystemExit("--only-overhead needs --overhead-samples of at least 1")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    if not lmcache.installed():
        skipped = [c for c in configs if CONFIGS[c].lmcache]
        configs = [c for c in configs if not CONFIGS[c].lmcache]
        if skipped:
            print(f"lmcache: not installed; {', '.join(skipped)} skipped")
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "argv": sys.argv[1:],
                     "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()[0],
                     "repeats": args.repeats, "requests_per_config": len(requests),
                     "configs": {}, "records": []}
    setups = overhead.setups_available([s for s in args.overhead_setups.split(",") if s])
    samples = max(0, args.overhead_samples)
    total = len(requests) * len(configs) + samples * len(setups) * len(overhead.KINDS)
    with tqdm(total=total, desc="requests", unit="req") as bar:
        for name in configs:
            bar.set_postfix_str(f"{name}: starting instances")
            def progress(n: int, name: str = name) -> None:
                bar.set_postfix_str(f"{name}: running")
                bar.update(n)

            try:
                records, extra = run_config(name, requests, model, args.workdir,
                                            args.settle_s, progress, max_len, args.warm_up)
            except vllm_p2p.NotRunnable as e:
                results.setdefault("not_run", {})[name] = str(e)
                print(f"{name}: not run: {e}", flush=True)
                continue
            results["configs"][name] = summarize(records, extra)
            results["records"] += [asdict(r) for r in records]
            _write(results, args.out)  # a run stopped later keeps the configs done so far
        if samples:
            bar.set_postfix_str("overhead: starting instances")
            results["overhead"] = run_overhead(
                tokens, max(lengths), samples, tokenize, model, args.workdir, args.settle_s,
                bar.update, setups, max_len)
    _report(results, args.out)
    return 0


def placement() -> str:
    """What every instance of the run gets (the harness sets it for all alike)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"VLLM_CPU_NUM_OF_RESERVED_CPU={reserved_cpus()} on {cpus} CPUs"


def run_overhead(tokens: list[int], length: int, samples: int, tokenize, model: Path,
                 workdir: Path, settle_s: float, progress,
                 setups: list[str] | tuple[str, ...] = overhead.DEFAULT_SETUPS,
                 max_len: int = 4096) -> dict:
    """The overhead table's samples: new documents of ``length`` tokens, two questions each.
    Records the host's load average before the instances start, when the first sample is in
    and at the end (other jobs on the host spread the samples)."""
    reqs = qa_requests(tokens, [length], samples, 2, tokenize)
    pairs = [overhead.DocumentPair(a.prompt, b.prompt) for a, b in zip(reqs[0::2], reqs[1::2])]
    load = os.getloadavg()[0]
    loads: list[float] = []

    def first_progress(n: int) -> None:
        if not loads:
            loads.append(os.getloadavg()[0])  # the instances are up: the first sample is in
        progress(n)

    with LocalCluster(workdir / "overhead", model) as cluster:
        measured = overhead.run(pairs, cluster, settle_s, first_progress, setups, max_len)
        counters = cluster.counter_totals()
    return {"length": length, "placement": placement(), "load_avg_at_start": load,
            "load_avg_measuring": [loads[0] if loads else load, os.getloadavg()[0]],
            **overhead.summarize(measured), "p2pkv_counters": counters,
            "samples": [asdict(m) for m in measured]}


def goals(configs: dict) -> dict:
    """Issue 6's goals at the longest document length, from the p50 rows: p2pkv's remote hit
    against its own local hit, a cold prefill (plain vLLM asked the same question), and each
    LMCache mode's remote hit."""
    ratios = remote_over_local(configs)
    # NOTE: a run of other p2pkv configurations alone (the TP ones) still has their ratios
    partial = {"remote_over_local_by_length": ratios} if ratios else {}
    p = configs.get("p2pkv", {}).get("ttft_p50_by_row_s", {})
    longest = max((int(r.split("/")[1]) for r in p if r.startswith("qa/")), default=None)
    if longest is None:
        return partial
    other, same = p.get(f"qa/{longest}/other"), p.get(f"qa/{longest}/same")
    if other is None or same is None:
        return partial  # fewer than three questions per document
    out: dict = {"length": longest, "p2pkv_remote_s": other,
                 "remote_over_local_hit": other / same}
    if "plain" in configs:
        cold = configs["plain"]["ttft_p50_by_row_s"][f"qa/{longest}/other"]
        out["cold_over_remote"] = cold / other
    for name, c in configs.items():
        remote = c["ttft_p50_by_row_s"].get(f"qa/{longest}/other")  # none: rows at two TPs
        if name != "p2pkv" and name.startswith(("lmcache", "p2pkv")) and remote is not None:
            out[f"{name}_remote_s"] = remote
    out["remote_over_local_by_length"] = ratios
    return out


def remote_over_local(configs: dict) -> dict[str, dict[int | str, float]]:
    """Issue 14's goal (<= 1.05x): per p2pkv configuration and document length, the p50 remote
    hit over the p50 local hit of the same instances in the same run."""
    out: dict[str, dict[int | str, float]] = {}
    for name, c in configs.items():
        if not name.startswith("p2pkv"):
            continue
        p = c["ttft_p50_by_row_s"]
        for row, other in p.items():
            parts = row.split("/")
            # NOTE: heterogeneous TP rows name the instance's TP ("other@tp1"): a remote hit
            # is compared with the local hit of an instance at the same TP
            kind, at, tp = parts[2].partition("@") if parts[0] == "qa" else ("", "", "")
            if kind == "other" and (same := p.get(f"qa/{parts[1]}/same{at}{tp}")):
                key = int(parts[1]) if not at else f"{parts[1]}@{tp}"
                out.setdefault(name, {})[key] = other / same
    return out


def _write(results: dict, out: Path) -> None:
    results["goals"] = goals(results["configs"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


def _report(results: dict, out: Path) -> None:
    configs = results["configs"]
    _write(results, out)
    if not configs:
        _report_overhead(results, out)
        return
    names = list(configs)
    legend = ("(first = new prefix, other = last computed on the other instance, "
              "same = on this one; n = samples per row)")
    if configs:
        columns = [Column("row", 20, align="<"), Column("n", 4),
                   *(Column(n, max(13, len(n) + 2), ".3f") for n in names)]
        # NOTE: configs may have rows of their own (the TP ones split rows by the instance's
        # TP): every row any config has, nan where a config has none.
        rows = sorted({row for c in configs.values() for row in c["samples_by_row"]})
        samples = {row: next(c["samples_by_row"][row] for c in configs.values()
                             if row in c["samples_by_row"]) for row in rows}
        for key, title in (("ttft_p50_by_row_s",
                            f"TTFT p50 (s) by workload/length/kind {legend}"),
                           ("ttft_p90_by_row_s", "TTFT p90 (s)")):
            print(title)
            print(table(columns, ([row, samples[row],
                                   *(configs[n][key].get(row, float("nan")) for n in names)]
                                  for row in rows), sep=""))
        totals = (("all: TTFT p50", "ttft_p50_s", 1), ("all: TTFT p90", "ttft_p90_s", 1),
                  ("all: latency p50", "latency_p50_s", 1),
                  ("throughput req/s", "throughput_req_s", 1),
                  ("MB pulled", "bytes_pulled", 1e-6))
        print(table(columns, ([label, "", *(configs[n].get(key, 0) * scale for n in names)]
                              for label, key, scale in totals), sep="", header=False))
    g = results["goals"]
    if "length" in g:
        print(f"goals at {g['length']} tokens: p2pkv remote hit {g['p2pkv_remote_s']:.3f} s = "
              f"{g['remote_over_local_hit']:.2f}x its local hit (goal <= 1.3x)"
              + (f", {g['cold_over_remote']:.1f}x faster than a cold prefill (goal >= 30x)"
                 if "cold_over_remote" in g else ""))
    for name, by_length in g.get("remote_over_local_by_length", {}).items():
        print(f"  {name} remote hit / local hit: " + ", ".join(
            f"{ratio:.2f}x at {n}" for n, ratio in sorted(
                by_length.items(), key=lambda kv: (len(str(kv[0])), str(kv[0]))))
            + " (goal <= 1.05x, issue 14; <= 1.1x at TP, issue 11)")
    if "length" in g:
        for name in names:
            if name != "p2pkv" and f"{name}_remote_s" in g:
                print(f"  {name} remote hit {g[f'{name}_remote_s']:.3f} s "
                      f"({g[f'{name}_remote_s'] / g['p2pkv_remote_s']:.1f}x p2pkv's)")
    for name, why in results.get("not_run", {}).items():
        print(f"{name}: not run: {why}")
    _report_overhead(results, out)
    plot_lines(out.with_suffix(".png"), _remote_hit_series(results),
               xlabel="document length (tokens)",
               ylabel="TTFT p50, question on the other instance (s)",
               title="Long-document QA on 2 vLLM CPU instances", log_y=True)


def _report_overhead(results: dict, out: Path) -> None:
    o = results.get("overhead")
    if o:
        load = o.get("load_avg_measuring")
        print("\n".join(overhead.render(o, o["placement"], tuple(load) if load else None)))
        c = o.get("p2pkv_counters", {})
        if "save_copy_ms" in c:
            print(f"  p2pkv's save thread: {c.get('chunks_saved', 0)} chunks copied in "
                  f"{c['save_copy_ms']} ms ({c.get('save_copy_in_forward_ms', 0)} ms of it "
                  f"during a forward pass), {c.get('save_fence_waits', 0)} steps waited for it "
                  f"({c.get('save_fence_wait_ms', 0)} ms); {c.get('save_prefaulted', 0)} "
                  f"store slots faulted in ahead while idle ({c.get('save_prefault_ms', 0)} ms)")
    print(f"wrote {out}")


def _remote_hit_series(results: dict) -> dict[str, tuple[list[int], list[float]]]:
    """Per configuration: document lengths and the median TTFT of the second question."""
    series = {}
    for name in results["configs"]:
        rows = [r for r in results["records"] if r["config"] == name and r["workload"] == "qa"
                and r["step"] == 1]
        lengths = sorted({r["length"] for r in rows})
        series[name] = (lengths, [median(r["ttft_s"] for r in rows if r["length"] == n)
                                  for n in lengths])
    return series
