"""The ``p2pkv`` command: ``directory``, ``status``, ``doctor``, ``router``, ``demo``, ``model``,
``bench``, ``launch``.

The only place (with launch scripts) that reads argv and environment variables and calls
``logging.basicConfig``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from p2pkv.directory.cli import add_credential_parser, add_directory_parser, add_status_parser
from p2pkv.doctor.cli import add_doctor_parser
from p2pkv.launch.cli import add_launch_parser
from p2pkv.router.cli import add_router_parser


def _add_model_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="prepare the demo model (SmolLM2-135M)")
    parser.add_argument("action", choices=["prepare"])
    parser.add_argument("--cache-dir", default=None)

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from p2pkv.harness.demo_model import prepare

        print(prepare(Path(args.cache_dir) if args.cache_dir else None))
        return 0

    parser.set_defaults(func=run)


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    from p2pkv.demo import add_demo_args, run_demo

    parser = subparsers.add_parser(
        "demo", help="laptop demo: directory + two vLLM CPU instances + long-document QA")
    add_demo_args(parser)
    parser.set_defaults(func=run_demo)


BENCHES = ("directory", "index", "transport", "ttft", "correctness", "router", "disagg", "trace",
           "faults", "serve", "save")
"""Each is a module ``p2pkv.bench.NAME`` with ``add_args(parser)`` and ``main(args) -> int``."""


def _add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    import importlib

    parser = subparsers.add_parser("bench", help="benchmarks and the correctness suite")
    benches = parser.add_subparsers(dest="bench", required=True)
    for name in BENCHES:
        try:
            module = importlib.import_module(f"p2pkv.bench.{name}")
        except ImportError:
            continue  # a bench whose optional dependencies are missing is not offered
        sub = benches.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_args(sub)
        sub.set_defaults(func=module.main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pkv", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_directory_parser(subparsers)
    add_status_parser(subparsers)
    add_credential_parser(subparsers)
    add_doctor_parser(subparsers)
    add_router_parser(subparsers)
    _add_demo_parser(subparsers)
    _add_model_parser(subparsers)
    _add_bench_parser(subparsers)
    add_launch_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
