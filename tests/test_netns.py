"""Two hosts on one machine: two network namespaces joined by a veth pair, each process also
in its own UTS namespace with its own hostname (so the data plane's host id differs, as it
would across machines). Host A runs the directory (on its namespace address, with the cluster
secret) and instance A; host B runs instance B. B pulls A's chunks across the link and checks
every byte; ``p2pkv doctor`` run on B sees both instances, reaches both data planes at their
namespace addresses and says a pull from A goes over tcp because A is another host.

Needs root and iproute2/util-linux (``ip``, ``unshare``); skipped, with the exact reason,
elsewhere. Namespace names are unique per run and deleted in teardown, also on failure.

NOTE: network namespaces alone do not make two hosts: processes in them share one kernel,
one /proc and one /dev/shm, and (without a UTS namespace) one hostname, so the data plane
counts them as one host, and its shared-memory path does work between them (the control
connection crosses the veth, the bytes come out of the holder's slab).
``test_shm_path_works_across_network_namespaces_of_one_kernel`` shows that.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import python_env, wait_for_file

pytestmark = pytest.mark.timeout(180)

SECRET = "netns-cluster-secret-0123456789"
ADDRESSES = {"a": "10.77.0.1", "b": "10.77.0.2"}
CHUNK_BYTES, CHUNKS, SEED = 1 << 20, 8, 5


def unavailable() -> str | None:
    """Why two-host tests cannot run here (None: they can)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"creating network namespaces needs root (euid {os.geteuid()})"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"'{tool}' ({package}) is not on PATH"
    return None


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@dataclass
class TwoHosts:
    tmp: Path
    netns: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def command(self, host: str, hostname: str, args: list[str]) -> list[str]:
        """``args`` (a Python module and its arguments) on ``host``'s network, with its own
        hostname (a UTS namespace)."""
        return ["ip", "netns", "exec", self.netns[host], "unshare", "--uts", "sh", "-c",
                f'hostname {hostname} && exec "$0" "$@"', sys.executable, *args]

    def spawn(self, host: str, args: list[str], ready: str, env: dict[str, str] | None = None,
              hostname: str = "") -> str:
        """Start a long-running process on ``host``; return what it wrote to ``ready``."""
        log = open(self.tmp / f"{ready}.log", "wb")
        proc = subprocess.Popen(self.command(host, hostname or f"host-{host}", args),
                                env={**python_env(), **(env or {})}, cwd=self.tmp,
                                stdout=log, stderr=log)
        log.close()
        self.procs.append(proc)
        try:
            return wait_for_file(self.tmp / ready, proc)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{args}: {e}\n{(self.tmp / f'{ready}.log').read_text()}")

    def run(self, host: str, args: list[str], env: dict[str, str] | None = None,
            hostname: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, hostname or f"host-{host}", args),
                              env={**python_env(), **(env or {})}, cwd=self.tmp,
                              capture_output=True, text=True, timeout=60)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait(timeout=10)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[TwoHosts]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid():x}{secrets.token_hex(2)}"  # unique; veth names have <= 15 chars
    netns = {h: f"p2pkv-{tag}-{h}" for h in ADDRESSES}
    veth = {h: f"p2k{tag}{h}" for h in ADDRESSES}
    created: list[str] = []
    two = TwoHosts(tmp_path, netns)
    try:
        for h, name in netns.items():
            r = _run("ip", "netns", "add", name)
            if r.returncode != 0:
                pytest.skip(f"'ip netns add' failed here: {r.stderr.strip()}")
            created.append(name)
        steps = [("ip", "link", "add", veth["a"], "type", "veth", "peer", "name", veth["b"])]
        for h in ADDRESSES:
            steps += [("ip", "link", "set", veth[h], "netns", netns[h]),
                      ("ip", "-n", netns[h], "addr", "add", f"{ADDRESSES[h]}/24", "dev", veth[h]),
                      ("ip", "-n", netns[h], "link", "set", veth[h], "up"),
                      ("ip", "-n", netns[h], "link", "set", "lo", "up")]
        for step in steps:
            r = _run(*step)
            assert r.returncode == 0, f"{' '.join(step)}: {r.stderr}"
        (tmp_path / "secret").write_text(SECRET + "\n")
        (tmp_path / "secret").chmod(0o600)
        yield two
    finally:
        two.stop()
        _run("ip", "link", "del", veth["a"])  # only if it never left the root namespace
        for name in created:
            r = _run("ip", "netns", "del", name)  # also destroys the veth pair
            assert r.returncode == 0, f"could not delete netns {name}: {r.stderr}"


def start_cluster(hosts: TwoHosts) -> tuple[str, dict[str, str]]:
    """Directory + instance A on host a, instance B on host b; (endpoint, data addresses)."""
    endpoint = hosts.spawn("a", ["-m", "p2pkv.directory", "--bind",
                                 f"tcp://{ADDRESSES['a']}:0", "--secret-file", "secret",
                                 "--ready-file", "directory.ready"], "directory.ready")
    data = {}
    for h in ADDRESSES:
        data[h] = hosts.spawn(h, ["-m", "tests.peer_process", f"peer-{h}.ready",
                                  str(CHUNK_BYTES), str(CHUNKS), str(SEED), "shm"],
                              f"peer-{h}.ready",
                              env={"P2PKV_TEST_SECRET": SECRET, "P2PKV_TEST_DIRECTORY": endpoint,
                                   "P2PKV_TEST_MEMBER_PLANE": "1",
                                   "P2PKV_TEST_INSTANCE": f"inst-{h}",
                                   "P2PKV_TEST_BIND_HOST": ADDRESSES[h]})
    return endpoint, data


def pull(hosts: TwoHosts, host: str, address: str, hostname: str = "") -> dict:
    r = hosts.run(host, ["-m", "tests.pull_process", address, str(CHUNK_BYTES), str(CHUNKS),
                         str(SEED), "shm"], env={"P2PKV_TEST_SECRET": SECRET,
                                                 "P2PKV_TEST_MEMBER_PLANE": "1"},
                  hostname=hostname)
    assert r.stdout, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_b_pulls_a_over_tcp_across_the_link_and_doctor_agrees(hosts: TwoHosts):
    endpoint, data = start_cluster(hosts)
    assert endpoint.startswith(f"tcp://{ADDRESSES['a']}:")
    assert data["a"].startswith(f"{ADDRESSES['a']}:") and data["b"].startswith(
        f"{ADDRESSES['b']}:")

    got = pull(hosts, "b", data["a"])
    assert got == {"intact": CHUNKS, "chunks": CHUNKS, "errors": [], "tcp": 1, "shm": 0}

    r = hosts.run("b", ["-m", "p2pkv", "doctor", "--directory", endpoint, "--secret-file",
                        "secret", "--transport", "shm", "--json"])
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["errors"] == report["warnings"] == 0, report
    peers = {p["instance"]: p for p in report["peers"]}
    assert peers["inst-a"]["address"] == data["a"] and peers["inst-a"]["reachable"]
    assert (peers["inst-a"]["transport"], peers["inst-a"]["transport_reason"]) == (
        "tcp", "it runs on another host")
    assert peers["inst-b"]["transport"] == "shm"  # the doctor runs on host b itself
    table = hosts.run("b", ["-m", "p2pkv", "doctor", "--directory", endpoint, "--secret-file",
                            "secret", "--transport", "shm"])
    print(table.stdout)


def test_directory_refuses_the_namespace_address_without_a_secret(hosts: TwoHosts):
    r = hosts.run("a", ["-m", "p2pkv", "directory", "--bind", f"tcp://{ADDRESSES['a']}:0"])
    assert r.returncode == 2 and "without a cluster secret" in r.stderr


def test_shm_path_works_across_network_namespaces_of_one_kernel(hosts: TwoHosts):
    _, data = start_cluster(hosts)
    # Same hostname as instance A, other network namespace: one host to the data plane.
    got = pull(hosts, "b", data["a"], hostname="host-a")
    assert got == {"intact": CHUNKS, "chunks": CHUNKS, "errors": [], "tcp": 0, "shm": 1}
