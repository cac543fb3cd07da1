"""``sbatch launch/slurm/p2pkv.sbatch`` on a real Slurm cluster (Debian's slurmctld, one
slurmd per node, munge), two nodes in their own network and UTS namespaces
(tests/slurm_cluster.py), real vLLM CPU instances.

The job is what a user would submit on a CPU cluster: ``sbatch --gpus-per-node=0
launch/slurm/p2pkv.sbatch --cpu-instances 1 --prefill 1 --model M``: the directory, the
prefill instance and the router on node1, the decode instance on node2. One request through
the router: it prefills on node1, and node2's instance pulls the prompt's chunks from node1
through the directory (over tcp: the nodes have different hostnames, so the data plane does
not take its same-host shm path). Then ``scancel`` must leave no process in either node's
namespace (slurmd aside), no generated secret and no shared-memory segment behind.

Skipped, with the reason, where the cluster cannot be made (not root, slurm-wlm/munge not
installed: ``scripts/install_slurm.sh``); with CI=true and P2PKV_REQUIRE_E2E=1 that is a
failure instead. Starts vLLM: run it under ``flock /tmp/p2pkv-vllm.lock``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm_cluster import SlurmCluster, cmdline, unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

SBATCH = REPO / "launch" / "slurm" / "p2pkv.sbatch"
ROUTER_PORT, DIRECTORY_PORT, VLLM_PORT = 9000, 7420, 8000  # in the cluster's own netns


def required() -> bool:
    return os.environ.get("CI") == "true" and os.environ.get("P2PKV_REQUIRE_E2E") == "1"


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    reason = unavailable()
    if reason is None and not required():
        try:
            import vllm  # noqa: F401
        except ImportError:
            reason = "vLLM is not installed (run scripts/setup.sh)"
    if reason:
        if required():
            pytest.fail(f"CI=true and P2PKV_REQUIRE_E2E=1, but no Slurm cluster: {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(nodes=2)
    try:
        cluster.start()
        yield cluster
    finally:
        forced = cluster.stop()
        if forced:
            print("slurm teardown had to force:", *forced, sep="\n  ")


def client(cluster: SlurmCluster, *args: str, timeout: float = 700) -> dict:
    """``tests/slurm_client.py`` run on the controller's host (inside the cluster network)."""
    out = cluster.run("ctl", [sys.executable, "-m", "tests.slurm_client", *args],
                      env={"PYTHONPATH": str(REPO)}, cwd=REPO, timeout=timeout)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def job_report(cluster: SlurmCluster, job: str, job_dir: Path) -> str:
    parts = [f"--- p2pkv-{job}.out\n" + _tail(cluster.base / f"p2pkv-{job}.out"),
             "--- slurmctld.log\n" + cluster.log("slurmctld.log")]
    parts += [f"--- {p.relative_to(job_dir)}\n{_tail(p)}"
              for p in sorted((job_dir / "logs").glob("*/*.log"))]
    return "\n".join(parts)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(none)"


def job_processes(cluster: SlurmCluster) -> dict[str, dict[int, str]]:
    """Every process in each node's namespace but slurmd itself: pid -> command line."""
    daemons = {p.pid for p in cluster.daemons.values()}
    return {node: {pid: cmdline(pid) for pid in cluster.pids(node) if pid not in daemons}
            for node in cluster.names}


def shm_segments() -> set[str]:
    """vLLM's and p2pkv's names in /dev/shm (p2pkv's own slabs are unlinked at creation)."""
    if not os.path.isdir("/dev/shm"):
        return set()
    return {name for name in os.listdir("/dev/shm") if "vllm" in name or "p2pkv" in name}


def test_sbatch_two_nodes_remote_hit_across_nodes_then_scancel_cleans_up(slurm: SlurmCluster):
    from p2pkv.harness.demo_model import prepare

    model = prepare()
    job_dir = slurm.base / "job"
    env = {"PYTHONPATH": str(REPO), "P2PKV_PYTHON": sys.executable, "P2PKV_JOB_DIR": str(job_dir),
           "P2PKV_VLLM_COMMAND": f"{sys.executable} -m vllm.entrypoints.openai.api_server",
           "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    shm_before = shm_segments()
    job = slurm.sbatch([
        "--gpus-per-node=0", f"--chdir={slurm.base}", str(SBATCH), "--cpu-instances", "1",
        "--prefill", "1", "--model", str(model), "--router-port", str(ROUTER_PORT),
        "--directory-port", str(DIRECTORY_PORT), "--vllm-port", str(VLLM_PORT), "--",
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096"], env)
    node1, node2 = slurm.names
    router = f"http://{slurm.address(node1)}:{ROUTER_PORT}"
    directory = f"tcp://{slurm.address(node1)}:{DIRECTORY_PORT}"

    # -- the job runs: wait for both instances, then the router (vLLM starts in ~1-2 min;
    # the router answers /health 200 before its first probes of the instances failed)
    deadline = time.monotonic() + 600
    urls = [f"http://{slurm.address(n)}:{VLLM_PORT}" for n in (node1, node2)] + [router]
    while not all(client(slurm, "health", url)["status"] == 200 for url in urls):
        state = slurm.job_state(job)
        assert state in ("PENDING", "RUNNING"), (
            f"job {job} is {state or 'gone'}\n{job_report(slurm, job, job_dir)}")
        assert time.monotonic() < deadline, f"router not healthy\n{job_report(slurm, job, job_dir)}"
        time.sleep(3)
    secret = job_dir / "secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600

    procs = job_processes(slurm)
    def on(node: str, *words: str) -> list[int]:
        return [pid for pid, cmd in procs[node].items() if all(w in cmd for w in words)]
    assert on(node1, "-m p2pkv directory") and on(node1, "-m p2pkv router"), procs
    assert on(node1, "vllm.entrypoints.openai.api_server", '"engine_id":"prefill-0"'), procs
    assert on(node2, "vllm.entrypoints.openai.api_server", '"engine_id":"decode-1"'), procs
    assert not on(node2, "-m p2pkv directory") and not on(node2, "-m p2pkv router"), procs
    key = secret.read_text().strip()
    for node, pids in procs.items():
        for pid in pids:
            assert key not in cmdline(pid)
            try:
                assert key not in Path(f"/proc/{pid}/environ").read_bytes().decode(
                    errors="replace"), f"the secret is in the environment of {pid}"
            except OSError:
                pass  # exited meanwhile

    # -- one request through the router: prefill on node1, decode on node2 pulls the chunks
    reply = client(slurm, "ask", router, "3", "16")
    assert reply["status"] == 200, reply
    assert reply["headers"]["x-p2pkv-prefill-instance"] == "prefill-0", reply
    assert reply["headers"]["x-p2pkv-instance"] == "decode-1", reply
    assert reply["text"].strip(), reply
    prompt_tokens = reply["usage"]["prompt_tokens"]
    full_chunks = prompt_tokens // 128

    deadline = time.monotonic() + 30
    while True:  # counters reach the directory with the next report
        stats = client(slurm, "stats", directory, str(secret))
        decode = stats["instances"]["decode-1"]["counters"]
        if decode.get("chunks_pulled", 0) >= full_chunks or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert stats["secure"], stats  # the directory runs with the job's generated secret
    assert stats["instances"]["prefill-0"]["address"].startswith(f"{slurm.address(node1)}:")
    assert stats["instances"]["decode-1"]["address"].startswith(f"{slurm.address(node2)}:")
    if decode["chunks_pulled"] < full_chunks:  # say why: the counters and p2pkv's log lines
        decode_log = (job_dir / "logs" / node2 / "decode-1.log").read_text(errors="replace")
        lines = "\n".join(line for line in decode_log.splitlines() if "p2pkv" in line)
        pytest.fail(f"decode-1 pulled {decode['chunks_pulled']} of {full_chunks} chunks "
                    f"({prompt_tokens} prompt tokens)\ncounters: {json.dumps(decode)}\n"
                    f"directory: {json.dumps(stats)[:4000]}\ndecode-1's p2pkv lines:\n"
                    f"{lines[-6000:]}\n{job_report(slurm, job, job_dir)}")
    assert full_chunks >= 5, prompt_tokens
    assert decode["bytes_pulled"] > 0 and decode["chunks_failed"] == 0, stats
    # prefill-0 holds what decode-1 pulled (its chunks_served counter reaches the directory
    # only with its next engine step's report, and a prefill instance is idle by then)
    assert stats["instances"]["prefill-0"]["chunks"] >= decode["chunks_pulled"], stats
    decode_log = (job_dir / "logs" / node2 / "decode-1.log").read_text(errors="replace")
    peer = stats["instances"]["prefill-0"]["address"]
    assert f"pulling from {peer} over tcp, not shm: it runs on another host" in decode_log
    # the worker's line: "p2pkv: rank 0 pulled 9/9 chunks (53.1 MB) for <req> from <peer> in ..."
    pulled = [line for line in decode_log.splitlines()
              if re.search(r"p2pkv: rank \d+ pulled \d+/\d+ chunks", line)
              and f"from {peer} in" in line]
    assert pulled, decode_log[-3000:]
    print(f"job {job}: {prompt_tokens} prompt tokens; decode-1 on {node2} pulled "
          f"{decode['chunks_pulled']} chunks ({decode['bytes_pulled']} B) from prefill-0 on "
          f"{node1} over tcp; {pulled[-1].split('] ', 1)[-1]}")

    # -- scancel: nothing left behind
    t0 = time.monotonic()
    out = slurm.run("ctl", ["scancel", job])
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 120
    while slurm.job_state(job) or any(job_processes(slurm).values()):
        assert time.monotonic() < deadline, (
            f"after scancel: job {slurm.job_state(job)!r}, left {job_processes(slurm)}")
        time.sleep(0.5)
    print(f"scancel: job and every process gone in {time.monotonic() - t0:.1f} s")
    assert not secret.exists(), "the generated secret outlived the job"
    for pids in procs.values():
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or not cmdline(pid), pid
    left = shm_segments() - shm_before
    assert not left, f"shared memory left behind: {sorted(left)}"
    output = (slurm.base / f"p2pkv-{job}.out").read_text()
    assert "stopping the node runners" in output and f"{node1}: stopped" in output, output
