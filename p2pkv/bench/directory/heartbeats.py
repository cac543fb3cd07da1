"""What heartbeats cost the directory: single ``Heartbeat`` messages against batched
``Heartbeats`` (issue 15), side by side in one run.

``p2pkv bench directory --heartbeats 2000[,8000] [--heartbeat-interval-s 0.25]
[--throughput-s 5]``: for each fleet size N, rounds alternate single, batched, single,
batched; each round starts a fresh directory process on loopback, registers N simulated
instances from one :class:`~p2pkv.sim.fleet.Fleet` (one socket, as ``p2pkv bench trace``
does) and then only heartbeats for ``--throughput-s``. Per round it prints the directory
process's CPU share of one core, the fleet's own CPU share, messages and bytes sent per
second, heartbeats applied per second (the directory's counter) and lease expirations
(must be 0), with the host's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from p2pkv.bench.directory.steps import _say
from p2pkv.directory.client import DirectoryClient
from p2pkv.directory.protocol import Stats, StatsReply
from p2pkv.keys import InstanceId, Namespace
from p2pkv.sim.fleet import Fleet
from p2pkv.sim.processes import DirectoryProcess

NS = Namespace("bench-heartbeats")
MODES = ("single", "batched")


def parse_sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--heartbeats wants sizes like 2000,8000, not "
                                         f"{text!r}")
    return sizes


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stats(client: DirectoryClient) -> StatsReply:
    reply = client.call(Stats(), 10)
    if not isinstance(reply, StatsReply):
        raise RuntimeError(f"directory did not answer Stats: {reply}")
    return reply


def run_round(size: int, mode: str, interval_s: float, seconds: float) -> dict[str, object]:
    """One fleet of ``size`` heartbeating for ``seconds`` on a fresh directory."""
    directory = DirectoryProcess.start(heartbeat_s=interval_s, liveness=5)
    fleet = Fleet(directory.endpoint, NS, [InstanceId(f"hb-{i}") for i in range(size)],
                  keys_of=lambda i: [], address_of=lambda i: f"10.0.{i >> 8 & 255}.{i & 255}:1",
                  batch_heartbeats=mode == "batched")
    admin = DirectoryClient(directory.endpoint)
    try:
        fleet.start(60)
        warm = time.monotonic() + 2 * interval_s  # every member's first beat is out
        while time.monotonic() < warm:
            fleet.service(0.005)
        before = _stats(admin)
        s0 = (fleet.stats.sent, fleet.stats.sent_bytes, fleet.stats.beats)
        cpu0, own0, t0 = _cpu_s(directory.proc.pid), time.process_time(), time.monotonic()
        while time.monotonic() < t0 + seconds:
            fleet.service(0.005)
        elapsed = time.monotonic() - t0
        cpu1, own1 = _cpu_s(directory.proc.pid), time.process_time()
        after = _stats(admin)
        s = fleet.stats
        return {"instances": size, "mode": mode, "seconds": round(elapsed, 2),
                "directory_cpu_share": round((cpu1 - cpu0) / elapsed, 4),
                "fleet_cpu_share": round((own1 - own0) / elapsed, 4),
                "messages_per_s": round((s.sent - s0[0]) / elapsed, 1),
                "bytes_per_s": round((s.sent_bytes - s0[1]) / elapsed),
                "beats_sent_per_s": round((s.beats - s0[2]) / elapsed, 1),
                "heartbeats_applied_per_s": round((after.heartbeats - before.heartbeats)
                                                  / elapsed, 1),
                "expirations": after.expirations, "registered": len(after.instances),
                "errors": dict(s.errors), "load_avg": round(os.getloadavg()[0], 2)}
    finally:
        fleet.close(unregister=False)
        admin.close()
        directory.kill()


def main(args: argparse.Namespace) -> int:
    rows = []
    for size in args.heartbeats:
        for mode in MODES * args.heartbeat_rounds:
            row = run_round(size, mode, args.heartbeat_interval_s, args.throughput_s)
            rows.append(row)
            _say(args, f"{size:>6} instances {mode:>7}: directory {row['directory_cpu_share']:.1%}"
                       f" of a core, fleet {row['fleet_cpu_share']:.1%}, "
                       f"{row['messages_per_s']:,.0f} msg/s, {row['bytes_per_s']:,} B/s, "
                       f"{row['heartbeats_applied_per_s']:,.0f} beats/s applied, "
                       f"{row['expirations']} expirations (load {row['load_avg']})")
    ok = all(r["expirations"] == 0 and r["registered"] == r["instances"] for r in rows)
    result = {"host_cpus": os.cpu_count(), "heartbeat_interval_s": args.heartbeat_interval_s,
              "rounds": rows}
    if args.json:
        print(json.dumps(result))
    return 0 if ok else 1
