"""The router's HTTP side against stand-in instances (real processes on loopback, no vLLM):
forwarding, streaming, stickiness from routing hints, P/D sequencing, and retries when an
instance dies."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from p2pkv.keys import ChunkKey, InstanceId
from p2pkv.router.app import Router, RouterConfig, build_app
from p2pkv.router.holdings import Holdings
from p2pkv.router.pool import InstanceSpec
from p2pkv.router.prompts import PromptKeys

pytestmark = pytest.mark.timeout(120)


class FakeKeyer:
    """Token ids are the prompt's words' lengths; one key per 2 words (a 'chunk')."""

    def completion_tokens(self, body):
        return [len(w) for w in str(body.get("prompt", "")).split()]

    chat_tokens = completion_tokens

    def keys(self, tokens, cache_salt=None):
        keys = tuple(ChunkKey(f"{tokens[:i + 2]}".encode()) for i in range(0, len(tokens) - 1, 2))
        return PromptKeys(len(tokens), keys, len(keys), 2)


@pytest.fixture
def fakes(spawn):
    def start(names):
        return {n: spawn(["-u", str(_fake()), n, f"{n}.ready"], f"{n}.ready")
                for n in names}
    return start


def _fake():
    from pathlib import Path
    return Path(__file__).with_name("fake_openai.py")


def _router(config: RouterConfig, holdings: Holdings | None = None) -> Router:
    return Router(config, FakeKeyer(), holdings or Holdings(None))


async def _with_client(router: Router, fn):
    app = build_app(router)
    await router.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://router") as client:
            return await fn(client)
    finally:
        await router.stop()


def specs(procs, names):
    return tuple(InstanceSpec(InstanceId(n), procs[n][1]) for n in names)


def test_spreads_then_sticks_to_where_a_prompt_went(fakes):
    procs = fakes(["a", "b"])
    router = _router(RouterConfig(instances=specs(procs, ["a", "b"])))

    async def run(client):
        first = await client.post("/v1/completions", json={"prompt": "one two three four"})
        other = await client.post("/v1/completions", json={"prompt": "five six seven eight"})
        again = await client.post("/v1/completions", json={"prompt": "one two three four x"})
        models = await client.get("/v1/models")
        metrics = (await client.get("/metrics")).text
        return first, other, again, models, metrics

    first, other, again, models, metrics = asyncio.run(_with_client(router, run))
    assert first.status_code == other.status_code == again.status_code == 200
    assert first.headers["x-p2pkv-instance"] != other.headers["x-p2pkv-instance"]  # spread
    assert again.headers["x-p2pkv-instance"] == first.headers["x-p2pkv-instance"]
    assert again.headers["x-p2pkv-route"] == "cache"
    assert again.headers["x-p2pkv-cached-tokens"] == "4"
    assert models.json()["data"][0]["id"] == "model"
    assert 'p2pkv_router_choices_total{reason="cache",role="both"} 1.0' in metrics


def test_streams_and_retries_a_dead_instance_before_any_byte(fakes):
    procs = fakes(["a", "b"])
    router = _router(RouterConfig(instances=specs(procs, ["a", "b"]), health_interval_s=0.2))
    procs["a"][0].kill()
    procs["a"][0].wait()

    async def run(client):
        out = []
        for i in range(4):
            async with client.stream("POST", "/v1/completions",
                                     json={"prompt": f"p{i} q", "stream": True}) as r:
                text = "".join([line async for line in r.aiter_lines()])
                out.append((r.status_code, r.headers["x-p2pkv-instance"], text))
        await asyncio.sleep(0.6)
        health = await client.get("/metrics")
        return out, health.text

    out, metrics = asyncio.run(_with_client(router, run))
    assert all(code == 200 and where == "b" and "b-2" in text for code, where, text in out)
    assert 'p2pkv_router_instance_up{instance="a",role="both"} 0.0' in metrics


def test_disaggregated_request_prefills_one_token_then_decodes(fakes):
    procs = fakes(["p", "d"])
    router = _router(RouterConfig(prefill=specs(procs, ["p"]), decode=specs(procs, ["d"]),
                                  publish_wait_s=0.2))

    async def run(client):
        return await client.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 7})

    r = asyncio.run(_with_client(router, run))
    assert r.status_code == 200
    assert r.headers["x-p2pkv-prefill-instance"] == "p"
    assert r.headers["x-p2pkv-instance"] == "d"
    assert r.json() == {"choices": [{"index": 0, "text": "d"}], "max_tokens": 7}
    # no directory: the publish is never seen, the wait ends at its deadline
    assert "p2pkv_router_publish_wait_timeouts_total 1.0" in router.metrics.render().decode()


def test_no_instance_left_is_a_clear_503(fakes):
    procs = fakes(["a"])
    procs["a"][0].kill()
    procs["a"][0].wait()
    router = _router(RouterConfig(instances=specs(procs, ["a"])))

    async def run(client):
        return await client.post("/v1/completions", content=json.dumps({"prompt": "x"}))

    r = asyncio.run(_with_client(router, run))
    assert r.status_code == 503 and "no both instance" in r.json()["error"]["message"]


def test_config_is_validated():
    spec = InstanceSpec.parse("a=http://127.0.0.1:1")
    with pytest.raises(ValueError):
        RouterConfig(prefill=(spec,))
    with pytest.raises(ValueError):
        RouterConfig()
    with pytest.raises(ValueError):
        InstanceSpec.parse("http://127.0.0.1:1")
