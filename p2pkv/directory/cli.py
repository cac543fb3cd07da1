"""The ``p2pkv directory`` and ``p2pkv status`` subcommands.

``p2pkv/cli.py`` calls :func:`add_directory_parser` and :func:`add_status_parser` on its
argparse subparsers; each sets ``func`` (args -> exit code). :func:`directory_main` runs the
directory alone, for ``python -m p2pkv.directory.server`` (tests, launch scripts).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, TextIO

from p2pkv.directory.protocol import Error, Stats, StatsReply

DEFAULT_BIND = "tcp://127.0.0.1:7420"
"""User-facing default; tests and launch scripts pass port 0 and read --ready-file."""


def add_directory_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``directory``: run the directory service until SIGINT/SIGTERM."""
    parser = subparsers.add_parser("directory", help="run the p2pkv directory service")
    _add_directory_args(parser)
    parser.set_defaults(func=_run_directory)
    return parser


def add_status_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``status``: print the directory's instances, counters and lookup totals."""
    parser = subparsers.add_parser("status", help="show what a p2pkv directory knows")
    parser.add_argument("--directory", required=True, metavar="tcp://HOST:PORT",
                        help="directory endpoint")
    parser.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS",
                        help="give up after this long without an answer (default 2)")
    parser.set_defaults(func=_run_status)
    return parser


def directory_main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m p2pkv.directory.server [--bind ...]``."""
    parser = argparse.ArgumentParser(prog="p2pkv-directory",
                                     description="run the p2pkv directory service")
    _add_directory_args(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _run_directory(args)


def _add_directory_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bind", default=DEFAULT_BIND,
                        help=f"ZeroMQ endpoint to bind; port 0 picks a free one "
                             f"(default {DEFAULT_BIND})")
    parser.add_argument("--ready-file", metavar="PATH",
                        help="write the real endpoint here once bound")


def _run_directory(args: argparse.Namespace) -> int:
    from p2pkv.directory.server import run_directory

    return run_directory(args.bind, ready_file=args.ready_file)


def _run_status(args: argparse.Namespace) -> int:
    from p2pkv.directory.client import DirectoryClient

    client = DirectoryClient(args.directory)
    try:
        reply = client.call(Stats(), timeout_s=args.timeout)
    finally:
        client.close()
    if reply is None:
        print(f"p2pkv status: no answer from the directory at {args.directory} "
              f"within {args.timeout:g} s", file=sys.stderr)
        return 1
    if isinstance(reply, Error):
        print(f"p2pkv status: the directory refused: {reply.reason}", file=sys.stderr)
        return 1
    if not isinstance(reply, StatsReply):
        print(f"p2pkv status: unexpected reply {type(reply).__name__}", file=sys.stderr)
        return 1
    print_status(reply, args.directory, sys.stdout)
    return 0


def print_status(reply: StatsReply, endpoint: str, out: TextIO) -> None:
    """Render a StatsReply as a table of instances and a line of lookup totals."""
    out.write(f"directory {endpoint} (epoch {reply.directory_epoch}, protocol v{reply.v})\n")
    header = ("INSTANCE", "ADDRESS", "EPOCH", "CHUNKS", "COUNTERS")
    rows = [(i.instance, i.address, str(i.epoch), str(i.chunks),
             " ".join(f"{k}={v}" for k, v in sorted(i.counters.items())) or "-")
            for i in reply.instances]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        out.write("  ".join([*cells, row[-1]]) + "\n")
    if not rows:
        out.write("(no instances registered)\n")
    ratio = reply.keys_hit / reply.keys_looked_up if reply.keys_looked_up else 0.0
    out.write(f"lookups {reply.lookups}  keys looked up {reply.keys_looked_up}  "
              f"keys hit {reply.keys_hit}  hit ratio {ratio:.1%}  "
              f"rejected {reply.rejected}\n")
