"""A real Slurm cluster on one machine, for tests: Debian's ``slurmctld`` and one ``slurmd``
per node, each "node" in its own network namespace, UTS namespace (hostname ``node1``, ...)
and mount namespace (its own ``/etc/hosts`` naming every node, as a cluster's DNS would),
joined by a bridge in the controller's namespace; a private ``munged`` (key, socket, logs in
the cluster's temp dir) authenticates them.

Processes that slurmd starts (slurmstepd, the batch script, srun's tasks and what they start)
inherit its namespaces, so a job really runs on two hosts as far as the network and the
hostname go; they still share one kernel, /proc and /dev/shm (see tests/test_netns.py).

What this sandbox forced, and why:

- ``ip netns exec`` remounts /sys, hiding /sys/fs/cgroup, and slurmd 22.05 then dies with
  ``error: No filesystem mounted on /sys/fs/cgroup`` / ``Unable to initialize cgroup plugin``
  even with no cgroup plugin configured (it loads one for itself). So daemons enter only the
  network namespace (``nsenter --net``) inside ``unshare --uts --mount``: /sys stays the
  host's. No cgroup plugin is configured (``proctrack/linuxproc``, ``task/none``,
  ``jobacct_gather/none``), so slurmd creates nothing under /sys/fs/cgroup.
- munged refuses a socket directory that is not executable by all (``Socket is
  inaccessible: execute permissions for all required``), so the socket directory is 0755 and
  the key sits in a separate 0700 directory.
- Everything Slurm listens on is inside these namespaces, so its fixed ports (6817, 6818)
  cannot clash with anything on the machine.

Needs root, iproute2, util-linux and the packages ``slurm-wlm`` and ``munge``
(``scripts/install_slurm.sh``, called by ``scripts/setup.sh``). :func:`unavailable` says what
is missing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.79.0"
CTL_ADDRESS = f"{SUBNET}.1"
TOOLS = {"ip": "iproute2", "unshare": "util-linux", "nsenter": "util-linux",
         "munged": "munge", "slurmctld": "slurmctld (slurm-wlm)", "slurmd": "slurmd (slurm-wlm)",
         "sbatch": "slurm-client (slurm-wlm)", "squeue": "slurm-client (slurm-wlm)",
         "scancel": "slurm-client (slurm-wlm)", "sinfo": "slurm-client (slurm-wlm)"}


def unavailable() -> str | None:
    """Why a Slurm cluster cannot be made here (None: it can)."""
    if not sys.platform.startswith("linux"):
        return f"a Slurm cluster in network namespaces needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"network namespaces and slurmd need root (euid {os.geteuid()})"
    missing = [f"'{tool}' ({package})" for tool, package in TOOLS.items()
               if shutil.which(tool) is None]
    if missing:
        return (f"not on PATH: {', '.join(missing)}; install them with "
                f"scripts/install_slurm.sh (apt-get install slurm-wlm munge)")
    return None


def _run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


@dataclass
class SlurmCluster:
    """``nodes`` slurmd's and one slurmctld; :meth:`start` makes it, :meth:`stop` undoes all
    of it (also after a failed start)."""

    nodes: int = 2
    cpus: int = 2
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="p2pkv-slurm-")))
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    netns: dict[str, str] = field(default_factory=dict)
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def address(self, node: str) -> str:
        return f"{SUBNET}.{self.names.index(node) + 2}" if node != "ctl" else CTL_ADDRESS

    @property
    def conf(self) -> Path:
        return self.base / "slurm.conf"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for Slurm commands: this cluster's slurm.conf, no outer job's
        ``SLURM_*`` variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
        return {**env, "SLURM_CONF": str(self.conf), **(extra or {})}

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` on ``host`` ("ctl" or a node): its network, hostname and /etc/hosts."""
        script = (f'hostname {host} && mount --bind {self.base / "hosts"} /etc/hosts && '
                  f'exec nsenter --net=/run/netns/{self.netns[host]} "$@"')
        return ["unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c", script,
                "sh", *argv]

    def run(self, host: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv), env=self.env(env), cwd=cwd or self.base,
                              capture_output=True, text=True, timeout=timeout)

    def pids(self, host: str) -> list[int]:
        """Every process in ``host``'s network namespace (the daemon included)."""
        out = _run("ip", "netns", "pids", self.netns[host])
        return [int(p) for p in out.stdout.split() if p.strip().isdigit() and _alive(int(p))]

    def log(self, name: str) -> str:
        path = self.base / "log" / name
        return path.read_text(errors="replace")[-4000:] if path.exists() else f"({path}: none)"

    # ---- start ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 60) -> SlurmCluster:
        self.base.chmod(0o755)  # munged: every directory above its socket executable by all
        for sub in ("state", "log", "munge", "spool", *[f"spool/{n}" for n in self.names]):
            (self.base / sub).mkdir(mode=0o755)
        self._network()
        self._munge()
        self._write_conf()
        self._daemon("slurmctld", "ctl", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in self.names:
            self._daemon(f"slurmd-{node}", node,
                         ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        deadline = time.monotonic() + timeout_s
        while True:
            out = self.run("ctl", ["sinfo", "-h", "-N", "-o", "%N %T"])
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            if out.returncode == 0 and sorted(states) == self.names and all(
                    s == "idle" for s in states.values()):
                return self
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n"
                                       f"{self.log(name + '.out')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle within {timeout_s:g} s: {out.stdout}"
                                   f"{out.stderr}\n{self.log('slurmctld.log')}")
            time.sleep(0.5)

    def _network(self) -> None:
        hosts = ["127.0.0.1 localhost", f"{CTL_ADDRESS} ctl"]
        for host in ["ctl", *self.names]:
            name = f"p2pkv-slurm-{self.tag}-{host}"
            r = _run("ip", "netns", "add", name)
            if r.returncode != 0:
                raise RuntimeError(f"ip netns add {name}: {r.stderr.strip()}")
            self.netns[host] = name
        ctl = self.netns["ctl"]
        steps = [("ip", "-n", ctl, "link", "add", "br0", "type", "bridge"),
                 ("ip", "-n", ctl, "addr", "add", f"{CTL_ADDRESS}/24", "dev", "br0"),
                 ("ip", "-n", ctl, "link", "set", "br0", "up"),
                 ("ip", "-n", ctl, "link", "set", "lo", "up")]
        for i, node in enumerate(self.names, start=1):
            outer, inner = f"ps{self.tag}{i}a", f"ps{self.tag}{i}b"  # <= 15 characters
            ns, address = self.netns[node], self.address(node)
            hosts.append(f"{address} {node}")
            steps += [("ip", "link", "add", outer, "type", "veth", "peer", "name", inner),
                      ("ip", "link", "set", outer, "netns", ctl),
                      ("ip", "link", "set", inner, "netns", ns),
                      ("ip", "-n", ctl, "link", "set", outer, "master", "br0", "up"),
                      ("ip", "-n", ns, "link", "set", inner, "name", "eth0"),
                      ("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0"),
                      ("ip", "-n", ns, "link", "set", "eth0", "up"),
                      ("ip", "-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            r = _run(*step)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(step)}: {r.stderr.strip()}")
        (self.base / "hosts").write_text("\n".join(hosts) + "\n")

    def _munge(self) -> None:
        keydir = self.base / "munge-key"
        keydir.mkdir(mode=0o700)
        key = keydir / "munge.key"
        key.write_bytes(secrets.token_bytes(128))
        key.chmod(0o400)
        munge = self.base / "munge"
        log = open(self.base / "log" / "munged.out", "wb")
        self.daemons["munged"] = subprocess.Popen(
            ["munged", "-F", f"--key-file={key}", f"--socket={munge / 'socket'}",
             f"--pid-file={munge / 'pid'}", f"--log-file={self.base / 'log' / 'munged.log'}",
             f"--seed-file={munge / 'seed'}"], stdout=log, stderr=log,
            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 20
        while not (munge / "socket").exists():
            if self.daemons["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start:\n{self.log('munged.out')}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        b = self.base
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.address(n)} CPUs={self.cpus} "
                          f"RealMemory=1000 State=UNKNOWN" for n in self.names)
        self.conf.write_text(f"""\
ClusterName=p2pkv{self.tag}
SlurmctldHost=ctl({CTL_ADDRESS})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={b}/munge/socket
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd-%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait=30
MailProg=/bin/true
{nodes}
PartitionName=test Nodes={','.join(self.names)} Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, name: str, host: str, argv: list[str]) -> None:
        log = open(self.base / "log" / f"{name}.out", "wb")
        self.daemons[name] = subprocess.Popen(self.command(host, argv), env=self.env(),
                                              cwd=self.base, stdout=log, stderr=log,
                                              stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    # ---- jobs ----------------------------------------------------------------------------

    def sbatch(self, argv: Sequence[str], env: dict[str, str]) -> str:
        """Submit from the controller's host; the job id."""
        out = self.run("ctl", ["sbatch", "--parsable", *argv], env=env)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr}")
        return out.stdout.strip().split(";")[0]

    def job_state(self, job: str) -> str:
        """The job's state in squeue ("" once it has left the queue)."""
        out = self.run("ctl", ["squeue", "-h", "-j", job, "-o", "%T"])
        return out.stdout.strip() if out.returncode == 0 else ""

    # ---- stop ----------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Cancel jobs, stop the daemons, kill whatever is left in the namespaces, delete the
        namespaces and the temp dir. Returns what it had to force (for the test to report)."""
        forced: list[str] = []
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            try:
                self.run("ctl", ["scancel", "--full", "--user=root"], timeout=20)
            except subprocess.TimeoutExpired:
                forced.append("scancel timed out")
        for name in [n for n in self.daemons if n.startswith("slurmd-")] + ["slurmctld"]:
            proc = self.daemons.get(name)
            if proc is not None:
                forced += _stop(name, proc)
        for host in list(self.netns):
            for pid in self.pids(host):
                forced.append(f"killed leftover pid {pid} on {host}: {cmdline(pid)[:120]}")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if "munged" in self.daemons:
            forced += _stop("munged", self.daemons["munged"])
        for ns in self.netns.values():
            r = _run("ip", "netns", "del", ns)  # also deletes the veth pairs and the bridge
            if r.returncode != 0:
                forced.append(f"ip netns del {ns}: {r.stderr.strip()}")
        self.netns.clear()
        shutil.rmtree(self.base, ignore_errors=True)
        return forced


def _stop(name: str, proc: subprocess.Popen, grace_s: float = 10) -> list[str]:
    if proc.poll() is not None:
        return []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
        return []
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return [f"{name} ignored SIGTERM for {grace_s:g} s; killed"]
