"""Cluster-scale replay of a production trace against the real directory (no vLLM).

``p2pkv bench trace [--trace F] [--instances 1000] [--speedup 10] [--sweep 10,100,1000]``.
The trace's requests are replayed in time order, sped up, through the policies side by
side (``sim/policies.py``; p2pkv variants are named by their mechanisms, ``sim/options.py``,
and each reports where it lost reusable tokens, ``sim/losses.py``), each on its own simulated cluster of ``--instances`` instances
whose KV capacity, prefill speed and links come from ``--profile``
(``planner/profiles.py``). The two p2pkv policies register every simulated instance with a
real directory process (leases, publishes, lookups, change feed: real traffic, from one
worker process each). ``--shards S --replica`` puts the directory on S shards with a replica
each (``directory/ring.py``); ``--kill-shard-after T`` kills shard s0's primary T seconds into
the replay and restarts it ``--restart-after`` later. Output: a table, ``--out
DIR/trace.json`` and ``DIR/trace.png`` (share of prompt tokens served from cache and TTFT
against cluster size, with ``--sweep``; ``--merge A/trace.json,B/trace.json --out DIR``
joins sweeps run as separate commands, ``bench/trace/sweep.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from p2pkv.bench.report import Column, pct
from p2pkv.bench.trace import probe as probe_mod
from p2pkv.bench.report import table as table_text
from p2pkv.bench.trace.sweep import MergeError, load_reports, merge, plot, sweep_point
from p2pkv.directory.client import DirectoryClient
from p2pkv.directory.protocol import LOOKUP_BUCKETS_S, Stats, StatsReply
from p2pkv.planner.profiles import PROFILES
from p2pkv.sim.cluster import ClusterSpec
from p2pkv.sim.policies import NAMES, uses_directory
from p2pkv.directory.ring import ShardId
from p2pkv.sim.processes import DirectoryProcess, run_workers
from p2pkv.sim.policies import P2pkv, SimPolicy
from p2pkv.sim.replay import ReplayConfig
from p2pkv.sim.sharded_fleet import ShardEndpoints

DEFAULT_TRACE = Path("../shared/traces/mooncake_conversation.jsonl")

PROBE_RATE = 100.0
"""Lookups/s of the latency probe (the replay's own clients ask ~110/s at 10x)."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE,
                        help=f"Mooncake-format JSONL (default {DEFAULT_TRACE})")
    parser.add_argument("--limit", type=int, default=None, help="first N requests only")
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="llama3.1-8b-h100")
    parser.add_argument("--speedup", type=float, default=10.0,
                        help="trace seconds per wall second (0: as fast as possible)")
    parser.add_argument("--policies", default=",".join(NAMES))
    parser.add_argument("--keys-per-block", type=int, default=4,
                        help="chunk keys per 512-token trace block (128-token chunks: 4)")
    parser.add_argument("--max-holders", type=int, default=1,
                        help="holders one request pulls from (the connector: 1)")
    parser.add_argument("--slow-fraction", type=float, default=0.1,
                        help="share of instances with a slow link")
    parser.add_argument("--slow-factor", type=float, default=0.05,
                        help="their bandwidth relative to the profile's")
    parser.add_argument("--no-host-tier", action="store_true",
                        help="no host store for round-robin and kv-aware (vLLM alone)")
    parser.add_argument("--sweep", default="",
                        help="also replay at these cluster sizes for the plot, e.g. 10,30,100,300")
    parser.add_argument("--sweep-speedup", type=float, default=0.0)
    parser.add_argument("--shards", type=int, default=1,
                        help="directory shards (consistent hashing of keys; 1: one directory)")
    parser.add_argument("--replica", action="store_true",
                        help="a replica process per shard (publishes to both, lookups fail over)")
    parser.add_argument("--kill-shard-after", type=float, default=None, metavar="SECONDS",
                        help="kill shard s0's primary this long into the replay")
    parser.add_argument("--restart-after", type=float, default=5.0, metavar="SECONDS",
                        help="restart it (same endpoints) this long after the kill")
    parser.add_argument("--probe-rate", type=float, default=PROBE_RATE,
                        help="Lookups/s of the latency probe, a light client process that "
                             "measures the directory's lookup round trip under the replay "
                             "(0: none)")
    parser.add_argument("--probe-sched", choices=probe_mod.SCHED_MODES, default="normal",
                        help="scheduling of the directory processes and the probe while it "
                             "measures: normal; realtime (SCHED_FIFO, needs CAP_SYS_NICE: no "
                             "waiting for a core behind other jobs); alternate: both, in "
                             f"{probe_mod.PHASE_S:g} s phases, reported side by side")
    parser.add_argument("--lookups-in-arrival-order", action="store_true",
                        help="the directories handle every message in the order read (before "
                             "issue 15's change), not Lookups first")
    parser.add_argument("--worker-nice", type=int, default=10,
                        help="niceness added to the replay's worker processes, so that on a "
                             "machine with few cores the simulated clients, not the directory "
                             "and the probe, wait for the CPU")
    parser.add_argument("--merge", default="", metavar="JSON,JSON",
                        help="replay nothing: merge these trace.json files (sweep points run "
                             "as separate commands) into one sweep in --out")
    parser.add_argument("--out", type=Path, default=None, help="write trace.json, trace.png")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _start_directories(args: argparse.Namespace) -> tuple[dict[str, DirectoryProcess],
                                                         tuple[ShardEndpoints, ...]]:
    """role -> process ("directory", or "s0/primary", "s0/replica", ...), and the shards."""
    order = args.lookups_in_arrival_order
    if args.shards == 1 and not args.replica:
        return {"directory": DirectoryProcess.start(in_arrival_order=order)}, ()
    procs: dict[str, DirectoryProcess] = {}
    shards = []
    for i in range(args.shards):
        ends = []
        for role in ("primary", "replica") if args.replica else ("primary",):
            d = DirectoryProcess.start(in_arrival_order=order)
            d.feed = d.feed_endpoint()
            procs[f"s{i}/{role}"] = d
            ends.append(d.endpoint)
        shards.append(ShardEndpoints(ShardId(f"s{i}"), ends[0], ends[1] if len(ends) > 1 else None))
    return procs, tuple(shards)


def run_once(args: argparse.Namespace, instances: int, speedup: float) -> dict:
    """One replay at one cluster size with fresh directories; results plus the directories'
    load as measured while the workers ran (and the kill/restart of a shard, if asked)."""
    spec = ClusterSpec(instances, PROFILES[args.profile], slow_fraction=args.slow_fraction,
                       slow_factor=args.slow_factor)
    procs, shards = _start_directories(args)
    events: list[dict] = []
    final: dict = {}
    try:
        base = {role: (d.rss_bytes()[0], d.cpu_s()) for role, d in procs.items()}
        config = ReplayConfig(spec, tuple(p for p in args.policies.split(",") if p),
                              speedup=speedup,
                              endpoint=None if shards else procs["directory"].endpoint,
                              shards=shards,
                              keys_per_block=args.keys_per_block, max_holders=args.max_holders,
                              local_host_tier=not args.no_host_tier,
                              worker_nice=args.worker_nice)
        clock: dict = {}
        probe = _start_probe(args, config, procs, shards, speedup)

        def monitor() -> None:
            if probe is not None:
                probe[1].set()  # go
            now = clock.setdefault("t0", time.monotonic())
            elapsed = time.monotonic() - now
            victim = "s0/primary"
            if (args.kill_shard_after is not None and victim in procs
                    and "killed" not in clock and elapsed >= args.kill_shard_after):
                procs[victim].kill()
                clock["killed"] = elapsed
                events.append({"event": "killed", "role": victim, "at_s": round(elapsed, 2)})
            if ("killed" in clock and "restarted" not in clock
                    and elapsed >= clock["killed"] + args.restart_after):
                procs[victim] = procs[victim].restarted()
                clock["restarted"] = elapsed
                events.append({"event": "restarted", "role": victim, "at_s": round(elapsed, 2)})
            if "restarted" in clock and "resynced" not in clock:
                chunks = {r: _stats(d) for r, d in procs.items() if r.startswith("s0/")}
                got = [c.chunks for c in chunks.values() if c is not None]
                if len(got) == 2 and got[0] == got[1]:
                    clock["resynced"] = elapsed
                    events.append({"event": "resynced", "role": victim, "at_s": round(elapsed, 2),
                                   "after_restart_s": round(elapsed - clock["restarted"], 2)})

        def at_end() -> None:
            if probe is not None:
                probe[2].set()  # stop
            for role, d in procs.items():
                final[role] = (_stats(d), d.rss_bytes(), d.cpu_s())

        load0 = os.getloadavg()[0]
        run = run_workers(config, str(args.trace), args.limit, summarize, monitor=monitor,
                          at_end=at_end)
        probed = probe_mod.result(probe)
    finally:
        if probe is not None and probe[0].is_alive():
            probe[0].kill()
        for d in procs.values():
            d.stop()
    run["directory"] = _directory_report(run, final, base)
    run["directory"]["events"] = events
    run["directory"]["probe"] = probed
    run["instances"] = instances
    run["speedup"] = speedup
    run["shards"] = len(shards) or 1
    run["worker_nice"] = args.worker_nice
    run["lookups_first"] = not args.lookups_in_arrival_order
    run["load_avg_1m"] = {"start": load0, "end": os.getloadavg()[0]}
    return run


def summarize(policy: SimPolicy, duration_s: float) -> dict:
    """One policy's result as plain data (for JSON and the table)."""
    t = policy.cluster.tally
    insts = policy.cluster.instances
    per_inst = [inst.requests for inst in insts]
    busy = [inst.busy_s / duration_s for inst in insts] if duration_s > 0 else [0.0]
    out = {
        "policy": policy.name, "instances": len(insts), "requests": t.requests,
        "prompt_tokens": t.prompt_tokens, "reusable_tokens": t.reusable_tokens,
        "local_tokens": t.local_tokens, "host_tokens": t.host_tokens,
        "pulled_tokens": t.pulled_tokens, "recomputed_tokens": t.recomputed_tokens,
        "saved_tokens": t.saved_tokens,
        "saved_share": round(t.saved_tokens / max(1, t.prompt_tokens), 4),
        "reuse_captured": round(t.saved_tokens / max(1, t.reusable_tokens), 4),
        "ttft_s": {"p50": pct(t.ttfts, 0.5), "p90": pct(t.ttfts, 0.9),
                   "p99": pct(t.ttfts, 0.99),
                   "mean": statistics.fmean(t.ttfts) if t.ttfts else float("nan")},
        "decisions": dict(t.decisions),
        "saved_share_by_window": [round(saved / max(1, prompt), 4) for _, (prompt, saved)
                                  in sorted(t.windows.items())],
        "load": {"requests_per_instance_max": max(per_inst),
                 "requests_per_instance_mean": round(statistics.fmean(per_inst), 2),
                 "requests_per_instance_p99": pct(per_inst, 0.99),
                 "busy_share_max": round(max(busy), 4),
                 "busy_share_mean": round(statistics.fmean(busy), 4)},
    }
    if isinstance(policy, P2pkv):
        out["losses"] = policy.losses.as_dict()
        s = policy.fleet.stats
        rtts = s.lookup_rtts
        out["directory_client"] = {
            "messages_sent": s.sent, "bytes_sent": s.sent_bytes,
            "messages_received": s.received, "bytes_received": s.received_bytes,
            "by_kind": dict(s.by_kind), "errors": dict(s.errors),
            "lookups": len(rtts), "lookups_failed": s.lookups_failed,
            "lookup_rtt_ms": {"p50": pct(rtts, 0.5) * 1e3, "p99": pct(rtts, 0.99) * 1e3,
                              "max": max(rtts, default=float("nan")) * 1e3},
            "registrations": s.registrations, "snapshots": s.snapshots, "heartbeats": s.beats,
            "feed_events": policy.feed.events, "pulls_missing": policy.pull_failed,
            "failovers": getattr(policy.fleet, "failovers", 0)}
    return out


def _start_probe(args: argparse.Namespace, config: ReplayConfig,
                 procs: dict[str, DirectoryProcess], shards: tuple[ShardEndpoints, ...],
                 speedup: float):
    """The latency probe process (``probe.py``), or None."""
    names = [p for p in config.policies if uses_directory(p)]
    if args.probe_rate <= 0 or not names:
        return None
    ends = (tuple((str(s.shard), s.primary, s.replica) for s in shards) if shards
            else (("s0", procs["directory"].endpoint, None),))
    return probe_mod.start(probe_mod.ProbeConfig(
        ends, f"trace-{names[0]}", str(args.trace), args.limit, args.keys_per_block,
        args.probe_rate, speedup, sched=args.probe_sched,
        directory_pids=tuple(d.proc.pid for d in procs.values())))


def _stats(d: DirectoryProcess) -> StatsReply | None:
    client = DirectoryClient(d.endpoint)
    try:
        reply = client.call(Stats(), 5)
    finally:
        client.close()
    return reply if isinstance(reply, StatsReply) else None


def _directory_report(run: dict, final: dict, base: dict) -> dict:
    wall = run["wall_s"]
    named = [(r["policy"], r["directory_client"]) for r in run["results"]
             if "directory_client" in r]
    clients = [c for _, c in named]
    sent = sum(c["messages_sent"] for c in clients)
    recv = sum(c["messages_received"] for c in clients)
    nbytes = sum(c["bytes_sent"] + c["bytes_received"] for c in clients)
    processes = []
    for role, (stats, (rss, hwm), cpu) in final.items():
        rss0, cpu0 = base.get(role, (0, 0.0))
        entry = {"role": role, "rss_bytes": rss, "peak_rss_bytes": hwm,
                 "cpu_share": round((cpu - cpu0) / wall, 3)}
        if stats is not None:
            holdings = sum(i.chunks for i in stats.instances)
            entry.update(chunks=stats.chunks, instances=len(stats.instances),
                         holdings=holdings,
                         holdings_per_chunk=(round(holdings / stats.chunks, 2)
                                             if stats.chunks else None),
                         lookups=stats.lookups, keys_looked_up=stats.keys_looked_up,
                         publishes=stats.publishes, heartbeats=stats.heartbeats,
                         expirations=stats.expirations,
                         key_lookups_per_s=round(stats.keys_looked_up / wall),
                         lookup_handling_ms={q: _bucket_pct(stats.lookup_buckets, p)
                                             for q, p in (("p50", 0.5), ("p99", 0.99))},
                         rss_bytes_per_chunk=(round((rss - rss0) / stats.chunks, 1)
                                              if stats.chunks else None))
        processes.append(entry)
    first = processes[0] if processes else {}
    return {"messages_per_s": round((sent + recv) / wall, 1),
            "bytes_per_s": round(nbytes / wall), "requests_per_s": round(sent / wall, 1),
            "lookups_per_s": round(sum(c["lookups"] for c in clients) / wall, 1),
            "lookups_failed": sum(c["lookups_failed"] for c in clients),
            "failovers": sum(c.get("failovers", 0) for c in clients),
            "lookup_rtt_ms": {name: c["lookup_rtt_ms"] for name, c in named},
            "processes": processes,
            # the single directory's (or first shard primary's) figures, for the table
            "rss_bytes": first.get("rss_bytes", 0), "chunks": first.get("chunks"),
            "rss_bytes_per_chunk": first.get("rss_bytes_per_chunk"),
            "holdings_per_chunk": first.get("holdings_per_chunk"),
            "key_lookups_per_s": first.get("key_lookups_per_s", 0),
            "cpu_share": first.get("cpu_share", 0.0)}


def main(args: argparse.Namespace) -> int:
    if args.shards < 1 or (args.kill_shard_after is not None and not args.replica):
        print("--shards must be >= 1; --kill-shard-after needs --replica", file=sys.stderr)
        return 2
    if args.merge:
        return _merge_main(args)
    if not args.trace.exists():
        print(f"trace {args.trace} not found (--trace)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    headline = run_once(args, args.instances, args.speedup)
    report = {"trace": str(args.trace), "limit": args.limit, "profile": args.profile,
              "profile_sources": dict(PROFILES[args.profile].sources),
              "host_cpus": os.cpu_count(), "keys_per_block": args.keys_per_block,
              "max_holders": args.max_holders, "slow_fraction": args.slow_fraction,
              "local_host_tier": not args.no_host_tier, "shards": args.shards,
              "replica": args.replica,
              "slow_factor": args.slow_factor, "run": headline, "sweep": []}
    _say(args, table(headline))
    sizes = sorted({int(s) for s in args.sweep.split(",") if s.strip()})
    for n in sizes:
        point = headline if n == args.instances else run_once(args, n, args.sweep_speedup)
        report["sweep"].append(sweep_point(point))
        _say(args, f"sweep: {n} instances in {point['wall_s']:.1f} s")
    report["total_wall_s"] = time.monotonic() - t0
    _write(args, report)
    return 0


def _merge_main(args: argparse.Namespace) -> int:
    if args.out is None:
        print("--merge needs --out", file=sys.stderr)
        return 2
    paths = [Path(p) for p in args.merge.split(",") if p.strip()]
    try:
        report = merge(load_reports(paths), [str(p) for p in paths])
    except (OSError, MergeError, json.JSONDecodeError, KeyError) as e:
        print(f"--merge: {e}", file=sys.stderr)
        return 2
    _say(args, table(report["run"]))
    for point in report["sweep"]:
        _say(args, f"sweep: {point['instances']} instances in {point['wall_s']:.1f} s "
                   f"(speedup {point.get('speedup')})")
    _write(args, report)
    return 0


def _write(args: argparse.Namespace, report: dict) -> None:
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "trace.json").write_text(json.dumps(report, indent=1, default=_nan_none))
        if report["sweep"]:
            plotted = plot(report, args.out / "trace.png")
            _say(args, f"wrote {args.out / 'trace.json'}"
                       + (f", {args.out / 'trace.png'}" if plotted else " (no matplotlib: no plot)"))
    if args.json:
        print(json.dumps(report, default=_nan_none))


_POLICY_COLUMNS = (
    Column("policy", 18, align="<"), Column("saved", 6, ".1%"), Column("of reuse", 8, ".1%"),
    Column("local Mtok", 10, ".2f"), Column("pulled", 7, ".2f"), Column("recomp", 7, ".2f"),
    Column("TTFT p50", 8, ".3f"), Column("p90", 6, ".2f"), Column("p99", 6, ".2f"),
    Column("max req/inst", 12), Column("max busy", 8, ".1%"))


def table(run: dict) -> str:
    """The per-policy table and the directory's lines."""
    rows = [(r["policy"], r["saved_share"], r["reuse_captured"], r["local_tokens"] / 1e6,
             r["pulled_tokens"] / 1e6, r["recomputed_tokens"] / 1e6, r["ttft_s"]["p50"],
             r["ttft_s"]["p90"], r["ttft_s"]["p99"], r["load"]["requests_per_instance_max"],
             r["load"]["busy_share_max"]) for r in run["results"]]
    lines = [f"{run['instances']} instances, speedup {run['speedup']:g}: replay took "
             f"{run['wall_s']:.1f} s (load avg {run['load_avg_1m']['start']:.1f} -> "
             f"{run['load_avg_1m']['end']:.1f})", table_text(_POLICY_COLUMNS, rows)]
    for r in run["results"]:
        if "losses" in r:
            reusable = max(1, r["reusable_tokens"])
            lost = ", ".join(f"{k} {v / reusable:.1%}" for k, v in r["losses"]["tokens"].items()
                             if v)
            lines.append(f"  {r['policy']}: reusable tokens not served: {lost or 'none'}")
    d = run["directory"]
    rtt = "; ".join(f"{k} p50 {v['p50']:.2f} p99 {v['p99']:.2f} ms"
                    for k, v in d["lookup_rtt_ms"].items())
    lines.append(f"directory ({run['shards']} shard(s), {len(d['processes'])} process(es)): "
                 f"{d['messages_per_s']:.0f} msg/s, {d['bytes_per_s'] / 1e6:.2f} MB/s, "
                 f"{d['lookups_failed']} lookups failed, {d['failovers']} failovers; "
                 f"lookup RTT {rtt}")
    lines.append(table_text(
        (Column("process", 13, align="<"), Column("key lookups/s", 13, ".0f"),
         Column("RSS MB", 7, ".0f"), Column("B/chunk", 8), Column("chunks", 9),
         Column("holders/chunk", 13), Column("CPU", 5, ".0%"), Column("expired", 7),
         Column("lookup handling p50/p99 ms", 27)),
        [(p["role"], p.get("key_lookups_per_s", 0), p["rss_bytes"] / 1e6,
          str(p.get("rss_bytes_per_chunk")), str(p.get("chunks")),
          str(p.get("holdings_per_chunk")), p["cpu_share"], p.get("expirations", 0),
          "{p50} / {p99}".format(**p.get("lookup_handling_ms", {"p50": None, "p99": None})))
         for p in d["processes"]]))
    probe = d.get("probe")
    if probe:
        lines.extend(probe_mod.describe(probe, run.get("worker_nice", 0)))
    for e in d.get("events", []):
        lines.append(f"  {e}")
    return "\n".join(lines)


def _bucket_pct(buckets: list[int], p: float) -> float | None:
    """The ``p`` quantile of a ``StatsReply.lookup_buckets`` histogram as its bucket's upper
    bound in ms (inf: above the last bound; None: no lookups)."""
    total = sum(buckets)
    if not total:
        return None
    seen = 0
    for bound, n in zip((*LOOKUP_BUCKETS_S, float("inf")), buckets):
        seen += n
        if seen >= p * total:
            return bound * 1e3
    return float("inf")


def _nan_none(value):
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, file=sys.stderr, flush=True)
