"""LMCache's server in a local cluster, the comparison in ``p2pkv bench ttft`` (never a p2pkv
dependency).

LMCache 0.5.6's multiprocess server with vLLM's ``LMCacheMPConnector`` is the LMCache mode that
runs on a CPU (MEASURED.md, "Running LMCache on this CPU"): one ``lmcache server`` process holds
the KV every instance stores, and every instance loads from it, over ZMQ/TCP (``tcp``) or, on one
host, through shared memory the server maps (``shm``, LMCache's ``lmcache_driven`` mode).

:func:`start_server` starts that server inside a :class:`~p2pkv.harness.cluster.LocalCluster`
(loopback, free ports, logged, stopped with the cluster) and returns the instance arguments.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from p2pkv.harness.cluster import LocalCluster, free_port

MODES = ("tcp", "shm")
ENV = {"LMCACHE_TRACK_USAGE": "false"}
"""Environment for the server and for vLLM instances that load LMCache's connector."""


def installed() -> bool:
    return importlib.util.find_spec("lmcache") is not None


@dataclass(frozen=True, slots=True)
class LMCacheServer:
    port: int
    mode: str

    def kv_transfer_config(self) -> str:
        extra: dict[str, object] = {"lmcache.mp.host": "tcp://127.0.0.1",
                                    "lmcache.mp.port": self.port}
        if self.mode == "shm":
            extra["lmcache.mp.mp_transfer_mode"] = "lmcache_driven"
        return json.dumps({"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                           "kv_connector_extra_config": extra})

    def vllm_args(self) -> list[str]:
        return ["--kv-transfer-config", self.kv_transfer_config()]


def _command() -> list[str]:
    exe = Path(sys.executable).with_name("lmcache")
    return [str(exe)] if exe.exists() else [shutil.which("lmcache") or "lmcache"]


def start_server(cluster: LocalCluster, mode: str, *, chunk_tokens: int = 128,
                 l1_gib: float = 4.0, timeout_s: float = 90.0) -> LMCacheServer:
    """Start ``lmcache server`` on loopback and wait until its HTTP API answers.

    ``chunk_tokens=128`` is LMCache's fastest setting measured here (one vLLM CPU block);
    ``--supported-transfer-mode auto`` is required on a CPU (without it vLLM hangs for 300 s in
    ``register_kv_caches``)."""
    if mode not in MODES:
        raise ValueError(f"LMCache mode must be one of {MODES}, not {mode!r}")
    port, http_port = free_port(), free_port()
    proc = cluster.start_process("lmcache-server", [
        *_command(), "server", "--host", "127.0.0.1", "--port", str(port),
        "--chunk-size", str(chunk_tokens), "--l1-size-gb", str(l1_gib),
        "--eviction-policy", "LRU", "--supported-transfer-mode", "auto",
        "--http-host", "127.0.0.1", "--http-port", str(http_port),
        "--disable-metrics", "--max-workers", "1"], ENV)
    deadline = time.monotonic() + timeout_s
    while True:
        if not proc.alive():
            raise RuntimeError(f"lmcache server exited during start-up:\n{proc.tail()}")
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/", timeout=2.0).status_code == 200:
                return LMCacheServer(port, mode)
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"lmcache server not ready after {timeout_s:.0f} s:\n"
                               f"{proc.tail()}")
        time.sleep(0.5)
