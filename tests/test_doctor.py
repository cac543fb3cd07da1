"""``p2pkv doctor`` against a real directory and real peer processes on loopback: the
all-good case, a mismatched hash probe, an unreachable data plane, wrong and missing secrets.
The checks' pure parts (probe and address findings) are tested with structs."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pkv.directory.client import DirectoryClient
from p2pkv.directory.protocol import InstanceInfo, RefusedRegistration, Stats, StatsReply, Status
from p2pkv.doctor.checks import address_findings, namespace_findings, probe_findings, server_findings
from p2pkv.keys import InstanceId, Namespace
from p2pkv.secret import ClusterSecret
from p2pkv.transport.ucx import ucx_unavailable_reason
from tests.conftest import python_env
from tests.test_directory_service import Directory

pytestmark = pytest.mark.timeout(120)

SECRET = "a-cluster-secret-of-enough-bytes"
NS = "test"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def directory(tmp_path: Path, secret_file: Path):
    d = Directory(tmp_path, "--secret-file", str(secret_file))
    yield d
    d.stop()


def peer(spawn, directory: str | None, instance: str, probe: str = "p1", kind: str = "shm",
         secret: str | None = SECRET):
    env = {"P2PKV_TEST_INSTANCE": instance, "P2PKV_TEST_PROBE": probe,
           "P2PKV_TEST_NAMESPACE": NS, "P2PKV_TEST_SECRET": secret or "",
           "P2PKV_TEST_MEMBER_PLANE": "1"}
    if directory:
        env["P2PKV_TEST_DIRECTORY"] = directory
    return spawn(["-m", "tests.peer_process", f"{instance}.ready", "4096", "2", "3", kind],
                 f"{instance}.ready", env=env)


def stats_until(endpoint: str, done, secret: str | None = SECRET, timeout_s: float = 15
                ) -> StatsReply:
    """Poll Stats until ``done(reply)`` (registration and refusal are asynchronous)."""
    client = DirectoryClient(endpoint, secret=ClusterSecret(secret.encode()) if secret else None)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            reply = client.call(Stats(), 2)
            if isinstance(reply, StatsReply) and done(reply):
                return reply
            assert time.monotonic() < deadline, f"directory never got there: {reply}"
            time.sleep(0.05)
    finally:
        client.close()


def doctor(*args: str, timeout_s: float = 30) -> tuple[int, dict, float]:
    """Run ``p2pkv doctor --json``; (exit code, report, wall seconds)."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "p2pkv", "doctor", "--json", *args],
                          env=python_env(), capture_output=True, text=True, timeout=timeout_s)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout), time.monotonic() - t0


def table(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "p2pkv", "doctor", *args], env=python_env(),
                          capture_output=True, text=True, timeout=30)
    return proc.stdout


def levels(report: dict, level: str) -> list[dict]:
    return [f for f in report["findings"] if f["level"] == level]


def test_all_good_exits_0_and_names_each_path(spawn, directory, secret_file):
    peer(spawn, directory.endpoint, "inst-a", kind="shm")
    peer(spawn, directory.endpoint, "inst-b", kind="tcp")
    stats_until(directory.endpoint, lambda s: len(s.instances) == 2)
    args = ("--directory", directory.endpoint, "--secret-file", str(secret_file),
            "--transport", "shm")
    code, report, _ = doctor(*args)
    assert code == 0 and report["ok"] and report["errors"] == 0, report
    assert {f["check"] for f in report["findings"]} == {"directory", "hash-probe", "namespace",
                                                       "data-plane", "tier"}
    tiers = [f for f in report["findings"] if f["check"] == "tier"]
    assert len(tiers) == 2 and all("host store (no leases out)" in f["detail"] for f in tiers)
    peers = {p["instance"]: p for p in report["peers"]}
    assert all(p["reachable"] for p in peers.values())
    # same host and a slab: shm; a tcp-only holder: tcp, and the doctor says why
    assert (peers["inst-a"]["transport"], peers["inst-b"]["transport"]) == ("shm", "tcp")
    assert peers["inst-b"]["transport_reason"] == "it has no shared slab"
    code, report, _ = doctor(*args[:4], "--transport", "tcp")
    assert code == 0 and {p["transport"] for p in report["peers"]} == {"tcp"}
    print(table(*args))


UCX_MISSING = ucx_unavailable_reason()


@pytest.mark.skipif(bool(UCX_MISSING) and os.environ.get("P2PKV_REQUIRE_UCX") != "1",
                    reason=UCX_MISSING or "-")
def test_gpu_pulls_name_the_ucx_device_path_and_why(spawn, directory, secret_file,
                                                    monkeypatch):
    """From a host whose KV is in GPU memory (``--kv-memory gpu``), ``auto`` pulls over UCX
    from a holder that offers it (``ucx-device``: same host, but out of its host store, so not
    cuda_ipc) and out of the slab of one that does not; into host memory (``auto`` without
    a GPU or RDMA uses no UCX) the UCX-only holder, which has no slab, over tcp."""
    monkeypatch.setenv("UCX_TLS", "tcp")
    peer(spawn, directory.endpoint, "inst-u", kind="ucx")
    peer(spawn, directory.endpoint, "inst-s", kind="shm")
    stats_until(directory.endpoint, lambda s: len(s.instances) == 2)
    args = ("--directory", directory.endpoint, "--secret-file", str(secret_file),
            "--transport", "auto")
    code, report, _ = doctor(*args, "--kv-memory", "gpu")
    assert code == 0 and report["transport"]["kv_memory"] == "gpu", report
    peers = {p["instance"]: p for p in report["peers"]}
    assert peers["inst-u"]["transport"] == "ucx-device", peers
    assert "not cuda_ipc" in peers["inst-u"]["transport_reason"]
    assert peers["inst-s"]["transport"] == "shm"
    assert "offers no UCX" in peers["inst-s"]["transport_reason"]
    code, report, _ = doctor(*args, "--kv-memory", "host")
    peers = {p["instance"]: p for p in report["peers"]}
    assert code == 0 and peers["inst-u"]["transport"] == "tcp", report  # ucx only: no slab
    assert peers["inst-s"]["transport"] == "shm"
    print(table(*args, "--kv-memory", "gpu"))


def test_mismatched_probe_is_an_error_naming_the_instances(spawn, directory, secret_file):
    peer(spawn, directory.endpoint, "inst-a", probe="1111")
    stats_until(directory.endpoint, lambda s: len(s.instances) == 1)
    peer(spawn, directory.endpoint, "odd-one", probe="2222")  # e.g. another PYTHONHASHSEED
    stats_until(directory.endpoint, lambda s: len(s.refused) == 1)
    args = ("--directory", directory.endpoint, "--secret-file", str(secret_file))
    code, report, _ = doctor(*args)
    assert code == 1 and not report["ok"]
    (error,) = levels(report, "ERROR")
    assert error["check"] == "hash-probe" and error["subject"].startswith("odd-one ")
    assert "2222" in error["detail"] and "1111 of inst-a" in error["detail"]
    assert "PYTHONHASHSEED" in error["detail"]
    print(table(*args))


def test_unreachable_data_plane_is_an_error(spawn, directory, secret_file):
    peer(spawn, directory.endpoint, "alive")
    proc, address = peer(spawn, directory.endpoint, "dead")
    stats_until(directory.endpoint, lambda s: len(s.instances) == 2)
    proc.send_signal(signal.SIGKILL)  # its registration outlives it until the lease expires
    proc.wait()
    args = ("--directory", directory.endpoint, "--secret-file", str(secret_file),
            "--timeout", "1")
    code, report, wall = doctor(*args)
    assert code == 1
    (error,) = levels(report, "ERROR")
    assert error["check"] == "data-plane" and error["subject"] == f"dead {address}"
    assert error["detail"].startswith("UNREACHABLE")
    assert [p["reachable"] for p in report["peers"]] == [True, False]  # sorted: alive, dead
    print(table(*args))


def test_wrong_or_missing_secret_is_a_clear_auth_error(directory, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-cluster-secret-at-all")
    wrong.chmod(0o600)
    code, report, wall = doctor("--directory", directory.endpoint, "--secret-file", str(wrong),
                                "--timeout", "1.5")
    (error,) = report["findings"]
    assert code == 1 and error["check"] == "directory"
    assert error["detail"].startswith("AUTH") and "another cluster secret" in error["detail"]
    code, report, _ = doctor("--directory", directory.endpoint, "--timeout", "1.5")
    assert code == 1 and "requires a cluster secret" in report["findings"][0]["detail"]
    print(table("--directory", directory.endpoint, "--secret-file", str(wrong),
                "--timeout", "1.5"))


def test_dead_directory_is_unreachable_within_the_deadline(tmp_path):
    d = Directory(tmp_path)  # learn a free port, then stop the directory behind it
    d.stop()
    code, report, wall = doctor("--directory", d.endpoint, "--timeout", "1")
    assert code == 1 and report["findings"][0]["detail"].startswith("UNREACHABLE")
    assert wall < 10  # 1 s deadline + interpreter start-up


def test_stalled_directory_is_a_timeout(directory, secret_file):
    directory.proc.send_signal(signal.SIGSTOP)  # the kernel still accepts TCP connections
    try:
        code, report, wall = doctor("--directory", directory.endpoint, "--secret-file",
                                    str(secret_file), "--timeout", "1")
    finally:
        directory.proc.send_signal(signal.SIGCONT)
    assert code == 1 and report["findings"][0]["detail"].startswith("TIMEOUT"), report
    assert "stalled" in report["findings"][0]["detail"] and wall < 10


def _info(instance: str, probe: str, address: str = "10.0.0.1:1",
          counters: dict[str, int] | None = None) -> InstanceInfo:
    return InstanceInfo(instance=InstanceId(instance), namespace=Namespace(NS), address=address,
                        epoch=1, chunks=0, probe=probe, counters=counters or {})


def test_server_findings_say_dead_and_saturated():
    infos = [_info("ok", "1", counters={"server_alive": 1, "server_saturated": 0}),
             _info("old", "1"),  # an instance that reports no server health: nothing said
             _info("dead", "1", counters={"server_alive": 0}),
             _info("busy", "1", counters={"server_alive": 1, "server_saturated": 1,
                                          "server_refused": 40, "server_loop_errors": 2})]
    found = {(f.subject.split()[0], f.level) for f in server_findings(infos)}
    assert found == {("dead", "ERROR"), ("busy", "WARN")}
    (busy, errors) = [f for f in server_findings(infos) if f.subject.startswith("busy")]
    assert "40 connections" in busy.detail and "2 error(s)" in errors.detail


def test_server_findings_say_failed_macs_and_wrong_namespaces_or_epochs():
    infos = [_info("clean", "1", counters={"server_alive": 1, "server_bad_macs": 0}),
             _info("tampered", "1", counters={"server_alive": 1, "server_bad_macs": 3}),
             _info("reused", "1", counters={"server_alive": 1, "server_wrong_namespace": 2,
                                            "server_wrong_epoch": 5})]
    found = server_findings(infos)
    assert {(f.subject.split()[0], f.level) for f in found} == {("tampered", "WARN"),
                                                                ("reused", "WARN")}
    tampered, reused = found
    assert "3 connection(s)" in tampered.detail and "MAC" in tampered.detail
    assert "2 for another namespace, 5 for another epoch" in reused.detail


def test_a_flooded_holder_is_reported_saturated(spawn, directory, secret_file):
    _, address = peer(spawn, directory.endpoint, "inst-a", kind="tcp")
    spawn(["-m", "tests.flood_process", "flood", address, "400", "127.0.0.2"], "flood")
    stats_until(directory.endpoint, lambda s: any(
        i.counters.get("server_saturated") for i in s.instances))
    code, report, _ = doctor("--directory", directory.endpoint, "--secret-file",
                             str(secret_file), "--transport", "tcp")
    (f,) = [f for f in report["findings"] if f["check"] == "data-plane server"]
    assert f["level"] == "WARN" and "saturated" in f["detail"], report
    # and the doctor itself still gets through the flood, from its own address
    assert [p["reachable"] for p in report["peers"]] == [True], report


def test_probe_findings_name_every_group():
    (f,) = probe_findings([_info("a", "1"), _info("b", "2"), _info("c", "1")], [])
    assert f.level == "ERROR" and "probe 1: a, c; probe 2: b" in f.detail
    refused = RefusedRegistration(instance=InstanceId("x"), namespace=Namespace(NS),
                                  address="h:1", epoch=1, status=Status.STALE_EPOCH,
                                  reason="older epoch")
    ok, stale = probe_findings([_info("a", "1")], [refused])
    assert ok.level == "OK" and stale.level == "WARN" and "older epoch" in stale.detail


def test_namespaces_accept_other_tp_and_name_what_keeps_one_model_apart():
    from p2pkv.keys import NamespaceSpec
    from p2pkv.slices import tp_slices

    base = dict(model="m", revision="", kv_dtype="torch.float32", device_type="cpu",
                block_size=128, chunk_blocks=1, num_layers=2, num_kv_heads=4, head_size=64,
                hash_algorithm="sha256")
    fp32, bf16 = NamespaceSpec(**base), NamespaceSpec(**{**base, "kv_dtype": "torch.bfloat16"})

    def member(instance, engine, spec, sl):
        return InstanceInfo(instance=InstanceId(instance), namespace=spec.fingerprint(),
                            address="10.0.0.1:1", epoch=1, chunks=0, engine=engine, slice=sl,
                            spec=spec.describe())

    tp2 = tp_slices(num_kv_heads=4, num_layers=2, tp_size=2)
    (tp1,) = tp_slices(num_kv_heads=4, num_layers=2, tp_size=1)
    same = [member("A", "A", fp32, tp2[0]), member("A/1", "A", fp32, tp2[1]),
            member("B", "B", fp32, tp1)]
    (ok,) = namespace_findings(same)
    assert ok.level == "OK" and "A (2 registered rank(s), 2 of 4 KV heads per rank)" in ok.detail
    assert "B (1 registered rank(s), 4 of 4" in ok.detail and "different tensor parallelism" \
        in ok.detail
    findings = namespace_findings(same + [member("C", "C", bf16, tp1)])
    (error,) = [f for f in findings if f.level == "ERROR"]
    assert error.subject == "model m" and "kv_dtype torch." in error.detail
    assert "torch.bfloat16" in error.detail and "torch.float32" in error.detail


def test_loopback_address_in_a_networked_cluster_is_a_warning():
    infos = [_info("a", "1", "127.0.0.1:5"), _info("b", "1", "10.0.0.2:5")]
    assert address_findings("tcp://127.0.0.1:7420", infos) == []
    (f,) = address_findings("tcp://10.0.0.1:7420", infos)
    assert f.level == "WARN" and f.subject == "a 127.0.0.1:5"


def _real_probes(*seeds: str) -> list[str]:
    """vLLM's own hash probe (p2pkv.vllm.connector.probe_hash) in a process whose
    PYTHONHASHSEED is each of ``seeds``, as an instance started with it computes it. The
    processes run at once: each spends its time importing vLLM (~25 s each, one after the
    other, on a loaded 2-CPU host)."""
    code = ("from types import SimpleNamespace as N; from p2pkv.vllm.connector import probe_hash;"
            "print(probe_hash(N(cache_config=N(prefix_caching_hash_algo='sha256'))))")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONHASHSEED=s),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in seeds]
    deadline = time.monotonic() + 180
    probes = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert proc.returncode == 0, err[-2000:]
            probes.append(out.strip().splitlines()[-1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return probes


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_a_deliberately_mismatched_hash_seed_is_an_error(spawn, directory, secret_file):
    """Issue 7's check, with vLLM's real probe: PYTHONHASHSEED=1 vs 2 differ, doctor says so."""
    p1, p2, p1_again = _real_probes("1", "2", "1")
    assert p1 != p2 and p1 == p1_again
    peer(spawn, directory.endpoint, "seed-1", probe=p1)
    stats_until(directory.endpoint, lambda s: len(s.instances) == 1)
    peer(spawn, directory.endpoint, "seed-2", probe=p2)
    stats_until(directory.endpoint, lambda s: len(s.refused) == 1)
    args = ("--directory", directory.endpoint, "--secret-file", str(secret_file))
    code, report, _ = doctor(*args)
    assert code == 1
    (error,) = levels(report, "ERROR")
    assert error["subject"].startswith("seed-2 ") and p2 in error["detail"] and p1 in error["detail"]
    print(table(*args))
