"""A cluster launch plan: which process runs on which node, with which GPUs, ports and flags.

Pure data, no I/O. ``p2pkv launch plan`` (``launch/cli.py``) builds one from flags and
``SLURM_*`` variables, prints it (the sbatch script's ``--dry-run``) and writes it as JSON;
``p2pkv launch node`` (``launch/node.py``) runs one node's share of it.

Node addresses are not known when the plan is made (the batch script may run where the
cluster interface is not visible, and ``--iface`` picks among several), so argv strings carry
placeholders that the node runner fills in: :data:`ADDR` is the address of the node the process
runs on, ``addr_of(node)`` the address another node's runner published.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Literal

import msgspec

from p2pkv.errors import ConfigError
from p2pkv.transport.choose import TRANSPORT_KINDS

ADDR = "@ADDR@"
"""Placeholder: the cluster address of the node that runs the process."""

_ADDR_OF = re.compile(r"@ADDR:([^@]+)@")

CONNECTOR_MAX_TP = 1
"""The connector refuses ``tensor_parallel_size`` > 1 at start-up today (one registration per
instance, one data-plane address); raise this when it learns TP."""

Role = Literal["directory", "vllm", "router"]
PDRole = Literal["", "prefill", "decode"]


def addr_of(node: str) -> str:
    """Placeholder: the cluster address that ``node``'s runner published."""
    return f"@ADDR:{node}@"


def referenced_nodes(text: str) -> list[str]:
    """The nodes whose addresses ``text`` needs (``addr_of`` placeholders), in order."""
    return list(dict.fromkeys(_ADDR_OF.findall(text)))


def fill(text: str, own: str, addresses: dict[str, str]) -> str:
    """Replace :data:`ADDR` with ``own`` and every ``addr_of(node)`` with its address."""
    text = text.replace(ADDR, own)
    return _ADDR_OF.sub(lambda m: addresses[m.group(1)], text)


class ClusterSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What to start: the input of :func:`make_plan`, validated once here."""

    nodes: tuple[str, ...]
    gpus_per_node: int
    model: str
    job_dir: str
    secret_file: str
    tp: int = 1
    cpu_instances: int = 0
    """vLLM's CPU backend: this many instances per node and no GPUs (``gpus_per_node`` is then
    not used, no ``CUDA_VISIBLE_DEVICES`` is set). 0: one instance per GPU (TP group)."""
    prefill: int = 0
    """P/D: the first ``prefill`` instances prefill, the rest decode (0: no P/D split)."""
    served_model_name: str = "model"
    transport: str = "auto"
    store_gib: float = 0.0
    """Host memory per instance for saved chunks (0: the connector's default)."""
    vllm_command: tuple[str, ...] = ("vllm", "serve")
    vllm_args: tuple[str, ...] = ()
    p2pkv_command: tuple[str, ...] = ("python3", "-m", "p2pkv")
    directory_port: int = 7420
    feed_port: int = 7421
    vllm_port: int = 8000
    """Instance i on a node listens on ``vllm_port + i``."""
    router_port: int = 9000
    ucx_env: dict[str, str] = {}
    """``UCX_*`` settings (UCX_TLS, UCX_NET_DEVICES, ...) handed to every vLLM instance."""

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ConfigError("no nodes: pass --nodes or run inside a Slurm allocation")
        if len(set(self.nodes)) != len(self.nodes):
            raise ConfigError(f"nodes listed twice: {self.nodes}")
        if self.cpu_instances < 0:
            raise ConfigError("cpu_instances must not be negative")
        if self.cpu_instances and self.tp != 1:
            raise ConfigError(f"tp={self.tp}: CPU instances (cpu_instances) run with tp 1")
        if not self.cpu_instances and self.gpus_per_node <= 0:
            raise ConfigError("gpus_per_node must be positive (or set cpu_instances for "
                              "vLLM's CPU backend)")
        if self.tp <= 0 or (not self.cpu_instances and self.gpus_per_node % self.tp):
            raise ConfigError(f"tp={self.tp} must divide gpus_per_node={self.gpus_per_node}")
        if self.tp > CONNECTOR_MAX_TP:
            raise ConfigError(f"tp={self.tp}: the p2pkv connector refuses tensor_parallel_size "
                              f"> {CONNECTOR_MAX_TP} at start-up today; run one instance per GPU")
        if self.prefill < 0 or (self.prefill and self.prefill >= self.instance_count):
            raise ConfigError(f"prefill={self.prefill} must leave at least one decode "
                              f"instance of {self.instance_count}")
        if self.transport not in TRANSPORT_KINDS:
            raise ConfigError(f"transport must be one of {TRANSPORT_KINDS}")
        if not self.model or not self.secret_file or not self.job_dir:
            raise ConfigError("model, secret_file and job_dir are required")
        if self.store_gib < 0:
            raise ConfigError("store_gib must not be negative")
        for name in ("directory_port", "feed_port", "vllm_port", "router_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ConfigError(f"{name} must be a TCP port")
        first = set(range(self.vllm_port, self.vllm_port + self.per_node))
        fixed = [self.directory_port, self.feed_port, self.router_port]
        if len(set(fixed)) != 3 or first & set(fixed):
            raise ConfigError(f"ports clash on the first node: directory {fixed[0]}, feed "
                              f"{fixed[1]}, router {fixed[2]}, vLLM {self.vllm_port}.."
                              f"{self.vllm_port + self.per_node - 1}")
        if self.vllm_port + self.per_node > 65536:
            raise ConfigError("vllm_port + instances per node runs past 65535")

    @property
    def per_node(self) -> int:
        return self.cpu_instances or self.gpus_per_node // self.tp

    @property
    def instance_count(self) -> int:
        return len(self.nodes) * self.per_node


class Launch(msgspec.Struct, frozen=True, kw_only=True):
    """One process of the job: where it runs and exactly how it is started."""

    node: str
    name: str
    role: Role
    argv: tuple[str, ...]
    env: dict[str, str] = {}
    gpus: tuple[int, ...] = ()
    """Indices into the GPUs the node's job step sees (CUDA_VISIBLE_DEVICES is set from them);
    empty for CPU instances and for the directory and the router."""
    url: str = ""
    pd: PDRole = ""


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    spec: ClusterSpec
    directory: str
    """The endpoint members connect to (with an ``addr_of`` placeholder)."""
    router_url: str
    launches: tuple[Launch, ...]

    def on(self, node: str) -> list[Launch]:
        """This node's processes, in start order (directory, instances, router)."""
        return [launch for launch in self.launches if launch.node == node]

    def log_path(self, launch: Launch) -> str:
        return f"{self.spec.job_dir}/logs/{launch.node}/{launch.name}.log"

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=2)

    @classmethod
    def from_json(cls, data: bytes) -> Plan:
        try:
            return msgspec.json.decode(data, type=cls)
        except msgspec.ValidationError as e:
            raise ConfigError(f"not a p2pkv launch plan: {e}") from None


def router_argv(spec: ClusterSpec, directory: str, instances: list[Launch]) -> list[str]:
    """THE router invocation (keep it here only): all instances, or a prefill/decode split.
    Instances are named ``ID=URL``, ID being the ``engine_id`` each registers with."""
    ids = lambda pd: ",".join(f"{i.name}={i.url}" for i in instances if i.pd == pd)  # noqa: E731
    base = [*spec.p2pkv_command, "router", "--model", spec.model, "--host", ADDR,
            "--port", str(spec.router_port), "--directory", directory,
            "--credential-file", router_credential_path(spec)]
    if spec.prefill:
        return [*base, "--prefill", ids("prefill"), "--decode", ids("decode")]
    return [*base, "--instances", ids("")]


KV_ROLES: dict[str, str] = {"": "kv_both", "prefill": "kv_producer", "decode": "kv_consumer"}


def credential_path(spec: ClusterSpec, name: str) -> str:
    """Where instance ``name``'s credential file goes (``p2pkv launch node`` writes it from
    the secret just before starting the instance; the instance never reads the secret)."""
    return f"{spec.job_dir}/credentials/{name}.credential"


def router_credential_path(spec: ClusterSpec) -> str:
    """Where the router's read-only credential goes (``p2pkv launch node`` writes it from the
    secret just before starting the router, which never reads the secret)."""
    return f"{spec.job_dir}/credentials/router.reader.credential"


def kv_transfer_config(spec: ClusterSpec, directory: str, engine_id: str = "",
                       pd: str = "") -> str:
    auth: dict[str, object] = ({"credential_file": credential_path(spec, engine_id)}
                               if engine_id else {"secret_file": spec.secret_file})
    extra: dict[str, object] = {"directory": directory, **auth,
                                "transport": spec.transport, "bind_host": ADDR}
    if spec.store_gib:
        extra["store_gib"] = spec.store_gib
    config: dict[str, object] = {
        "kv_connector": "P2PKVConnector", "kv_connector_module_path": "p2pkv.vllm.connector",
        "kv_role": KV_ROLES[pd], "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra}
    if engine_id:
        config["engine_id"] = engine_id
    return json.dumps(config, separators=(",", ":"))


def make_plan(spec: ClusterSpec) -> Plan:
    """Directory and router on the first node, one vLLM per GPU (per TP group) everywhere, or
    ``cpu_instances`` vLLM CPU instances per node."""
    head = spec.nodes[0]
    directory = f"tcp://{addr_of(head)}:{spec.directory_port}"
    launches = [Launch(node=head, name="directory", role="directory", argv=(
        *spec.p2pkv_command, "directory", "--bind", f"tcp://{ADDR}:{spec.directory_port}",
        "--feed-bind", f"tcp://{ADDR}:{spec.feed_port}", "--secret-file", spec.secret_file))]
    instances: list[Launch] = []
    for n, node in enumerate(spec.nodes):
        for i in range(spec.per_node):
            index = n * spec.per_node + i
            pd: PDRole = ("" if not spec.prefill else
                          "prefill" if index < spec.prefill else "decode")
            port = spec.vllm_port + i
            name = f"{pd or 'vllm'}-{index}"
            argv = (*spec.vllm_command, "--model", spec.model, "--host", ADDR,
                    "--port", str(port), "--served-model-name", spec.served_model_name,
                    "--tensor-parallel-size", str(spec.tp), "--kv-transfer-config",
                    kv_transfer_config(spec, directory, name, pd), *spec.vllm_args)
            gpus = () if spec.cpu_instances else tuple(range(i * spec.tp, (i + 1) * spec.tp))
            instances.append(Launch(
                node=node, name=name, role="vllm", argv=argv, env=dict(spec.ucx_env), gpus=gpus,
                url=f"http://{addr_of(node)}:{port}", pd=pd))
    launches += instances
    launches.append(Launch(node=head, name="router", role="router",
                           argv=tuple(router_argv(spec, directory, instances)),
                           url=f"http://{addr_of(head)}:{spec.router_port}"))
    return Plan(spec=spec, directory=directory, router_url=launches[-1].url,
                launches=tuple(launches))


def _shown(text: str) -> str:
    """Placeholders as a reader would say them: ``<gpu01>`` for that node's address."""
    return _ADDR_OF.sub(lambda m: f"<{m.group(1)}>", text)


def render(plan: Plan) -> str:
    """The human-readable plan (what ``--dry-run`` prints)."""
    spec = plan.spec
    ucx = "  ".join(f"{k}={v}" for k, v in sorted(spec.ucx_env.items())) or "(UCX defaults)"
    shape = (f"{len(spec.nodes)} node(s) x {spec.cpu_instances} vLLM CPU instance(s), "
             f"{spec.instance_count} in all" if spec.cpu_instances else
             f"{len(spec.nodes)} node(s) x {spec.gpus_per_node} GPU(s), "
             f"{spec.instance_count} vLLM instance(s) of TP {spec.tp}")
    lines = [
        f"p2pkv plan: {shape}"
        + (f", {spec.prefill} prefill + {spec.instance_count - spec.prefill} decode"
           if spec.prefill else ""),
        f"model      {spec.model} (served as {spec.served_model_name!r})",
        f"directory  {_shown(plan.directory)}",
        f"router     {_shown(plan.router_url)}",
        f"transport  {spec.transport}   UCX: {ucx}",
        f"secret     {spec.secret_file} (a file readable by its owner only; never in argv;"
        f" directory, router and node runners read it)",
        f"credential {spec.job_dir}/credentials/<name>.credential per instance (written by its "
        f"node's runner; the instance reads that, not the secret)",
        f"logs       {spec.job_dir}/logs/<node>/<name>.log",
        "",
    ]
    for node in spec.nodes:
        lines.append(f"node {node} (address <{node}>)")
        for launch in plan.on(node):
            where = (f"GPU {','.join(map(str, launch.gpus))}" if launch.gpus else
                     "CPU" if launch.role == "vllm" else "-")
            lines.append(f"  {launch.name:<12} {where:<10} {_shown(launch.url) or '-'}")
    lines += ["", "commands (<node> is that node's address, resolved on the node at start):"]
    for launch in plan.launches:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(launch.env.items()))
        gpus = f"CUDA_VISIBLE_DEVICES=<{','.join(map(str, launch.gpus))}> " if launch.gpus else ""
        argv = " ".join(shlex.quote(_shown(a.replace(ADDR, addr_of(launch.node))))
                        for a in launch.argv)
        lines.append(f"  [{launch.node}] {gpus}{env + ' ' if env else ''}{argv}")
    return "\n".join(lines) + "\n"


def expand_hostlist(text: str) -> list[str]:
    """Expand a Slurm host list (``gpu[01-03,07],login1``) as ``scontrol show hostnames``
    does for the common forms: one bracket group per name, ranges keep zero padding."""
    names: list[str] = []
    for part in _split_top_level(text.strip(), text):
        match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if match is None:
            if "[" in part or "]" in part:
                raise ConfigError(f"cannot expand host list {text!r}")
            names.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        if "[" in suffix:
            raise ConfigError(f"host list {text!r}: only one bracket group per name is supported")
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ConfigError(f"cannot expand host list {text!r}")
            width = len(lo)
            for value in range(int(lo), int(hi or lo) + 1):
                names.append(f"{prefix}{value:0{width}d}{suffix}")
    return names


def _split_top_level(text: str, whole: str) -> list[str]:
    """Split on commas outside brackets; refuse unbalanced brackets and empty names."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ConfigError(f"cannot expand host list {whole!r}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    if depth or any(not p for p in parts):
        raise ConfigError(f"cannot expand host list {whole!r}")
    return parts
