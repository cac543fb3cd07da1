"""What tests/test_slurm_vllm.py asks from inside the Slurm cluster's network (the test
process itself is outside it): one JSON object on stdout per call.

    python -m tests.slurm_client health URL
    python -m tests.slurm_client ask ROUTER_URL PARTS MAX_TOKENS
    python -m tests.slurm_client stats tcp://HOST:PORT SECRET_FILE
"""

from __future__ import annotations

import json
import sys

import httpx


def health(url: str) -> dict:
    try:
        return {"status": httpx.get(url + "/health", timeout=3.0).status_code}
    except httpx.HTTPError as e:
        return {"status": 0, "error": f"{type(e).__name__}: {e}"}


def ask(url: str, parts: int, max_tokens: int) -> dict:
    from p2pkv.harness.documents import document_messages, document_part

    document = document_part(0, parts)  # a 1/PARTS slice of the bundled document
    body = {"model": "model", "messages": document_messages(document, "What is it about?"),
            "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600.0)
    reply = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    return {"status": r.status_code, "headers": {k: v for k, v in r.headers.items()
                                                 if k.startswith("x-p2pkv")},
            "text": reply.get("choices", [{}])[0].get("message", {}).get("content", ""),
            "usage": reply.get("usage", {}), "body": r.text[:2000] if r.status_code != 200 else ""}


def stats(endpoint: str, secret_file: str) -> dict:
    from p2pkv.directory.client import DirectoryClient
    from p2pkv.directory.protocol import Stats, StatsReply
    from p2pkv.secret import load_secret

    client = DirectoryClient(endpoint, secret=load_secret(secret_file))
    try:
        reply = client.call(Stats(), 5.0)
    finally:
        client.close()
    if not isinstance(reply, StatsReply):
        return {"error": repr(reply)}
    return {"secure": reply.secure, "chunks": reply.chunks, "keys_hit": reply.keys_hit,
            "instances": {i.instance: {"address": i.address, "chunks": i.chunks,
                                       "counters": dict(i.counters)} for i in reply.instances}}


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "health":
        out = health(args[0])
    elif command == "ask":
        out = ask(args[0], int(args[1]), int(args[2]))
    elif command == "stats":
        out = stats(args[0], args[1])
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
