"""Key lookups/s per directory shard, for several shard counts in one run (issue 15).

``p2pkv bench directory --shards 1,2,4 [--chunks N] [--instances I]``: for each S, S real
directory processes on loopback; I instances register with every shard process (as
``ShardedClient`` does) and publish their keys, each key to the shard the ring
(``directory/ring.py``) places it on; then one load process per shard pipelines Lookups of
that shard's part of the instances' prompts (the keys of a run that the ring gives the shard,
in order: what a sharded lookup sends it), all shards at once for ``--throughput-s``. It
prints per shard and in total: Lookups/s, key lookups/s, and the share of one CPU the shard
process used, with the host's load average before and after each S. ``--offered 250,1000``
then loads every shard at each fixed rate (Lookups/s per shard, paced, open loop): the rate
each shard answered, its latency p50/p99 and the shard's CPU per key lookup. Where the
cores bound the as-fast-as-answered total, these say whether a shard keeps a given per-shard
rate as S grows, and what a key lookup costs a shard in CPU (so what one core per shard
would serve).

NOTE: each shard is one single-threaded process, so the total can grow with S only while
the host has a free core per shard *and* per load process. On a host with fewer cores
than 2 x S (this project's runners: 2 cores, shared) the total is bounded by the cores, and
the per-shard figure falls as S grows; the per-shard CPU share says which one limited it.

Run through ``bench/directory`` (``--shards``), whose arguments it uses; it imports
nothing from there (its few helpers are its own), so the two do not import each other.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from p2pkv.bench.directory.steps import _keys, _say, _stats, _until
from p2pkv.directory import protocol
from p2pkv.directory.client import DirectoryClient, RegState, Registration
from p2pkv.directory.protocol import Lookup
from p2pkv.directory.ring import HashRing, ShardId
from p2pkv.keys import InstanceId, Namespace

NS = Namespace("bench")
POOL_KEYS = 20_000
"""Keys per instance the load processes draw their lookups from."""


def parse_shards(text: str) -> list[int]:
    counts = [int(s) for s in text.split(",") if s.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--shards wants counts like 1,2,4, not {text!r}")
    return counts


def parse_rates(text: str) -> list[float]:
    rates = [float(s) for s in text.split(",") if s.strip()]
    if any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"--offered wants positive rates, not {text!r}")
    return rates


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _shard_load(endpoint: str, shards: list[str], shard: str, instances: int, per: int,
                width: int, seconds: float, start_at: float, out: mp.Queue,
                rate: float = 0.0) -> None:
    """Lookups (at most 64 in flight) of this shard's part of the instances' runs: as fast
    as the shard answers (``rate`` 0), or paced at ``rate`` Lookups/s (an open loop: a
    Lookup due while 64 are in flight waits, and counts as late)."""
    ring = HashRing([ShardId(s) for s in shards])
    pools = [[k for k in _keys(i, min(per, POOL_KEYS)) if ring.shard_of(k) == shard]
             for i in range(instances)]
    msgs = []
    for rid in range(2000):
        pool = pools[rid % instances]
        start = (rid * 7919) % max(1, len(pool) - width)
        msgs.append(protocol.encode(Lookup(namespace=NS, keys=pool[start:start + width],
                                           rid=rid + 1)))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    while time.time() < start_at:
        time.sleep(min(0.05, max(0.0, start_at - time.time())))
    done = hit = i = 0
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    started = time.time()  # wall clock: the shards' windows are compared across processes
    t0 = time.perf_counter()
    end = t0 + seconds
    due = t0
    while True:
        now = time.perf_counter()
        while len(sent_at) < 64 and now < end and (rate <= 0 or due <= now):
            sock.send(msgs[i % len(msgs)])
            sent_at[i % len(msgs) + 1] = now
            i += 1
            due += 1.0 / rate if rate > 0 else 0.0
        if not sent_at and now >= end:
            break
        wait_ms = (2000 if rate <= 0 or len(sent_at) >= 64 or now >= end
                   else max(0, int((due - now) * 1000)))
        if not sock.poll(wait_ms):
            if sent_at and (rate <= 0 or now >= end):
                break  # no answer for 2 s
            continue
        reply = protocol.decode(sock.recv())
        sent = sent_at.pop(reply.rid, None)
        if sent is not None:
            latencies.append(time.perf_counter() - sent)
        hit += reply.holders[0].run if getattr(reply, "holders", None) else 0
        done += 1
    elapsed = time.perf_counter() - t0
    sock.close()
    ctx.term()
    latencies.sort()
    out.put({"shard": shard, "lookups": done, "keys": done * width, "seconds": elapsed,
             "keys_hit": hit, "started": started, "ended": started + elapsed,
             "latency_ms": {q: (latencies[min(len(latencies) - 1, int(p * len(latencies)))]
                                * 1e3 if latencies else None)
                            for q, p in (("p50", 0.5), ("p99", 0.99))}})


def _start(workdir: Path, name: str) -> tuple[subprocess.Popen, Path]:
    ready = workdir / f"ready-{name}"
    proc = subprocess.Popen([sys.executable, "-m", "p2pkv.directory", "--bind",
                             "tcp://127.0.0.1:0", "--ready-file", str(ready),
                             "--heartbeat-interval", "1", "--liveness", "600",
                             "--log-level", "WARNING"])
    return proc, ready


def _measure(args: argparse.Namespace, count: int, names: list[str], endpoints: list[str],
             procs: list[subprocess.Popen], chunks: list[int], rate: float) -> dict:
    """One load of every shard at once (``rate`` Lookups/s each, 0: as fast as answered)."""
    per = args.chunks // args.instances
    q: mp.Queue = mp.Queue()
    start_at = time.time() + 3.0 + 0.5 * count  # every load process has built its keys
    loads = [mp.Process(target=_shard_load,
                        args=(endpoints[s], names, names[s], args.instances, per,
                              args.lookup_keys, args.throughput_s, start_at, q, rate))
             for s in range(count)]
    for p in loads:
        p.start()
    while time.time() < start_at:
        time.sleep(0.01)
    load_before = os.getloadavg()
    cpu0 = [_cpu_s(p.pid) for p in procs]
    t0 = time.perf_counter()
    results = {r["shard"]: r for r in (q.get(timeout=args.throughput_s + 120)
                                       for _ in loads)}
    wall = time.perf_counter() - t0
    cpu = [_cpu_s(p.pid) - c for p, c in zip(procs, cpu0)]
    for p in loads:
        p.join(10)
    shards = []
    for s, name in enumerate(names):
        r = results[name]
        shards.append({"shard": name, "chunks": chunks[s],
                       "lookups_per_s": round(r["lookups"] / r["seconds"]),
                       "key_lookups_per_s": round(r["keys"] / r["seconds"]),
                       "hit_ratio": round(r["keys_hit"] / max(1, r["keys"]), 3),
                       "cpu_share": round(cpu[s] / wall, 2),
                       "cpu_us_per_key_lookup": (round(cpu[s] / r["keys"] * 1e6, 3)
                                                 if r["keys"] else None),
                       "latency_ms": r["latency_ms"]})
    # NOTE: the per-shard rates add up to the total only if the load processes ran at
    # the same time; on a loaded host one may start late, so the overlap is reported,
    # and the keys of all shards over the window from the first start to the last end.
    starts = [r["started"] for r in results.values()]
    ends = [r["ended"] for r in results.values()]
    # (never shorter than one shard's own run: wall-clock floats near 1.7e9 s carry
    # ~2e-7 s of rounding, which made one shard's "total" exceed its own rate)
    window = max(max(ends) - min(starts), *(r["seconds"] for r in results.values()))
    return {"shards": count, "offered_lookups_per_s": rate, "per_shard": shards,
            "total_key_lookups_per_s": sum(s["key_lookups_per_s"] for s in shards),
            "total_lookups_per_s": sum(s["lookups_per_s"] for s in shards),
            "window_s": round(window, 3),
            "overlap_s": round(min(ends) - max(starts), 3),
            "key_lookups_per_s_over_window": round(
                sum(r["keys"] for r in results.values()) / window),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()]}


def run_shards(args: argparse.Namespace, count: int) -> dict[str, object]:
    """One shard count: start, load, measure, stop."""
    names = [f"s{i}" for i in range(count)]
    ring = HashRing([ShardId(s) for s in names])
    per = args.chunks // args.instances
    workdir = Path(tempfile.mkdtemp(prefix="p2pkv-bench-shards-"))
    procs = [_start(workdir, n) for n in names]
    clients: list[DirectoryClient] = []
    try:
        deadline = time.monotonic() + 60
        while not all(r.exists() for _, r in procs):
            if any(p.poll() is not None for p, _ in procs) or time.monotonic() > deadline:
                raise RuntimeError("a directory shard did not start")
            time.sleep(0.05)
        endpoints = [r.read_text().strip() for _, r in procs]
        admins = [DirectoryClient(e) for e in endpoints]
        clients += admins
        by_shard: list[list[DirectoryClient]] = [[] for _ in names]
        for i in range(args.instances):
            for s, e in enumerate(endpoints):
                c = DirectoryClient(e)
                c.register(Registration(InstanceId(f"inst{i}"), 1, NS, f"127.0.0.1:{9000 + i}"),
                           wait_connected_s=5)
                clients.append(c)
                by_shard[s].append(c)
        _until(lambda: all(c.state is RegState.REGISTERED for cs in by_shard for c in cs), 30)
        for i in range(args.instances):
            keys = _keys(i, per)
            parts = ring.partition(keys)
            for s, name in enumerate(names):
                mine = [keys[j] for j in parts.get(ShardId(name), [])]
                for b in range(0, len(mine), args.batch):
                    by_shard[s][i].publish(mine[b:b + args.batch])
        _until(lambda: sum(_stats(a).chunks for a in admins) >= per * args.instances, 180,
               step=0.1)
        chunks = [_stats(a).chunks for a in admins]
        run = _measure(args, count, names, endpoints, [p for p, _ in procs], chunks, 0.0)
        run["offered"] = [_measure(args, count, names, endpoints, [p for p, _ in procs],
                                   chunks, rate) for rate in args.offered]
        return run
    finally:
        for c in clients:
            c.close()
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            p.wait(10)


def main(args: argparse.Namespace) -> int:
    runs = []
    for count in args.shards:
        _say(args, f"{count} shard(s): starting, publishing {args.chunks:,} keys")
        run = run_shards(args, count)
        runs.append(run)
        if not args.json:
            for s in run["per_shard"]:
                print(f"S={count} {s['shard']}: {s['key_lookups_per_s']:>10,} key lookups/s "
                      f"({s['lookups_per_s']:,} Lookups/s of {args.lookup_keys} keys, "
                      f"hit {s['hit_ratio']:.0%}), shard process at {s['cpu_share']:.0%} "
                      f"of a CPU", file=sys.stderr, flush=True)
            print(f"S={count} total: {run['total_key_lookups_per_s']:,} key lookups/s "
                  f"({run['key_lookups_per_s_over_window']:,} over the {run['window_s']:.2f} s "
                  f"from the first shard's start to the last one's end; all ran together for "
                  f"{run['overlap_s']:.2f} s); load average {run['load_avg_before']} before, "
                  f"{run['load_avg_after']} after", file=sys.stderr, flush=True)
            for o in run["offered"]:
                for s in o["per_shard"]:
                    lat = s["latency_ms"]
                    print(f"S={count} {s['shard']} offered {o['offered_lookups_per_s']:g} "
                          f"Lookups/s: {s['lookups_per_s']:,} answered/s, latency p50 "
                          f"{_ms(lat['p50'])} p99 {_ms(lat['p99'])} ms, "
                          f"{s['cpu_us_per_key_lookup']} us CPU per key lookup, "
                          f"{s['cpu_share']:.0%} of a CPU", file=sys.stderr, flush=True)
                print(f"S={count} offered {o['offered_lookups_per_s']:g}/s per shard: total "
                      f"{o['total_lookups_per_s']:,} Lookups/s; load average "
                      f"{o['load_avg_before']} before, {o['load_avg_after']} after",
                      file=sys.stderr, flush=True)
    result = {"host_cpus": os.cpu_count(), "chunks": args.chunks, "instances": args.instances,
              "keys_per_lookup": args.lookup_keys, "throughput_s": args.throughput_s,
              "offered": args.offered,
              "runs": runs}
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
