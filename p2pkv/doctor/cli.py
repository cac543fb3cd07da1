"""The ``p2pkv doctor`` subcommand: run :func:`p2pkv.doctor.checks.diagnose`, print a table
(or ``--json``), exit 0 when no check found an error, 1 otherwise, 2 on a usage error."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from p2pkv.errors import ConfigError
from p2pkv.secret import load_secret
from p2pkv.transport.choose import TRANSPORT_KINDS


def add_doctor_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "doctor", help="check a cluster from this host: directory, hash probes, data planes")
    parser.add_argument("--directory", required=True, metavar="tcp://HOST:PORT",
                        help="directory endpoint")
    parser.add_argument("--secret-file", default=os.environ.get("P2PKV_SECRET_FILE", ""),
                        metavar="PATH", help="cluster secret file (env P2PKV_SECRET_FILE)")
    parser.add_argument("--transport", choices=TRANSPORT_KINDS, default="auto",
                        help="the transport this host's instances use (default auto)")
    parser.add_argument("--store-gib", type=float, default=2.0,
                        help="their store size, for auto's /dev/shm check (default 2)")
    parser.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS",
                        help="deadline of each network wait (default 2)")
    parser.add_argument("--kv-memory", choices=("auto", "host", "gpu"), default="auto",
                        help="where this host's instances keep their KV cache, which decides "
                             "the path of a pull (default auto: gpu when an NVIDIA device is "
                             "visible here)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_run)
    return parser


def _visible_kv_memory() -> str:
    """``gpu`` when an NVIDIA device node is visible (no CUDA import: the doctor stays fast)."""
    try:
        gpus = [n for n in os.listdir("/dev") if n.startswith("nvidia") and n[6:].isdigit()]
    except OSError:
        gpus = []
    return "gpu" if gpus else "host"


def _run(args: argparse.Namespace) -> int:
    from p2pkv.doctor.checks import DoctorConfig, diagnose
    from p2pkv.doctor.report import to_json, to_table

    try:
        config = DoctorConfig(
            directory=args.directory,
            secret=load_secret(args.secret_file) if args.secret_file else None,
            transport=args.transport, store_bytes=int(args.store_gib * (1 << 30)),
            timeout_s=args.timeout,
            kv_memory=args.kv_memory if args.kv_memory != "auto" else _visible_kv_memory())
    except ConfigError as e:
        print(f"p2pkv doctor: {e}", file=sys.stderr)
        return 2
    report = diagnose(config)
    if args.json:
        sys.stdout.buffer.write(to_json(report) + b"\n")
    else:
        sys.stdout.write(to_table(report))
    sys.stdout.flush()
    return report.exit_code
