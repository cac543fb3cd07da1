"""``p2pkv launch plan`` and ``p2pkv launch node``: the Python half of launch/slurm/.

``p2pkv/cli.py`` calls :func:`add_launch_parser`. This module (with the scripts in launch/)
is where flags and the ``SLURM_*``, ``UCX_*`` and ``P2PKV_*`` variables are read; everything
else gets typed values (:class:`~p2pkv.launch.plan.ClusterSpec`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from p2pkv.errors import ConfigError
from p2pkv.launch.plan import ClusterSpec, Plan, expand_hostlist, make_plan, render

UCX_PASSED = ("UCX_TLS", "UCX_NET_DEVICES", "UCX_IB_GID_INDEX", "UCX_RNDV_THRESH",
              "UCX_MAX_RNDV_RAILS", "UCX_LOG_LEVEL")
"""UCX settings copied from the environment into every instance's plan entry (and shown)."""


def add_launch_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("launch", help="plan and run a p2pkv cluster (Slurm)")
    sub = parser.add_subparsers(dest="launch", required=True)
    plan = sub.add_parser("plan", help="print (and write) what would start where")
    _add_plan_args(plan)
    plan.set_defaults(func=_run_plan)
    node = sub.add_parser("node", help="run this node's share of a plan until stopped")
    node.add_argument("--plan", required=True, help="plan JSON written by `launch plan --out`")
    node.add_argument("--node", default=os.environ.get("SLURMD_NODENAME", ""),
                      help="this node's name in the plan (default $SLURMD_NODENAME, else the "
                           "short hostname)")
    node.add_argument("--iface", default=os.environ.get("P2PKV_IFACE", ""),
                      help="take this interface's IPv4 address as the node's cluster address "
                           "(env P2PKV_IFACE; default: what the node name resolves to)")
    node.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                      help="SIGTERM-to-SIGKILL grace for the processes (default 30)")
    node.set_defaults(func=_run_node)
    return parser


def _slurm_gpus(env: dict[str, str]) -> int:
    """GPUs per node from Slurm: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("4", "h100:4")."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(name, "").rsplit(":", 1)[-1]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    env = os.environ
    p.add_argument("--model", required=True, help="model path or name for every instance")
    p.add_argument("--nodes", default=env.get("SLURM_JOB_NODELIST", ""),
                   help="host list, e.g. gpu[01-02] (default $SLURM_JOB_NODELIST)")
    p.add_argument("--gpus-per-node", type=int, default=_slurm_gpus(dict(env)),
                   help="default $SLURM_GPUS_ON_NODE or $SLURM_GPUS_PER_NODE")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size per instance")
    p.add_argument("--cpu-instances", type=int, default=0, metavar="N",
                   help="vLLM's CPU backend: N instances per node, no GPUs (submit with "
                        "sbatch --gpus-per-node=0 on a cluster without GPUs)")
    p.add_argument("--prefill", type=int, default=0,
                   help="P/D: the first N instances prefill, the rest decode (default 0: off)")
    p.add_argument("--job-dir", default=env.get("P2PKV_JOB_DIR", ""),
                   help="job-private directory on a filesystem all nodes see (env "
                        "P2PKV_JOB_DIR): logs, addresses, the plan")
    p.add_argument("--secret-file", default=env.get("P2PKV_SECRET_FILE", ""),
                   help="cluster secret file (env P2PKV_SECRET_FILE; default JOB_DIR/secret)")
    p.add_argument("--served-model-name", default="model")
    p.add_argument("--transport", default=env.get("P2PKV_TRANSPORT", "auto"),
                   help="connector transport (auto picks ucx where ucxx is installed)")
    p.add_argument("--store-gib", type=float, default=0.0,
                   help="host memory per instance for saved chunks (default: connector's)")
    p.add_argument("--vllm-command", default=env.get("P2PKV_VLLM_COMMAND", "vllm serve"),
                   help="how to start vLLM (CPU wheel: 'python3 -m "
                        "vllm.entrypoints.openai.api_server')")
    p.add_argument("--python", default=env.get("P2PKV_PYTHON", "python3"),
                   help="interpreter that has p2pkv on the nodes (env P2PKV_PYTHON)")
    p.add_argument("--directory-port", type=int, default=7420)
    p.add_argument("--feed-port", type=int, default=7421)
    p.add_argument("--vllm-port", type=int, default=8000)
    p.add_argument("--router-port", type=int, default=9000)
    p.add_argument("--out", default="", help="also write the plan as JSON here")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER,
                   help="after --: extra arguments for every vLLM instance")


def spec_from_args(args: argparse.Namespace, env: dict[str, str]) -> ClusterSpec:
    job_dir = args.job_dir or f"{Path.home()}/.cache/p2pkv/jobs/{env.get('SLURM_JOB_ID', 'local')}"
    extra = list(args.vllm_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return ClusterSpec(
        nodes=tuple(expand_hostlist(args.nodes)) if args.nodes else (),
        gpus_per_node=args.gpus_per_node, model=args.model, job_dir=job_dir,
        secret_file=args.secret_file or f"{job_dir}/secret", tp=args.tp,
        cpu_instances=args.cpu_instances,
        prefill=args.prefill, served_model_name=args.served_model_name,
        transport=args.transport, store_gib=args.store_gib,
        vllm_command=tuple(shlex.split(args.vllm_command)), vllm_args=tuple(extra),
        p2pkv_command=(args.python, "-m", "p2pkv"), directory_port=args.directory_port,
        feed_port=args.feed_port, vllm_port=args.vllm_port, router_port=args.router_port,
        ucx_env={k: env[k] for k in UCX_PASSED if env.get(k)})


def _run_plan(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(spec_from_args(args, dict(os.environ)))
    except ConfigError as e:
        print(f"p2pkv launch plan: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(render(plan))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(plan.to_json())
    return 0


def _run_node(args: argparse.Namespace) -> int:
    from p2pkv.launch.node import NodeRunner, resolve_address

    node = args.node or socket.gethostname().split(".")[0]
    try:
        plan = Plan.from_json(Path(args.plan).read_bytes())
        address = resolve_address(node, args.iface)
    except (ConfigError, OSError) as e:
        print(f"p2pkv launch node: {e}", file=sys.stderr)
        return 2
    runner = NodeRunner(plan, node, address, grace_s=args.grace)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: runner.stop.set())
    print(f"p2pkv launch node: {node} at {address}: {len(plan.on(node))} process(es)",
          flush=True)
    return runner.run()
