"""The router's HTTP side: an OpenAI-compatible proxy (FastAPI, uvicorn, httpx).

Per request: name the prompt's chunks (:mod:`p2pkv.router.prompts`), choose an instance
(:mod:`p2pkv.router.pool`), forward. With prefill and decode pools, the request first goes
to a prefill instance with ``max_tokens=1``; the router waits (bounded) until the
directory's feed shows that instance holding the prompt's last chunk, then sends the
original request to a decode instance, which pulls the prompt's KV. A request is retried on
another instance only while it is not running anywhere: the connection failed (the instance
is then taken out of rotation until its ``/health`` answers again), the body could not be
written, the instance answered 503, or its connection died before any answer reached the
client (killed: the request died with it); a timeout is the client's answer (504), never a
second run of a request that may still be running. Bodies are bounded (413) and must be JSON
objects (400; ``router/body.py``); the client's ``Authorization`` goes to the instance (vLLM
with ``--api-key``), and a router with its own API key checks it first. Response headers
``x-p2pkv-instance``, ``x-p2pkv-cached-tokens``, ``x-p2pkv-route`` (and
``x-p2pkv-prefill-instance``) say where a request went and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from p2pkv.keys import InstanceId
from p2pkv.router import body as bodies
from p2pkv.router.body import Body
from p2pkv.router.holdings import Holdings
from p2pkv.router.metrics import RouterMetrics
from p2pkv.router.policy import Policy
from p2pkv.router.pool import Backend, InstanceSpec, Pool
from p2pkv.router.prompts import PromptKeyer, PromptKeys

logger = logging.getLogger(__name__)

HEALTH_FAILURES_BEFORE_DOWN = 2


@dataclass(frozen=True, slots=True)
class RouterConfig:
    instances: tuple[InstanceSpec, ...] = ()
    prefill: tuple[InstanceSpec, ...] = ()
    decode: tuple[InstanceSpec, ...] = ()
    policy: Policy = Policy()
    publish_wait_s: float = 2.0
    """Longest a disaggregated request waits for the prefill's chunks to be visible."""
    health_interval_s: float = 1.0
    connect_timeout_s: float = 2.0
    request_timeout_s: float = 600.0
    """Deadline for one upstream request (CPU prefill of a long prompt takes tens of s)."""
    max_body_bytes: int = 32 << 20
    """Larger request bodies are refused with 413 (before they are read, when declared)."""
    api_key: str = ""
    """When set, clients must send ``Authorization: Bearer API_KEY`` (else 401)."""

    def __post_init__(self) -> None:
        if bool(self.prefill) != bool(self.decode):
            raise ValueError("disaggregation needs both --prefill and --decode instances")
        if not self.instances and not self.prefill:
            raise ValueError("give --instances, or --prefill and --decode")
        if self.instances and self.prefill:
            raise ValueError("give either --instances or --prefill/--decode, not both")
        ids = [s.id for s in (*self.instances, *self.prefill, *self.decode)]
        if len(set(ids)) != len(ids):
            raise ValueError("instance ids must be unique")
        for name in ("publish_wait_s", "health_interval_s", "connect_timeout_s",
                     "request_timeout_s", "max_body_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @property
    def disaggregated(self) -> bool:
        return bool(self.prefill)


class _Retry(Exception):
    """The instance answered 503 (it did not run the request); try another (it stays in
    rotation)."""


# NOTE: what a failure says about whether the request may have run. Connect errors: it never
# left; write errors and a pool timeout: the instance never had the whole body, so it cannot
# have parsed, let alone run, it. Anything after the body was sent (read errors and timeouts,
# a dropped connection) may follow a run: not retried, and not a reason to take the instance
# out of rotation either (a slow answer is not a dead instance; its /health decides).
_NOT_CONNECTED = (httpx.ConnectError, httpx.ConnectTimeout)
_NOT_SENT = (httpx.WriteError, httpx.WriteTimeout, httpx.PoolTimeout)
# NOTE: one exception: the connection died before any answer reached the client (the
# instance was killed, or dropped it). Then the request is not running there any more
# (uvicorn cancels a request whose connection closed, vLLM aborts it), so running it
# elsewhere runs it once, not twice: retried (the instance stays in rotation until a
# connect error or its /health says otherwise). A timeout is never retried: the request may
# still be running.
_CONNECTION_DIED = (httpx.ReadError, httpx.RemoteProtocolError)
KEEPALIVE_S = 2.0  # below uvicorn's (vLLM's) 5 s, so a reused connection is never one it
                   # is closing: that would fail a sent request that must not be retried


class Router:
    def __init__(self, config: RouterConfig, keyer: PromptKeyer | None,
                 holdings: Holdings) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.holdings = holdings
        self._keyer = keyer
        groups = ([("prefill", config.prefill), ("decode", config.decode)]
                  if config.disaggregated else [("both", config.instances)])
        self.pools = [Pool(role, specs, holdings, config.policy, self.metrics)
                      for role, specs in groups]
        self._client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(
            self.config.request_timeout_s, connect=self.config.connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64,
                                keepalive_expiry=KEEPALIVE_S))
        self.holdings.start()
        self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._client is not None:
            await self._client.aclose()
        await asyncio.to_thread(self.holdings.close)

    # -- requests -------------------------------------------------------------------------

    async def generate(self, path: str, request: Body, authorization: str | None
                       ) -> Response:
        body = request.value
        keys = await asyncio.to_thread(self._prompt_keys, path, body)
        stream = bool(body.get("stream"))
        headers = {"content-type": "application/json"}
        if authorization is not None:
            headers["authorization"] = authorization
        if not self.config.disaggregated:
            return await self._forward(self.pools[0], path, request.raw, headers, keys, stream)
        prefill, decode = self.pools
        prefill_content = bodies.encode(_prefill_body(body))
        if prefill_content is None:
            return bodies.error(400, "the body cannot be re-encoded (nested too deep)",
                                "BadRequestError")
        t0 = time.monotonic()
        first = await self._forward(prefill, path, prefill_content, headers, keys,
                                    stream=False)
        self.metrics.prefill_s.observe(time.monotonic() - t0)
        if 400 <= first.status_code < 500:
            return first  # a bad request: the decode instance would refuse it too
        prefilled_on = first.headers.get("x-p2pkv-instance", "")
        if first.status_code != 200:
            logger.warning("router: no prefill instance answered; decode computes the prompt")
        elif keys is not None and keys.keys:
            t1 = time.monotonic()
            seen = await asyncio.to_thread(self.holdings.wait_held, InstanceId(prefilled_on),
                                           keys.keys[-1], self.config.publish_wait_s)
            self.metrics.publish_wait_s.observe(time.monotonic() - t1)
            if not seen:
                self.metrics.publish_timeouts.inc()
                logger.info("router: %s's chunks not visible after %.1f s; decode may "
                            "recompute them", prefilled_on, self.config.publish_wait_s)
        response = await self._forward(decode, path, request.raw, headers, keys, stream)
        response.headers["x-p2pkv-prefill-instance"] = prefilled_on
        return response

    def _prompt_keys(self, path: str, body: dict[str, Any]) -> PromptKeys | None:
        if self._keyer is None:
            return None
        try:
            tokens = (self._keyer.chat_tokens(body) if path.endswith("chat/completions")
                      else self._keyer.completion_tokens(body))
            if tokens is None:
                return None
            salt = body.get("cache_salt")
            return self._keyer.keys(tokens, salt if isinstance(salt, str) else None)
        except Exception as e:  # noqa: BLE001 - unroutable by cache is still routable by load
            logger.debug("router: cannot name this prompt's chunks (%s); routing by load", e)
            return None

    async def _forward(self, pool: Pool, path: str, content: bytes, headers: dict[str, str],
                       keys: PromptKeys | None, stream: bool) -> Response:
        assert self._client is not None
        tried: set[InstanceId] = set()
        while True:
            picked = pool.choose(keys, tried)
            if picked is None:
                self.metrics.failed.inc()
                return JSONResponse({"error": {"message": f"no {pool.role} instance could "
                                               f"answer (tried {sorted(tried)})",
                                               "type": "ServiceUnavailable", "code": 503}},
                                    status_code=503)
            backend, choice = picked
            tried.add(backend.id)
            if keys is not None:
                # Hinted now, not when it answers: a concurrent request about the same
                # document should follow this one (a failed instance's hints are dropped).
                self.holdings.note_routed(backend.id, keys.keys)
            self._begin(backend)
            upstream: httpx.Response | None = None
            try:
                upstream = await self._client.send(self._client.build_request(
                    "POST", backend.url + path, content=content, headers=headers),
                    stream=True)
                if upstream.status_code == 503:
                    raise _Retry(f"HTTP {upstream.status_code}")
                if stream:
                    chunks = upstream.aiter_raw()
                    first = await anext(chunks, b"")  # bytes before the client sees any
                else:
                    first = await upstream.aread()
            except (*_NOT_CONNECTED, *_NOT_SENT, *_CONNECTION_DIED, _Retry) as e:
                if upstream is not None:
                    await upstream.aclose()
                self._end(backend, pool, "retried")
                self.metrics.retries.labels(backend.id).inc()
                if isinstance(e, _NOT_CONNECTED):
                    pool.mark_down(backend, f"{type(e).__name__}: {e}")
                logger.info("router: %s failed before the request ran (%s); trying another "
                            "instance", backend.id, e)
                continue
            except httpx.TransportError as e:
                if upstream is not None:
                    await upstream.aclose()
                self._end(backend, pool, "failed-after-sending")
                self.metrics.failed.inc()
                timeout = isinstance(e, httpx.TimeoutException)
                logger.warning("router: %s failed after the request was sent (%s: %s); not "
                               "retried", backend.id, type(e).__name__, e)
                return bodies.error(504 if timeout else 502,
                                    f"instance {backend.id} failed after the request was "
                                    f"sent ({type(e).__name__}); not retried, since it may "
                                    "have run", "GatewayTimeout" if timeout else "BadGateway")
            except BaseException:  # the client went away (cancelled), or a bug: count it
                if upstream is not None:
                    await upstream.aclose()
                self._end(backend, pool, "cancelled")
                raise
            if keys is not None:
                self.metrics.prompt_tokens.labels(backend.id).inc(keys.num_tokens)
                self.metrics.cached_tokens.labels(backend.id).inc(choice.cached_tokens)
            answer = {"x-p2pkv-instance": backend.id,
                      "x-p2pkv-cached-tokens": str(choice.cached_tokens),
                      "x-p2pkv-route": choice.reason}
            media = upstream.headers.get("content-type")
            if not stream:
                await upstream.aclose()
                self._end(backend, pool, str(upstream.status_code))
                return Response(first, upstream.status_code, answer, media)
            return StreamingResponse(self._relay(backend, pool, upstream, first, chunks),
                                     upstream.status_code, answer, media)

    async def _relay(self, backend: Backend, pool: Pool, upstream: httpx.Response,
                     first: bytes, chunks) -> Any:
        outcome = str(upstream.status_code)
        try:
            if first:
                yield first
            async for chunk in chunks:
                yield chunk
        except httpx.TransportError as e:
            # Bytes already reached the client: the stream ends short, nothing to retry (and
            # the instance stays in rotation unless its /health says otherwise).
            outcome = "cut"
            logger.warning("router: stream from %s cut: %s", backend.id, type(e).__name__)
        finally:
            await upstream.aclose()
            self._end(backend, pool, outcome)

    def _begin(self, backend: Backend) -> None:
        backend.in_flight += 1
        self.metrics.in_flight.labels(backend.id).set(backend.in_flight)

    def _end(self, backend: Backend, pool: Pool, outcome: str) -> None:
        backend.in_flight -= 1
        self.metrics.in_flight.labels(backend.id).set(backend.in_flight)
        self.metrics.requests.labels(backend.id, pool.role, outcome).inc()

    async def models(self, authorization: str | None) -> Response:
        assert self._client is not None
        headers = {"authorization": authorization} if authorization is not None else {}
        for pool in reversed(self.pools):
            for b in pool.backends:
                if b.up:
                    with contextlib.suppress(httpx.TransportError):
                        r = await self._client.get(b.url + "/v1/models", headers=headers)
                        return Response(r.content, r.status_code,
                                        media_type=r.headers.get("content-type"))
        return JSONResponse({"error": {"message": "no instance is up"}}, status_code=503)

    def healthy(self) -> bool:
        return all(any(b.up for b in pool.backends) for pool in self.pools)

    # -- health ---------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        assert self._client is not None
        timeout = max(2.0, self.config.health_interval_s)
        while True:
            for pool in self.pools:
                for b in pool.backends:
                    try:
                        ok = (await self._client.get(b.url + "/health", timeout=timeout)
                              ).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    if ok:
                        pool.mark_up(b)
                    else:
                        b.health_failures += 1
                        if b.health_failures >= HEALTH_FAILURES_BEFORE_DOWN:
                            pool.mark_down(b, "/health does not answer")
            await asyncio.sleep(self.config.health_interval_s)


def _prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request as the prefill instance gets it: one token, not streamed."""
    out = {k: v for k, v in body.items() if k != "stream_options"}
    out["stream"] = False
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return out


def build_app(router: Router) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        yield
        await router.stop()

    app = FastAPI(title="p2pkv router", lifespan=lifespan)

    async def _generate(path: str, request: Request) -> Response:
        if not bodies.authorized(request, router.config.api_key):
            return bodies.unauthorized()
        body = await bodies.read_body(request, router.config.max_body_bytes)
        if isinstance(body, Response):
            return body
        return await router.generate(path, body, request.headers.get("authorization"))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate("/v1/chat/completions", request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if not bodies.authorized(request, router.config.api_key):
            return bodies.unauthorized()
        return await router.models(request.headers.get("authorization"))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if router.healthy() else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
