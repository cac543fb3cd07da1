"""The router's cases of ``p2pkv bench faults``: a real ``Router`` (uvicorn, its own process)
in front of two stand-in OpenAI servers (their own processes; each answers a completion with
its prompt reversed, so every answer can be checked), loaded by concurrent clients while the
router is put under one fault:

    flood       600 sockets to the router's port that never send a byte, from 127.0.0.2
    malformed   10,000 malformed requests: garbage, bad and deep JSON, bad lengths
    1 GB body   one request streaming 1 GB: it must get 413 long before the end

Used by :mod:`p2pkv.bench.faults` (which prints the table). No vLLM: routing by load.
"""

# NOTE: no "from __future__ import annotations" here: FastAPI reads the stand-in's handler
# annotations at run time, and Request is imported inside _backend.
import asyncio
import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import Callable

from p2pkv.bench.faults.row import Row, hold_silent_sockets, rss_mib

CLIENTS = 16
MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{nope",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 200001\r\n\r\n"
    + b"[" * 100_000 + b"]" * 100_001,
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n[1, 2]",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n\r\n"
    b'{"messages": 5}',
]


def _serve(app, pipe) -> None:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False))

    async def main() -> None:
        async def announce() -> None:
            while not server.started:
                await asyncio.sleep(0.02)
            pipe.send((f"http://127.0.0.1:{sock.getsockname()[1]}", os.getpid()))
        task = asyncio.create_task(announce())
        await server.serve(sockets=[sock])
        task.cancel()

    asyncio.run(main())


def _backend(pipe) -> None:
    from fastapi import FastAPI, Request

    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        body = await request.json()
        return {"choices": [{"index": 0, "text": str(body.get("prompt", ""))[::-1]}]}

    _serve(app, pipe)


def _router(urls: list[str], pipe) -> None:
    from p2pkv.keys import InstanceId
    from p2pkv.router.app import Router, RouterConfig, build_app
    from p2pkv.router.holdings import Holdings
    from p2pkv.router.pool import InstanceSpec

    config = RouterConfig(instances=tuple(InstanceSpec(InstanceId(f"i{n}"), u)
                                          for n, u in enumerate(urls)))
    _serve(build_app(Router(config, None, Holdings(None))), pipe)


def _start(ctx, target, *args) -> tuple[mp.Process, str, int]:
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, theirs), daemon=True)
    proc.start()
    url, pid = mine.recv()
    return proc, url, pid


def _load(url: str, seconds: float, row: Row) -> None:
    import httpx

    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(n: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            i = 0
            while time.monotonic() < end:
                prompt = f"client {n} request {i}"
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/completions", json={"prompt": prompt})
                    good = r.status_code == 200 and r.json()["choices"][0]["text"] == prompt[::-1]
                except (httpx.HTTPError, ValueError, KeyError):
                    good = False
                with lock:
                    row.sent += 1
                    row.correct += good
                    row.failed += not good
                    row.slowest_ms = max(row.slowest_ms, (time.monotonic() - t0) * 1000)
                i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _flood(url: str, stop, count, other) -> None:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    hold_silent_sockets(host, int(port), stop, count)


def _malformed(url: str, stop, count, other) -> None:
    """``count``: requests sent; ``other``: answers that were not a 4xx."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    for i in range(10_000):
        if stop.is_set():
            return
        try:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(MALFORMED[i % len(MALFORMED)])
                head = s.recv(64)
            if head[9:10] != b"4":  # "HTTP/1.1 4xx": every one must be a client error
                other.value += 1
            count.value += 1
        except OSError:
            count.value += 1


def _big_body(url: str, stop, count, other) -> None:
    """Stream up to 1 GB; ``count``: MiB sent before the router answered, ``other``: its
    status."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    block = b" " * (1 << 20)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        s.setblocking(False)
        for _ in range(1024):
            try:
                head = s.recv(64)
                if head.startswith(b"HTTP/1.1 "):
                    other.value = int(head[9:12])
                    return
            except BlockingIOError:
                pass
            except OSError:
                break
            s.setblocking(True)
            try:
                s.sendall(b"100000\r\n" + block + b"\r\n")
            except OSError:
                break
            s.setblocking(False)
            count.value += 1
            if stop.is_set():
                return


def case(name: str, seconds: float, fault: Callable | None,
         describe: Callable[[int, int], str] = lambda n, o: "-") -> Row:
    ctx = mp.get_context("spawn")
    backends = [_start(ctx, _backend) for _ in range(2)]
    router, url, pid = _start(ctx, _router, [b[1] for b in backends])
    row = Row(name)
    try:
        _load(url, 0.5, Row("warm-up"))
        row.rss_before = rss_mib(pid)
        stop, count, other = ctx.Event(), ctx.Value("q", 0), ctx.Value("q", 0)
        proc = ctx.Process(target=fault, args=(url, stop, count, other), daemon=True) \
            if fault else None
        if proc is not None:
            proc.start()
            time.sleep(1.0)
        _load(url, seconds, row)
        if proc is not None:
            t_end = time.monotonic() + 300
            while fault is not _flood and proc.is_alive() and time.monotonic() < t_end:
                _load(url, 1.0, row)  # a fault of fixed size: the load goes on to its end
            stop.set()
            proc.join(5)
            row.fault = describe(count.value, other.value)
        time.sleep(1.0)
        row.rss_after = rss_mib(pid)
        row.recover_s = 0.0 if router.is_alive() else None
    finally:
        for proc in [router, *(b[0] for b in backends)]:
            proc.kill()
            proc.join(5)
    return row


def run(seconds: float) -> list[Row]:
    return [case("r-baseline", seconds, None),
            case("r-flood", seconds, _flood, lambda n, o: f"{n} silent sockets held"),
            case("r-malform", seconds, _malformed,
                 lambda n, o: f"{n} malformed requests, {o} answered other than 4xx"),
            case("r-1GB", seconds, _big_body,
                 lambda n, o: f"1 GB body: answered {o or 'nothing'} after {n} MiB")]
