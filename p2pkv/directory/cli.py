"""The ``p2pkv directory`` and ``p2pkv status`` subcommands, and the directory's process.

``p2pkv/cli.py`` calls :func:`add_directory_parser` and :func:`add_status_parser` on its
argparse subparsers; each sets ``func`` (args -> exit code). :func:`directory_main` runs the
directory alone, for ``python -m p2pkv.directory`` (tests). :func:`run_directory` owns the
process around a ``DirectoryServer``: signals, the ready file, the metrics endpoint; the
server itself knows nothing of them.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from p2pkv.directory.protocol import (
    HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS, MAX_REGISTRATIONS_PER_CONNECTION, Error, Stats,
    StatsReply,
)
from p2pkv.errors import ConfigError
from p2pkv.keys import InstanceId
from p2pkv.secret import ClusterSecret, load_secret

if TYPE_CHECKING:
    from p2pkv.directory.server import ServerConfig

logger = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:7420"
"""User-facing default, also the port ``launch/plan.py`` gives the directory; tests pass
port 0 and read --ready-file."""


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
    _add_secret_arg(parser)
    parser.set_defaults(func=_run_status)
    return parser


def add_credential_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``credential``: write one instance's credential file, or the router's read-only
    one, from the cluster secret."""
    parser = subparsers.add_parser(
        "credential", help="write an instance's credential file (its directory keys and the "
                           "data plane's secret, derived from the cluster secret; not the "
                           "secret): give it to the instance as credential_file; or, with "
                           "--reader, the router's read-only one (--credential-file)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--instance",
                     help="the instance id (vLLM engine_id); covers its ranks ID/<n> too")
    who.add_argument("--reader", action="store_true",
                     help="a read-only credential (lookups and the change feed; no writes, no "
                          "data plane): the router's")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="file to write (mode 0600)")
    _add_secret_arg(parser)
    parser.set_defaults(func=_run_credential)
    return parser


def _run_credential(args: argparse.Namespace) -> int:
    from p2pkv.credential import credential_for, reader_credential_for, write_credential

    try:
        secret = _secret(args)
        if secret is None:
            raise ConfigError("a credential is derived from the cluster secret: pass "
                              "--secret-file (or set P2PKV_SECRET_FILE)")
        write_credential(args.out, reader_credential_for(secret) if args.reader
                         else credential_for(secret, InstanceId(args.instance)))
    except (ConfigError, OSError) as e:
        print(f"p2pkv credential: {e}", file=sys.stderr)
        return 2
    return 0


def directory_main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m p2pkv.directory [--bind ...]``."""
    parser = argparse.ArgumentParser(prog="p2pkv-directory",
                                     description="run the p2pkv directory service")
    _add_directory_args(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _run_directory(args)


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def _add_directory_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    parser.add_argument("--bind", default=env.get("P2PKV_DIRECTORY_BIND", DEFAULT_BIND),
                        help=f"ZeroMQ endpoint to bind; port 0 picks a free one "
                             f"(env P2PKV_DIRECTORY_BIND, default {DEFAULT_BIND})")
    parser.add_argument("--feed-bind", default=env.get("P2PKV_DIRECTORY_FEED_BIND", ""),
                        help="change-feed (PUB) endpoint (default: the bind host, free port; "
                             "env P2PKV_DIRECTORY_FEED_BIND)")
    _add_secret_arg(parser)
    parser.add_argument("--insecure-any-address", action="store_true",
                        help="allow a non-loopback bind without a secret (trusted networks)")
    parser.add_argument("--heartbeat-interval", type=float,
                        default=_env_float("P2PKV_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL_S),
                        metavar="SECONDS",
                        help=f"instances heartbeat this often (env P2PKV_HEARTBEAT_INTERVAL, "
                             f"default {HEARTBEAT_INTERVAL_S:g})")
    parser.add_argument("--liveness", type=int,
                        default=int(_env_float("P2PKV_HEARTBEAT_LIVENESS", HEARTBEAT_LIVENESS)),
                        help=f"missed heartbeats before a lease expires "
                             f"(env P2PKV_HEARTBEAT_LIVENESS, default {HEARTBEAT_LIVENESS})")
    parser.add_argument("--max-registrations-per-connection", type=int,
                        default=MAX_REGISTRATIONS_PER_CONNECTION, metavar="N",
                        help="instance ids one client connection (with a secret: one "
                             "instance credential) may register (default "
                             f"{MAX_REGISTRATIONS_PER_CONNECTION}; a simulated fleet needs more)")
    parser.add_argument("--lookups-in-arrival-order", action="store_true",
                        help="handle every message in the order read, instead of answering "
                             "Lookups ahead of other connections' writes (for comparison)")
    parser.add_argument("--metrics-port", type=int,
                        default=int(env["P2PKV_METRICS_PORT"]) if env.get("P2PKV_METRICS_PORT")
                        else None,
                        help="serve Prometheus metrics on this port (env P2PKV_METRICS_PORT; "
                             "default off; 0 picks a free one)")
    parser.add_argument("--metrics-host", default=env.get("P2PKV_METRICS_HOST", "127.0.0.1"),
                        help="address of the metrics endpoint (default 127.0.0.1)")
    parser.add_argument("--ready-file", metavar="PATH",
                        help="write the real endpoint here once bound")


def _add_secret_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--secret-file", default=os.environ.get("P2PKV_SECRET_FILE", ""),
                        metavar="PATH",
                        help="cluster secret file (env P2PKV_SECRET_FILE); without one the "
                             "directory is unauthenticated and stays on loopback")


def _secret(args: argparse.Namespace) -> ClusterSecret | None:
    return load_secret(args.secret_file) if args.secret_file else None


def _run_directory(args: argparse.Namespace) -> int:
    from p2pkv.directory.server import ServerConfig

    try:
        config = ServerConfig(bind=args.bind, feed_bind=args.feed_bind, secret=_secret(args),
                              insecure_any_address=args.insecure_any_address,
                              heartbeat_interval_s=args.heartbeat_interval,
                              liveness=args.liveness,
                              max_registrations_per_connection=(
                                  args.max_registrations_per_connection),
                              lookups_first=not args.lookups_in_arrival_order)
    except ConfigError as e:
        print(f"p2pkv directory: {e}", file=sys.stderr)
        return 2
    return run_directory(config, ready_file=args.ready_file, metrics_port=args.metrics_port,
                         metrics_host=args.metrics_host)


def run_directory(config: ServerConfig, ready_file: str | None = None,
                  metrics_port: int | None = None, metrics_host: str = "127.0.0.1") -> int:
    """Serve until SIGINT/SIGTERM; the ``p2pkv directory`` command. Returns an exit code.

    ``ready_file`` receives the real endpoint (one line) once bound, written atomically
    (the feed endpoint is in every StatsReply and SnapshotReply). ``metrics_port`` starts a
    Prometheus endpoint.
    """
    from p2pkv.directory.server import DirectoryServer
    from p2pkv.heaptrim import HeapTrimmer

    server = DirectoryServer(config)
    stop = threading.Event()
    trimmer = HeapTrimmer()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("directory got signal %s", signum)
        stop.set()

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = ({sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
                if in_main_thread else {})
    try:
        if metrics_port is not None:
            from p2pkv.directory.metrics import start_metrics

            port = start_metrics(server, metrics_host, metrics_port)
            logger.info("Prometheus metrics on http://%s:%s/metrics", metrics_host, port)
        if ready_file:
            _write_ready_file(ready_file, server.endpoint)
        logger.info("p2pkv directory listening on %s", server.endpoint)
        if not server.secure:
            logger.warning("p2pkv directory is UNAUTHENTICATED (no --secret-file)")
        # NOTE: the start-up's objects (modules, classes, functions: ~10^5 tracked by the
        # cyclic GC) never die; frozen, a full collection no longer walks them while lookups
        # wait (measured: 66 ms for one right after the imports). The index holds no object
        # the GC visits (index.py), so what it traverses later is the little the loop makes.
        gc.collect()
        gc.freeze()
        # what a burst of connections allocated goes back to the kernel once they close
        # (heaptrim.py: glibc kept a 600-socket flood's +3 MiB resident for good)
        trimmer.start()
        server.serve(stop)
    finally:
        trimmer.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
    return 0


def _write_ready_file(path: str, endpoint: str) -> None:
    """Atomically: a reader polling for the file never sees it half written."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(endpoint + "\n")
    os.replace(tmp, path)


def _run_status(args: argparse.Namespace) -> int:
    from p2pkv.directory.client import DirectoryClient

    try:
        secret = _secret(args)
    except ConfigError as e:
        print(f"p2pkv status: {e}", file=sys.stderr)
        return 2
    client = DirectoryClient(args.directory, secret=secret)
    try:
        reply = client.call(Stats(), timeout_s=args.timeout)
    finally:
        client.close()
    if reply is None:
        print(f"p2pkv status: no answer from the directory at {args.directory} "
              f"within {args.timeout:g} s (down, or a wrong/missing --secret-file?)",
              file=sys.stderr)
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
    """Render a StatsReply as a table of instances and lines of totals."""
    out.write(f"directory {endpoint} (epoch {reply.directory_epoch}, protocol v{reply.v}, "
              f"{'CURVE' if reply.secure else 'unauthenticated'}, feed {reply.feed_endpoint})\n")
    header = ("INSTANCE", "ADDRESS", "EPOCH", "CHUNKS", "LEASE", "LEASED", "COUNTERS")
    rows = [(i.instance, i.address, str(i.epoch), str(i.chunks), f"{i.lease_left_ms / 1000:.1f}s",
             f"{i.leased_chunks} ({i.lease_ends_ms / 1000:.1f}s)" if i.leased_chunks else "-",
             " ".join(f"{k}={v}" for k, v in sorted(i.counters.items())) or "-")
            for i in reply.instances]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        out.write("  ".join([*cells, row[-1]]) + "\n")
    if not rows:
        out.write("(no instances registered)\n")
    for r in reply.refused:
        out.write(f"REFUSED {r.instance} at {r.address} ({r.status}, {r.count}x, last "
                  f"{r.age_ms / 1000:.1f}s ago): {r.reason}\n")
    ratio = reply.keys_hit / reply.keys_looked_up if reply.keys_looked_up else 0.0
    out.write(f"chunks {reply.chunks}  publishes {reply.publishes}  heartbeats "
              f"{reply.heartbeats}  expirations {reply.expirations}  feed seq {reply.feed_seq}\n")
    out.write(f"lookups {reply.lookups}  keys looked up {reply.keys_looked_up}  "
              f"keys hit {reply.keys_hit}  hit ratio {ratio:.1%}  "
              f"rejected {reply.rejected}\n")
