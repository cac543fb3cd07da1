"""``p2pkv router``: argv to :class:`RouterConfig`, then serve on a socket bound here (port 0
picks a free port; ``--ready-file`` receives the URL once it listens)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

logger = logging.getLogger(__name__)


def _specs(values: list[str] | None):
    from p2pkv.router.pool import InstanceSpec

    out = []
    for value in values or ():
        out.extend(InstanceSpec.parse(v) for v in value.split(",") if v)
    return tuple(out)


def add_router_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("router", help="OpenAI-compatible KV-aware router and P/D proxy")
    p.add_argument("--instances", action="append", metavar="ID=URL[,ID=URL]",
                   help="instances to balance across (ID: the engine_id in its kv-transfer-config)")
    p.add_argument("--prefill", action="append", metavar="ID=URL[,ID=URL]",
                   help="prefill instances (kv_role kv_producer)")
    p.add_argument("--decode", action="append", metavar="ID=URL[,ID=URL]",
                   help="decode instances (kv_role kv_consumer)")
    p.add_argument("--model", required=True, help="the model directory (for its tokenizer)")
    p.add_argument("--directory", default=None,
                   help="directory endpoint, or shards as PRIMARY[|REPLICA],... in the "
                        "connectors' order; without it the router balances by load only")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--credential-file",
                      default=os.environ.get("P2PKV_CREDENTIAL_FILE", ""),
                      help="a reader credential (`p2pkv credential --reader`): the directory "
                           "lets it only look up and follow the feed (env "
                           "P2PKV_CREDENTIAL_FILE); preferred over the secret")
    keys.add_argument("--secret-file", default=os.environ.get("P2PKV_SECRET_FILE", ""),
                      help="the cluster secret (the router then uses its read-only keys)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ready-file", type=Path, default=None)
    p.add_argument("--block-size", type=int, default=128, help="the instances' block size")
    p.add_argument("--chunk-tokens", type=int, default=128, help="the connector's chunk_tokens")
    p.add_argument("--hash-algorithm", default="sha256",
                   help="the instances' --prefix-caching-hash-algo")
    p.add_argument("--tokens-per-request", type=int, default=1024,
                   help="cached tokens one in-flight request beyond the slack is worth")
    p.add_argument("--slack", type=int, default=2,
                   help="extra in-flight requests a holder may have for free")
    p.add_argument("--planner", default="", metavar="PROFILE",
                   help="route by the planner's expected TTFT with this cost profile "
                        "(planner/profiles.py, e.g. llama3.1-8b-h100); default: by the "
                        "cache-affinity score")
    p.add_argument("--spread", type=float, default=0.1,
                   help="with --planner: candidates expected within this fraction of the "
                        "best count as equal (the least busy wins)")
    p.add_argument("--publish-wait-s", type=float, default=2.0)
    p.add_argument("--health-interval-s", type=float, default=1.0)
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--max-body-mib", type=float, default=32.0,
                   help="larger request bodies are refused with 413")
    p.add_argument("--api-key", default=os.environ.get("P2PKV_ROUTER_API_KEY", ""),
                   help="clients must send 'Authorization: Bearer KEY' (env "
                        "P2PKV_ROUTER_API_KEY); the header is passed on to the instances "
                        "either way, so instances started with vLLM's --api-key work")
    p.set_defaults(func=run_router)


def run_router(args: argparse.Namespace) -> int:
    import uvicorn

    from p2pkv.router.app import Router, RouterConfig, build_app
    from p2pkv.router.holdings import Holdings
    from p2pkv.router.policy import Policy
    from p2pkv.router.prompts import PromptKeyer
    from p2pkv.credential import load_reader_credential
    from p2pkv.secret import load_secret

    config = RouterConfig(instances=_specs(args.instances), prefill=_specs(args.prefill),
                          decode=_specs(args.decode),
                          policy=Policy(args.tokens_per_request, args.slack,
                                        planner=args.planner, spread=args.spread),
                          publish_wait_s=args.publish_wait_s,
                          health_interval_s=args.health_interval_s,
                          request_timeout_s=args.request_timeout_s,
                          max_body_bytes=int(args.max_body_mib * (1 << 20)),
                          api_key=args.api_key)
    keyer = PromptKeyer(args.model, block_size=args.block_size,
                        chunk_tokens=args.chunk_tokens, hash_algorithm=args.hash_algorithm)
    credential = (load_reader_credential(args.credential_file).directory
                  if args.credential_file else None)
    secret = (load_secret(args.secret_file) if args.secret_file and credential is None
              else None)
    holdings = Holdings(args.directory, secret=secret, credential=credential,
                        probe=keyer.probe)
    router = Router(config, keyer, holdings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    url = f"http://{args.host}:{sock.getsockname()[1]}"
    mode = ("%d prefill / %d decode" % (len(config.prefill), len(config.decode))
            if config.disaggregated else "%d instances" % len(config.instances))
    logger.info("p2pkv router on %s: %s, directory %s", url, mode, args.directory or "none")
    server = uvicorn.Server(uvicorn.Config(build_app(router), log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=5))
    if args.ready_file is not None:
        # Written once the app's startup ran (the feed thread and health loop are going).
        async def _announce() -> None:
            import asyncio

            while not server.started:
                await asyncio.sleep(0.05)
            args.ready_file.write_text(url)

        _serve_and_announce(server, sock, _announce)
    else:
        server.run(sockets=[sock])
    return 0


def _serve_and_announce(server, sock: socket.socket, announce) -> None:
    import asyncio

    async def main() -> None:
        task = asyncio.create_task(announce())
        await server.serve(sockets=[sock])
        task.cancel()

    asyncio.run(main())
