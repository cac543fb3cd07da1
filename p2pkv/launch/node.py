"""Run one node's share of a launch plan, and stop all of it together.

``p2pkv launch node`` (one task per node of the Slurm job step) calls :class:`NodeRunner`:
it publishes this node's cluster address in the job directory, fills the plan's address
placeholders (waiting, with a deadline, for the other nodes' addresses), starts its processes
(directory, vLLM instances, router) each in its own session with its own log file, and then
watches them. When any of them exits, or the runner gets SIGTERM/SIGINT (``scancel``, the job's
time limit, Ctrl-C on ``srun``), it stops all of them (SIGTERM, then SIGKILL after a grace
period) and returns; a process that died makes the return code non-zero, so that
``srun --kill-on-bad-exit`` ends the job on every node.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from p2pkv.credential import credential_for, reader_credential_for, write_credential
from p2pkv.errors import ConfigError
from p2pkv.keys import InstanceId
from p2pkv.launch.plan import (
    Launch, Plan, credential_path, fill, referenced_nodes, router_credential_path,
)
from p2pkv.secret import load_secret

logger = logging.getLogger(__name__)

_SIOCGIFADDR = 0x8915


def interface_address(iface: str) -> str:
    """The IPv4 address of network interface ``iface`` (e.g. ``ib0``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR,
                                 struct.pack("256s", iface.encode()[:15]))
        except OSError as e:
            raise ConfigError(f"interface {iface!r} has no IPv4 address: {e}") from None
    return socket.inet_ntoa(packed[20:24])


def resolve_address(node: str, iface: str = "") -> str:
    """This node's cluster address: ``iface``'s, else what the node name resolves to (the
    first address that is not loopback)."""
    if iface:
        return interface_address(iface)
    try:
        infos = socket.getaddrinfo(node, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve node name {node!r}: {e}; set P2PKV_IFACE") from None
    for info in infos:
        address = str(info[4][0])
        if not ipaddress.ip_address(address).is_loopback:
            return address
    raise ConfigError(f"{node!r} resolves only to loopback; set P2PKV_IFACE to the cluster "
                      f"interface (e.g. ib0, eth0)")


def check_secret_file(path: str) -> None:
    """Refuse a missing secret or one that group or others can read."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ConfigError(f"cannot read the cluster secret {path!r}: {e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"the cluster secret {path!r} has mode {stat.S_IMODE(mode):o}; "
                          f"make it readable by its owner only (chmod 600)")


def visible_gpus(launch: Launch, step_devices: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for ``launch``: its indices into the devices the job step sees."""
    if step_devices is None:
        return ",".join(map(str, launch.gpus))
    devices = [d for d in step_devices.split(",") if d]
    if max(launch.gpus) >= len(devices):
        raise ConfigError(f"{launch.name} needs GPU index {max(launch.gpus)} but this step "
                          f"sees only CUDA_VISIBLE_DEVICES={step_devices!r}")
    return ",".join(devices[g] for g in launch.gpus)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the runner dies (Linux; best effort)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class NodeRunner:
    plan: Plan
    node: str
    address: str
    grace_s: float = 30.0
    """How long processes get between SIGTERM and SIGKILL."""
    peer_wait_s: float = 300.0
    """How long to wait for another node's runner to publish its address."""
    stop: threading.Event = field(default_factory=threading.Event)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def addr_dir(self) -> Path:
        return Path(self.plan.spec.job_dir) / "nodes"

    def publish_address(self) -> None:
        self.addr_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.addr_dir / f".{self.node}.addr.tmp"
        tmp.write_text(self.address + "\n")
        tmp.replace(self.addr_dir / f"{self.node}.addr")

    def peer_address(self, node: str, deadline: float) -> str:
        path = self.addr_dir / f"{node}.addr"
        while True:
            try:
                text = path.read_text().strip()
                if text:
                    return text
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise ConfigError(f"node {node} did not publish its address in {path} within "
                                  f"{self.peer_wait_s:g} s (is the job dir on a shared "
                                  f"filesystem?)")
            if self.stop.wait(0.2):
                raise InterruptedError("stopped while waiting for peer addresses")

    def resolve(self, launch: Launch) -> list[str]:
        """``launch.argv`` with every placeholder filled in."""
        deadline = time.monotonic() + self.peer_wait_s
        needed = referenced_nodes(" ".join(launch.argv))
        addresses = {n: self.address if n == self.node else self.peer_address(n, deadline)
                     for n in needed}
        return [fill(a, self.address, addresses) for a in launch.argv]

    def write_credential(self, launch: Launch) -> None:
        """An instance's own credential file (``p2pkv.credential``), from the secret."""
        path = Path(credential_path(self.plan.spec, launch.name))
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_credential(path, credential_for(load_secret(self.plan.spec.secret_file),
                                              InstanceId(launch.name)))

    def write_reader_credential(self) -> None:
        """The router's read-only credential (lookups and the feed), from the secret."""
        path = Path(router_credential_path(self.plan.spec))
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_credential(path, reader_credential_for(load_secret(self.plan.spec.secret_file)))

    def start(self, launch: Launch) -> subprocess.Popen:
        argv = self.resolve(launch)
        if launch.role == "vllm":
            self.write_credential(launch)
        elif launch.role == "router":
            self.write_reader_credential()
        env = {**os.environ, **launch.env, "PYTHONUNBUFFERED": "1"}
        if launch.gpus:
            env["CUDA_VISIBLE_DEVICES"] = visible_gpus(launch,
                                                       os.environ.get("CUDA_VISIBLE_DEVICES"))
        log = Path(self.plan.log_path(launch))
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        logger.info("%s: started %s (pid %d, log %s)", self.node, launch.name, proc.pid, log)
        self.procs[launch.name] = proc
        return proc

    def run(self, poll_s: float = 1.0) -> int:
        """Start this node's processes and watch them until one exits or ``stop`` is set."""
        launches = self.plan.on(self.node)
        if not launches:
            logger.warning("%s: the plan has nothing to run on this node", self.node)
        check_secret_file(self.plan.spec.secret_file)
        self.publish_address()
        failed = ""
        try:
            for launch in launches:
                if self.stop.is_set():
                    break
                self.start(launch)
            while not self.stop.is_set() and not failed:
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        failed = f"{name} exited with code {proc.returncode}"
                        break
                else:
                    self.stop.wait(poll_s)
        except (ConfigError, OSError) as e:
            failed = str(e)
        except InterruptedError:
            pass
        finally:
            self.stop_all()
            (self.addr_dir / f"{self.node}.addr").unlink(missing_ok=True)
        if failed:
            logger.error("%s: %s; stopped this node's processes", self.node, failed)
            return 1
        logger.info("%s: stopped", self.node)
        return 0

    def stop_all(self) -> None:
        """SIGTERM every process group (newest first), SIGKILL what outlives the grace."""
        alive = [p for p in reversed(self.procs.values()) if p.poll() is None]
        for proc in alive:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for proc in alive:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
