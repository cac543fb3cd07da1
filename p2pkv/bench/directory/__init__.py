"""Directory benchmark: publishes/s, key-lookups/s, lookup round trips, RSS per chunk.

``p2pkv bench directory [--chunks 1000000] [--instances 8]``. The directory runs as its own
process on loopback (so its RSS is its own); 8 instances publish 1M distinct 32-byte keys in
batches; one load *process* pipelines 64-key Lookups for throughput; then 16 client
*processes* (each with its own DirectoryClient) send 1,000 Lookups/s in total, paced, and
measure round trips. Goals (issue 3): ≥ 200k key-lookups/s, p99 ≤ 1 ms at 1k req/s,
≤ 200 B RSS per indexed chunk. ``--shards 1,2,4``: key lookups/s per shard and in total over
real shard processes, instead (``bench/directory/shards.py``, issue 15). ``--heartbeats
2000``: what heartbeats of that many simulated instances cost, single against batched
(``bench/directory/heartbeats.py``, issue 15).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from p2pkv.bench.directory.steps import _keys, _say, _stats, _until
from p2pkv.bench.report import pct
from p2pkv.directory import protocol
from p2pkv.directory.client import DirectoryClient, RegState, Registration
from p2pkv.directory.protocol import Lookup
from p2pkv.keys import InstanceId, Namespace

NS = Namespace("bench")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1000, help="keys per Publish")
    parser.add_argument("--lookup-keys", type=int, default=64, help="keys per Lookup")
    parser.add_argument("--throughput-s", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rate", type=float, default=1000.0, help="total Lookups/s")
    parser.add_argument("--latency-s", type=float, default=10.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--shards", default="",
                        help="e.g. 1,2,4: key lookups/s per shard and in total for each shard "
                             "count, with real shard processes (bench/directory/shards.py; "
                             "uses --chunks, --instances, --batch, --lookup-keys, "
                             "--throughput-s)")
    parser.add_argument("--offered", default="", metavar="RATES",
                        help="with --shards: after the as-fast-as-answered load, load every "
                             "shard at each of these fixed Lookups/s (e.g. 250,1000,4000): "
                             "the rate each shard sustains, its latency and CPU per key lookup")
    parser.add_argument("--heartbeats", default="",
                        help="e.g. 2000,8000: what heartbeats of that many simulated instances "
                             "(one Fleet) cost the directory, single Heartbeat messages and "
                             "batched Heartbeats side by side (bench/directory/heartbeats.py; "
                             "uses --throughput-s)")
    parser.add_argument("--heartbeat-interval-s", type=float, default=0.25,
                        help="with --heartbeats: the directory's heartbeat interval")
    parser.add_argument("--heartbeat-rounds", type=int, default=2,
                        help="with --heartbeats: rounds of each mode, alternating")


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _throughput(endpoint: str, instances: int, per: int, width: int, seconds: float,
                out: mp.Queue) -> None:
    """Pipelined Lookups (64 in flight) of leading runs of published keys; keys/s."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    pools = [_keys(i, min(per, 20_000)) for i in range(instances)]
    rng = random.Random(99)
    msgs = []
    for rid in range(2000):
        pool = pools[rid % instances]
        start = rng.randrange(0, len(pool) - width)
        msgs.append(protocol.encode(Lookup(namespace=NS, keys=pool[start:start + width],
                                           rid=rid + 1)))
    inflight = 0
    done = 0
    hit = 0
    i = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        now = time.perf_counter()
        while inflight < 64 and now < end:
            sock.send(msgs[i % len(msgs)])
            i += 1
            inflight += 1
        if inflight == 0:
            break
        if sock.poll(1000):
            reply = protocol.decode(sock.recv())
            hit += reply.holders[0].run if getattr(reply, "holders", None) else 0
            inflight -= 1
            done += 1
    elapsed = time.perf_counter() - t0
    out.put({"lookups": done, "keys": done * width, "seconds": elapsed, "keys_hit": hit})
    sock.close()
    ctx.term()


def _latency_client(endpoint: str, rate: float, seconds: float, width: int, seed: int,
                    start_at: float, out: mp.Queue) -> None:
    client = DirectoryClient(endpoint)
    client.wait_connected(5)
    pool = _keys(seed % 8, 5000)
    rng = random.Random(seed)
    interval = 1.0 / rate
    next_t = start_at + rng.random() * interval
    rtts: list[float] = []
    misses = 0
    while time.time() < next_t:
        time.sleep(min(0.05, next_t - time.time()))
    end = start_at + seconds
    while next_t < end:
        delay = next_t - time.time()
        if delay > 0:
            time.sleep(delay)
        s = rng.randrange(0, len(pool) - width)
        t0 = time.perf_counter()
        rid = client.start_lookup(NS, pool[s:s + width], timeout_s=1.0)
        reply = client.wait_lookup(rid, 1.0)
        rtts.append(time.perf_counter() - t0)
        misses += reply is None
        next_t += interval
    client.close()
    out.put({"rtts": rtts, "failed": misses})


def _handler_only(width: int, seconds: float = 2.0) -> dict[str, float]:
    """The server's decode + index + encode path in-process, without sockets: what the
    directory's one thread can do when the CPU is not shared with the load generators."""
    from p2pkv.directory.protocol import Publish, Register
    from p2pkv.directory.server import DirectoryServer, ServerConfig

    server = DirectoryServer(ServerConfig())
    try:
        keys = _keys(0, 100_000)
        server._handle(protocol.encode(Register(instance=InstanceId("a"), epoch=1,  # noqa: SLF001
                                                namespace=NS, address="h:1")))
        server._handle(protocol.encode(Publish(instance=InstanceId("a"), namespace=NS,  # noqa: SLF001
                                               added=keys, removed=[], seq=1, epoch=1)))
        msgs = [protocol.encode(Lookup(namespace=NS, keys=keys[i:i + width], rid=i + 1))
                for i in range(0, 50_000, width)]
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for m in msgs:
                server._handle(m)  # noqa: SLF001
            n += len(msgs)
        elapsed = time.perf_counter() - t0
    finally:
        server.close()
    return {"us_per_lookup": round(elapsed / n * 1e6, 1),
            "key_lookups_per_s": round(n * width / elapsed)}


def main(args: argparse.Namespace) -> int:
    if args.heartbeats:
        from p2pkv.bench.directory import heartbeats as directory_heartbeats

        args.heartbeats = directory_heartbeats.parse_sizes(args.heartbeats)
        return directory_heartbeats.main(args)
    if args.shards:
        from p2pkv.bench.directory import shards as directory_shards

        args.shards = directory_shards.parse_shards(args.shards)
        args.offered = directory_shards.parse_rates(args.offered)
        return directory_shards.main(args)
    per = args.chunks // args.instances
    workdir = Path(tempfile.mkdtemp(prefix="p2pkv-bench-dir-"))
    ready = workdir / "ready"
    proc = subprocess.Popen([sys.executable, "-m", "p2pkv.directory", "--bind",
                             "tcp://127.0.0.1:0", "--ready-file", str(ready),
                             "--heartbeat-interval", "1", "--liveness", "600",
                             "--log-level", "WARNING"])
    result: dict[str, object] = {"host_cpus": os.cpu_count(),
                                 "load_avg_at_start": os.getloadavg()[0]}
    clients: list[DirectoryClient] = []
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("directory did not start")
            time.sleep(0.05)
        endpoint = ready.read_text().strip()
        admin = DirectoryClient(endpoint)
        clients.append(admin)
        _say(args, f"directory {endpoint} (pid {proc.pid}); generating {args.chunks:,} keys")
        keysets = [_keys(i, per) for i in range(args.instances)]
        for i in range(args.instances):
            c = DirectoryClient(endpoint)
            c.register(Registration(InstanceId(f"inst{i}"), 1, NS, f"127.0.0.1:{9000 + i}"),
                       wait_connected_s=5)
            clients.append(c)
        _until(lambda: all(c.state is RegState.REGISTERED for c in clients[1:]), 10)
        _stats(admin)
        rss0 = _rss_bytes(proc.pid)

        t0 = time.perf_counter()
        for c, keys in zip(clients[1:], keysets):
            for s in range(0, per, args.batch):
                c.publish(keys[s:s + args.batch])
        _until(lambda: _stats(admin).chunks >= per * args.instances, 120, step=0.05)
        pub_s = time.perf_counter() - t0
        messages = args.instances * -(-per // args.batch)
        result["publish"] = {"keys": per * args.instances, "messages": messages,
                             "seconds": round(pub_s, 3),
                             "keys_per_s": round(per * args.instances / pub_s),
                             "publishes_per_s": round(messages / pub_s)}
        del keysets
        rss1 = _rss_bytes(proc.pid)
        chunks = _stats(admin).chunks
        result["rss"] = {"before_bytes": rss0, "after_bytes": rss1, "chunks": chunks,
                         "bytes_per_chunk": round((rss1 - rss0) / chunks, 1)}
        _say(args, f"published {chunks:,} chunks in {pub_s:.2f} s; "
                   f"RSS +{(rss1 - rss0) / 1e6:.0f} MB = {(rss1 - rss0) / chunks:.0f} B/chunk")

        q: mp.Queue = mp.Queue()
        p = mp.Process(target=_throughput, args=(endpoint, args.instances, per,
                                                 args.lookup_keys, args.throughput_s, q))
        p.start()
        tp = q.get(timeout=args.throughput_s + 60)
        p.join()
        result["lookup_throughput"] = {
            "keys_per_lookup": args.lookup_keys, "lookups_per_s": round(tp["lookups"] / tp["seconds"]),
            "key_lookups_per_s": round(tp["keys"] / tp["seconds"]),
            "hit_ratio": round(tp["keys_hit"] / max(1, tp["keys"]), 3)}
        _say(args, f"lookups: {tp['keys'] / tp['seconds']:,.0f} keys/s "
                   f"({tp['lookups'] / tp['seconds']:,.0f} lookups/s of {args.lookup_keys} keys)")

        result["handler_only"] = _handler_only(args.lookup_keys)
        _say(args, f"handler only (no sockets): {result['handler_only']}")

        start_at = time.time() + 2.0
        procs = [mp.Process(target=_latency_client,
                            args=(endpoint, args.rate / args.clients, args.latency_s, 8, i,
                                  start_at, q)) for i in range(args.clients)]
        for p in procs:
            p.start()
        parts = [q.get(timeout=args.latency_s + 60) for _ in procs]
        for p in procs:
            p.join()
        rtts = [r for part in parts for r in part["rtts"]]
        result["latency"] = {
            "clients": args.clients, "kind": "processes", "target_rate": args.rate,
            "achieved_rate": round(len(rtts) / args.latency_s),
            "p50_ms": round(pct(rtts, 0.50) * 1000, 3), "p99_ms": round(pct(rtts, 0.99) * 1000, 3),
            "max_ms": round(max(rtts) * 1000, 3), "failed": sum(p["failed"] for p in parts)}
        lat = result["latency"]
        _say(args, f"round trip at {lat['achieved_rate']} req/s from {args.clients} processes: "
                   f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms")
        result["goals"] = {
            "key_lookups_per_s>=200k (over sockets)":
                result["lookup_throughput"]["key_lookups_per_s"] >= 200_000,
            "p99<=1ms": lat["p99_ms"] <= 1.0,
            "bytes_per_chunk<=200": result["rss"]["bytes_per_chunk"] <= 200}
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.wait(10)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0
