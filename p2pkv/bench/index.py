"""Directory index micro-bench: RSS per indexed chunk and handler time per message at cluster size.

``p2pkv bench index [--namespaces 3] [--members 1000] [--chunks 1500000]``. In one process,
without sockets: a ``DirectoryServer``'s handler (decode, index, encode: what its one thread
does per message) gets ``--members`` registrations in each of ``--namespaces`` namespaces
(the trace bench's shape: one namespace of 1,000 instances per p2pkv policy), then Publishes
of prefix chains (``--chain`` keys each, as a prompt's chunks are) whose holders are a random
``k`` of the namespace's members, ``k`` drawn from ``--holders``. Reported: RSS growth per
distinct chunk, holdings (chunk, holder pairs) per chunk, then the handler's time per Lookup
(random chains, random leading lengths, interleaved with one Heartbeat per member per
"second" and Publishes as in the trace replay) as p50/p99/max, and what dropping a member
costs (its Unregister and the turns after it). Compare two versions of the index by running
the same command on each.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

from p2pkv.bench.report import pct
from p2pkv.directory import protocol
from p2pkv.directory.protocol import Heartbeat, Lookup, Publish, Register, Unregister
from p2pkv.directory.server import DirectoryServer, ServerConfig
from p2pkv.keys import ChunkKey, InstanceId, Namespace


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespaces", type=int, default=3)
    parser.add_argument("--members", type=int, default=1000, help="registrations per namespace")
    parser.add_argument("--chunks", type=int, default=1_500_000, help="distinct chunks in all")
    parser.add_argument("--chain", type=int, default=80, help="keys per published prefix")
    parser.add_argument("--holders", default="1,1,1,1,2,2,3,4,8",
                        help="holders per chain, drawn uniformly from this list")
    parser.add_argument("--lookups", type=int, default=20_000)
    parser.add_argument("--heartbeats-per-lookup", type=int, default=30,
                        help="the trace replay at 10x: ~30 heartbeats per lookup")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(args: argparse.Namespace) -> int:
    logging.getLogger("p2pkv.directory").setLevel(logging.WARNING)  # a line per Register
    rng = random.Random(args.seed)
    holders = [int(h) for h in args.holders.split(",")]
    server = DirectoryServer(ServerConfig(max_registrations_per_connection=10**9))
    handle = server._handle  # noqa: SLF001 - the handler path without sockets
    epoch = time.time_ns()
    spaces = [Namespace(f"bench-{n}") for n in range(args.namespaces)]
    members = [[InstanceId(f"n{n}-{i}") for i in range(args.members)] for n in range(len(spaces))]
    seqs: dict[InstanceId, int] = {}
    try:
        for ns, ids in zip(spaces, members):
            for inst in ids:
                handle(protocol.encode(Register(instance=inst, epoch=epoch, namespace=ns,
                                                address=f"{inst}:1")))
                seqs[inst] = 0
        rss0 = _rss()
        chains: list[tuple[int, bytes]] = []
        per_ns = args.chunks // len(spaces)
        holdings = 0
        t0 = time.perf_counter()
        for n, (ns, ids) in enumerate(zip(spaces, members)):
            for c in range(per_ns // args.chain):
                seed = rng.randbytes(16)
                keys = [ChunkKey(seed + j.to_bytes(16, "little")) for j in range(args.chain)]
                chains.append((n, seed))
                for inst in rng.sample(ids, rng.choice(holders)):
                    seqs[inst] += 1
                    holdings += len(keys)
                    handle(protocol.encode(Publish(instance=inst, namespace=ns, added=keys,
                                                   removed=[], seq=seqs[inst], epoch=epoch)))
        publish_s = time.perf_counter() - t0
        chunks = server.index.num_chunks
        rss1 = _rss()
        result: dict[str, object] = {
            "namespaces": len(spaces), "members_per_namespace": args.members,
            "chunks": chunks, "holdings_per_chunk": round(holdings / max(1, chunks), 2),
            "rss_bytes_per_chunk": round((rss1 - rss0) / max(1, chunks), 1),
            "publish_keys_per_s": round(holdings / publish_s)}
        _say(args, f"{chunks:,} chunks ({result['holdings_per_chunk']} holders each) in "
                   f"{len(spaces)} namespaces of {args.members} members: RSS "
                   f"+{(rss1 - rss0) / 1e6:.0f} MB = {result['rss_bytes_per_chunk']} B/chunk; "
                   f"publishes {result['publish_keys_per_s']:,} holdings/s")

        lookup_us: list[float] = []
        other_us: list[float] = []
        beat = 0
        flat = [(ns, inst) for ns, ids in zip(spaces, members) for inst in ids]
        for _ in range(args.lookups):
            for _ in range(args.heartbeats_per_lookup):
                ns, inst = flat[beat % len(flat)]
                beat += 1
                msg = protocol.encode(Heartbeat(instance=inst, epoch=epoch, seq=seqs[inst]))
                t = time.perf_counter()
                handle(msg)
                other_us.append((time.perf_counter() - t) * 1e6)
            n, seed = chains[rng.randrange(len(chains))]
            width = rng.randint(1, args.chain)
            keys = [ChunkKey(seed + j.to_bytes(16, "little")) for j in range(width)]
            keys += [ChunkKey(rng.randbytes(32)) for _ in range(rng.randint(0, 40))]
            msg = protocol.encode(Lookup(namespace=spaces[n], keys=keys))
            t = time.perf_counter()
            handle(msg)
            lookup_us.append((time.perf_counter() - t) * 1e6)
            server._send_snapshot_part()  # noqa: SLF001 - the loop's other steps
            sweep = getattr(server, "_sweep", None)
            if sweep is not None:
                sweep()
        result["lookup_us"] = {"p50": round(pct(lookup_us, 0.5), 1),
                               "p99": round(pct(lookup_us, 0.99), 1),
                               "max": round(max(lookup_us), 1)}
        result["heartbeat_us"] = {"p50": round(pct(other_us, 0.5), 1),
                                  "p99": round(pct(other_us, 0.99), 1)}
        _say(args, f"handler per Lookup: {result['lookup_us']} us; per Heartbeat "
                   f"{result['heartbeat_us']} us")

        victim = members[0][0]
        msg = protocol.encode(Unregister(instance=victim, epoch=epoch))
        t = time.perf_counter()
        handle(msg)
        drop_ms = (time.perf_counter() - t) * 1e3
        turns: list[float] = []
        sweep = getattr(server, "_sweep", None)
        while sweep is not None and server.index.sweeping:
            t = time.perf_counter()
            sweep()
            turns.append((time.perf_counter() - t) * 1e3)
        result["drop"] = {"unregister_ms": round(drop_ms, 2), "sweep_turns": len(turns),
                          "sweep_turn_max_ms": round(max(turns, default=0.0), 2)}
        _say(args, f"dropping a member: {result['drop']}")
    finally:
        server.close()
    if args.json:
        print(json.dumps(result))
    return 0


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, file=sys.stderr, flush=True)
