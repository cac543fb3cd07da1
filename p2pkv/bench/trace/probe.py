"""The latency probe of ``p2pkv bench trace``: the directory's lookup round trip under the
replay, measured from a light client process that is not the load generator.

Started by ``bench/trace/__init__.py`` (``start`` / ``result``). The probe paces Lookups of
requests the replay has already reached (their keys are published by then) through the
client the connector uses (``shards.connect``), at normal priority while the replay's workers
run niced.

On a host with few cores shared with other jobs, a round trip also measures how long the
directory's and the probe's threads (each process has a ZeroMQ I/O thread too: six wake-ups
per round trip) wait for a core. ``--probe-sched alternate`` separates the two in one run:
the probe switches every :data:`PHASE_S` between ``normal`` (every thread of the directory
processes and of the probe at the default policy) and ``realtime`` (all of them
``SCHED_FIFO``, so that none waits for a core behind a CFS task: what is left is the
directory's own work, its queue and the loopback path). Both modes see the same replay and
the same machine, interleaved; the machine's load (1-min load average and the kernel's CPU
pressure, "some avg10") is sampled at every phase and reported per mode. A shard process restarted under
``--kill-shard-after`` is a new pid and stays at the default policy.
"""

from __future__ import annotations

import bisect
import multiprocessing as mp
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from p2pkv.bench.report import pct
from p2pkv.directory.protocol import MAX_KEYS_PER_MESSAGE, LookupReply
from p2pkv.directory.ring import ShardId
from p2pkv.directory.shards import ShardSpec, connect
from p2pkv.keys import Namespace
from p2pkv.sim.directory_view import BlockKeys
from p2pkv.sim.processes import WORKER_TIMEOUT_S
from p2pkv.sim.trace import load_trace

SCHED_MODES = ("normal", "realtime", "alternate")
PHASE_S = 5.0
"""Length of one phase of ``alternate`` (the trace's load changes slowly against it)."""
REALTIME_PRIORITY = 1
"""The lowest SCHED_FIFO priority: above every CFS task, below the kernel's own RT threads."""
LOOKUP_WAIT_S = 0.5
RESULT_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    """What the probe process needs (sent to it by value)."""

    ends: tuple[tuple[str, str, str | None], ...]
    """(shard, primary, replica) endpoints."""
    namespace: str
    trace_path: str
    limit: int | None
    keys_per_block: int
    rate: float
    speedup: float
    sched: str = "normal"
    directory_pids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.sched not in SCHED_MODES:
            raise ValueError(f"sched must be one of {SCHED_MODES}, not {self.sched!r}")
        if self.rate <= 0:
            raise ValueError("rate must be positive")


def set_realtime(pid: int, on: bool) -> bool:
    """Every thread of ``pid`` to SCHED_FIFO (``on``) or back to SCHED_OTHER. False if not
    permitted (no CAP_SYS_NICE) or the process is gone; threads that ended meanwhile are
    skipped."""
    policy, prio = ((os.SCHED_FIFO, REALTIME_PRIORITY) if on else (os.SCHED_OTHER, 0))
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return False
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(prio))
        except ProcessLookupError:
            continue
        except PermissionError:
            return False
    return True


def machine_load() -> tuple[float, float | None]:
    """(1-min load average, CPU pressure "some avg10" in % or None where not offered)."""
    load = os.getloadavg()[0]
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
        return load, float(some[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return load, None


def start(config: ProbeConfig):
    """The probe process, started and waiting: (process, go event, stop event, results)."""
    ctx = mp.get_context("spawn")
    go, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_probe, daemon=True, args=(config, go, stop, out))
    proc.start()
    return proc, go, stop, out


def result(probe) -> dict | None:
    """The probe's report, once it has been stopped (None if it died)."""
    if probe is None:
        return None
    try:
        got = probe[3].get(timeout=RESULT_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - queue.Empty: the probe died
        return None
    probe[0].join(10)
    return summarize(got)


def summarize(got: dict) -> dict:
    """Raw samples -> the report: overall and per scheduling mode."""
    samples = got["samples"]
    by_mode = {}
    for mode in ("normal", "realtime"):
        rtts = [rtt for m, rtt in samples if m == mode]
        loads = [(lo, pr) for m, lo, pr in got["loads"] if m == mode]
        if not rtts and not loads:
            continue
        pressures = [pr for _, pr in loads if pr is not None]
        by_mode[mode] = {
            "lookups": len(rtts),
            "failed": sum(1 for m in got["failed"] if m == mode),
            "rtt_ms": _quantiles_ms(rtts),
            "load_avg_1m": _mean(lo for lo, _ in loads),
            "cpu_pressure_some_pct": _mean(pressures) if pressures else None}
    rtts = [rtt for _, rtt in samples]
    return {"rate": got["rate"], "namespace": got["namespace"], "sched": got["sched"],
            "realtime_refused": got["realtime_refused"], "lookups": len(rtts),
            "failed": len(got["failed"]), "rtt_ms": _quantiles_ms(rtts), "by_mode": by_mode}


def describe(probe: dict, worker_nice: int) -> list[str]:
    """The report's lines for the table."""
    lines = [f"latency probe ({probe['rate']:g} Lookups/s in {probe['namespace']}, a process "
             f"of its own; the replay's workers at nice +{worker_nice}; sched "
             f"{probe.get('sched', 'normal')}"
             + (", SCHED_FIFO not permitted here" if probe.get("realtime_refused") else "")
             + ")"]
    for mode, m in probe.get("by_mode", {}).items():
        r = m["rtt_ms"]
        load = (f"load avg {m['load_avg_1m']:.1f}" if m["load_avg_1m"] is not None else "")
        if m.get("cpu_pressure_some_pct") is not None:
            load += f", CPU pressure {m['cpu_pressure_some_pct']:.0f} %"
        who = ("directory + probe at the default policy" if mode == "normal" else
               "directory + probe SCHED_FIFO")
        lines.append(f"  {who}: p50 {r['p50']:.2f} ms, p90 {r['p90']:.2f}, p99 "
                     f"{r['p99']:.2f}, max {r['max']:.1f} ms over {m['lookups']} lookups, "
                     f"{m['failed']} failed ({load})")
    return lines


def _probe(config: ProbeConfig, go, stop, out) -> None:
    trace = load_trace(Path(config.trace_path), limit=config.limit)
    keys = BlockKeys(config.keys_per_block)
    client = connect([ShardSpec(ShardId(n), p, r) for n, p, r in config.ends])
    rng = random.Random(7)
    samples: list[tuple[str, float]] = []
    failed: list[str] = []
    loads: list[tuple[str, float, float | None]] = []
    refused = False
    mode = "realtime" if config.sched == "realtime" else "normal"
    try:
        go.wait(WORKER_TIMEOUT_S)
        t0 = time.monotonic()
        next_t = t0
        next_phase = t0
        phases = 0
        arrivals = [r.arrival_s for r in trace]
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_phase:
                if config.sched == "alternate":
                    mode = "normal" if phases % 2 == 0 else "realtime"
                phases += 1
                if config.sched != "normal" and not refused:
                    refused = not _apply(mode, config.directory_pids)
                    if refused:
                        mode = "normal"
                        _apply(mode, config.directory_pids)
                loads.append((mode, *machine_load()))
                next_phase = now + PHASE_S
            reached = (bisect.bisect_right(arrivals, (now - t0) * config.speedup)
                       if config.speedup > 0 else len(trace))
            req = trace[rng.randrange(max(1, reached))]
            wanted = keys.flat(req.blocks)[:MAX_KEYS_PER_MESSAGE]
            start_t = time.perf_counter()
            rid = client.start_lookup(Namespace(config.namespace), wanted, LOOKUP_WAIT_S)
            got = client.wait_lookup(rid, LOOKUP_WAIT_S)
            if isinstance(got, LookupReply):
                samples.append((mode, time.perf_counter() - start_t))
            else:
                failed.append(mode)
            next_t += 1.0 / config.rate
            time.sleep(max(0.0, next_t - time.monotonic()))
    finally:
        if config.sched != "normal":
            _apply("normal", config.directory_pids)
        client.close()
        out.put({"samples": samples, "failed": failed, "loads": loads, "rate": config.rate,
                 "namespace": config.namespace, "sched": config.sched,
                 "realtime_refused": refused})


def _apply(mode: str, directory_pids: tuple[int, ...]) -> bool:
    on = mode == "realtime"
    ok = set_realtime(os.getpid(), on)
    for pid in directory_pids:
        set_realtime(pid, on)  # a killed shard is gone: nothing to set
    return ok


def _quantiles_ms(rtts: list[float]) -> dict:
    return {"p50": pct(rtts, 0.5) * 1e3, "p90": pct(rtts, 0.9) * 1e3,
            "p99": pct(rtts, 0.99) * 1e3, "max": max(rtts, default=float("nan")) * 1e3}


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None
