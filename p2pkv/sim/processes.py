"""Processes of a trace replay: real directory servers, and worker processes that each
replay the trace through a group of policies.

Used by ``p2pkv bench trace`` and its tests. Policies that talk to the directory run one
per worker (each worker is one fleet of registrations, its own sockets and its own core's
worth of Python); the others share a worker. Workers start together: each reports ready
once its fleet is registered and its feed synced, then all wait for one go.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

from p2pkv.sim.replay import ReplayConfig, make_policies, replay, reusable_blocks
from p2pkv.sim.trace import load_trace

WORKER_TIMEOUT_S = 3600.0


@dataclass
class DirectoryProcess:
    """``python -m p2pkv.directory`` on loopback, port 0."""

    proc: subprocess.Popen
    endpoint: str
    heartbeat_s: float = 1.0
    liveness: int = 5
    feed: str = ""
    in_arrival_order: bool = False

    @classmethod
    def start(cls, *, heartbeat_s: float = 1.0, liveness: int = 5, timeout_s: float = 30.0,
              bind: str = "tcp://127.0.0.1:0", feed_bind: str = "",
              in_arrival_order: bool = False) -> DirectoryProcess:
        """``bind``/``feed_bind``: a restarted shard takes its old addresses again.
        ``in_arrival_order``: ``--lookups-in-arrival-order`` (for comparison)."""
        ready = Path(tempfile.mkdtemp(prefix="p2pkv-trace-")) / "ready"
        extra = ["--feed-bind", feed_bind] if feed_bind else []
        if in_arrival_order:
            extra.append("--lookups-in-arrival-order")
        proc = subprocess.Popen([sys.executable, "-m", "p2pkv.directory", "--bind",
                                 bind, *extra, "--ready-file", str(ready),
                                 "--heartbeat-interval", str(heartbeat_s), "--liveness",
                                 str(liveness), "--log-level", "ERROR",
                                 # one Fleet registers all its instances on one socket
                                 "--max-registrations-per-connection", "1000000"])
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("directory did not start")
            time.sleep(0.02)
        return cls(proc, ready.read_text().strip(), heartbeat_s, liveness,
                   in_arrival_order=in_arrival_order)

    def feed_endpoint(self) -> str:
        from p2pkv.directory.client import DirectoryClient
        from p2pkv.directory.protocol import Stats, StatsReply

        client = DirectoryClient(self.endpoint)
        try:
            reply = client.call(Stats(), 10)
        finally:
            client.close()
        if not isinstance(reply, StatsReply):
            raise RuntimeError(f"directory {self.endpoint} did not answer Stats")
        return reply.feed_endpoint

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def restarted(self) -> DirectoryProcess:
        """A new process on the same endpoints (after :meth:`kill`)."""
        return DirectoryProcess.start(heartbeat_s=self.heartbeat_s, liveness=self.liveness,
                                      bind=self.endpoint, feed_bind=self.feed,
                                      in_arrival_order=self.in_arrival_order)

    def rss_bytes(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the process."""
        rss = hwm = 0
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
        except OSError:
            pass
        return rss, hwm

    def cpu_s(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def group_policies(policies: tuple[str, ...]) -> list[tuple[str, ...]]:
    """One group per directory policy, one for all the rest."""
    from p2pkv.sim.policies import uses_directory

    local = tuple(p for p in policies if not uses_directory(p))
    groups = [(p,) for p in policies if uses_directory(p)]
    return ([local] if local else []) + groups


def _worker(config: ReplayConfig, trace_path: str, limit: int | None, summarize,
            ready: mp.Queue, go: mp.Event, release: mp.Event, out: mp.Queue) -> None:
    try:
        if config.worker_nice:
            os.nice(config.worker_nice)
        trace = load_trace(Path(trace_path), limit=limit)
        reusable = reusable_blocks(trace)
        policies = make_policies(config)
        try:
            for p in policies:
                start = getattr(p, "start", None)
                if start is not None:
                    start(config.start_timeout_s)
            ready.put(("ready", config.policies))
            if not go.wait(WORKER_TIMEOUT_S):
                raise RuntimeError("no go from the bench")
            run = replay(trace, policies, config.speedup, reusable)
            duration = trace[-1].arrival_s if trace else 0.0
            out.put(("done", config.policies, {
                "wall_s": run.wall_s, "max_lag_s": run.max_lag_s,
                "results": [summarize(p, duration) for p in policies]}))
            # NOTE: registrations stay (and heartbeat) until the bench has read the
            # directory's final state.
            while not release.wait(0.05):
                for p in policies:
                    p.service(0.0)
        finally:
            for p in policies:
                p.close()
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the bench
        message = traceback.format_exc()
        ready.put(("error", message))
        out.put(("error", config.policies, message))


def run_workers(config: ReplayConfig, trace_path: str, limit: int | None, summarize,
                monitor=None, monitor_every_s: float = 0.25, at_end=None) -> dict:
    """Replay in one worker per policy group; returns {"wall_s", "workers": [...],
    "results": [...]} once all are done. ``summarize(policy, duration_s) -> dict`` (a
    module-level function: it is sent to the workers) makes each policy's result;
    ``monitor()`` is called while they run, ``at_end()`` after they finished and before they
    unregister."""
    ctx = mp.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    go, release = ctx.Event(), ctx.Event()
    groups = group_policies(config.policies)
    procs = [ctx.Process(target=_worker, args=(replace(config, policies=g), trace_path, limit,
                                               summarize, ready, go, release, out), daemon=True)
             for g in groups]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            kind, *rest = ready.get(timeout=config.start_timeout_s + 120)
            if kind == "error":
                raise RuntimeError(f"trace worker failed to start:\n{rest[0]}")
        t0 = time.monotonic()
        go.set()
        done: list[dict] = []
        while len(done) < len(procs):
            try:
                kind, group, payload = out.get(timeout=monitor_every_s)
            except Exception:  # noqa: BLE001 - queue.Empty: nothing yet
                if monitor is not None:
                    monitor()
                if not any(p.is_alive() for p in procs) and out.empty():
                    raise RuntimeError("trace workers exited without results") from None
                continue
            if kind == "error":
                raise RuntimeError(f"trace worker {group} failed:\n{payload}")
            done.append({"policies": list(group), **payload})
        wall = time.monotonic() - t0
        if at_end is not None:
            at_end()
    finally:
        release.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    order = {name: i for i, name in enumerate(config.policies)}
    results = sorted((r for w in done for r in w["results"]), key=lambda r: order[r["policy"]])
    return {"wall_s": wall,
            "workers": [{k: w[k] for k in ("policies", "wall_s", "max_lag_s")} for w in done],
            "results": results}
