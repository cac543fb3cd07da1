"""The router against hostile or failing input (stand-in instances in real processes on
loopback): bounded bodies (413), malformed ones (4xx, never 500), API keys, and the retry
rule: only a request that cannot have run is retried, and only a connect error takes an
instance out of rotation."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from p2pkv.router.app import RouterConfig
from tests.test_router import _router, _with_client, fakes, specs  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(120)


def _count(procs, name: str) -> int:
    return httpx.get(procs[name][1] + "/count", timeout=5).json()["completions"]


def test_bodies_over_the_limit_get_413_and_malformed_ones_400(fakes):
    procs = fakes(["a"])
    router = _router(RouterConfig(instances=specs(procs, ["a"]), max_body_bytes=1 << 20))

    async def chunked(n: int):
        for _ in range(n):
            yield b" " * (64 << 10)

    async def run(client):
        out = {}
        big = b'{"prompt": "' + b"x" * (2 << 20) + b'"}'
        out["declared"] = await client.post("/v1/completions", content=big)
        out["chunked"] = await client.post("/v1/completions", content=chunked(40))
        deep = b"[" * 100_000 + b"]" * 100_000
        out["deep"] = await client.post("/v1/completions", content=deep)
        out["deep-object"] = await client.post(
            "/v1/completions", content=b'{"prompt": ' + deep + b"}")
        out["not-json"] = await client.post("/v1/chat/completions", content=b"{nope")
        out["not-utf8"] = await client.post("/v1/completions", content=b'{"prompt": "\xff"}')
        out["a-list"] = await client.post("/v1/completions", content=b"[1, 2]")
        out["bad-types"] = await client.post("/v1/chat/completions",
                                             json={"messages": 5, "stream": {"x": 1}})
        out["ok"] = await client.post("/v1/completions", json={"prompt": "fine"})
        return out

    out = asyncio.run(_with_client(router, run))
    assert out["declared"].status_code == out["chunked"].status_code == 413
    for name in ("deep", "deep-object", "not-json", "not-utf8", "a-list"):
        assert out[name].status_code == 400, (name, out[name].text)
    assert out["bad-types"].status_code < 500  # the instance's own answer, never a 500
    assert out["ok"].status_code == 200
    assert _count(procs, "a") <= 2  # only the well-formed ones reached the instance


def test_authorization_is_passed_through_and_the_routers_own_key_is_checked(fakes):
    procs = fakes(["a"])
    open_router = _router(RouterConfig(instances=specs(procs, ["a"])))

    async def passthrough(client):
        return await client.post("/v1/completions", json={"prompt": "x"},
                                 headers={"Authorization": "Bearer vllm-key"})

    r = asyncio.run(_with_client(open_router, passthrough))
    assert r.status_code == 200 and r.json()["authorization"] == "Bearer vllm-key"
    keyed = _router(RouterConfig(instances=specs(procs, ["a"]), api_key="router-key"))

    async def run(client):
        none = await client.post("/v1/completions", json={"prompt": "x"})
        wrong = await client.post("/v1/completions", json={"prompt": "x"},
                                  headers={"Authorization": "Bearer nope"})
        models = await client.get("/v1/models")
        good = await client.post("/v1/completions", json={"prompt": "x"},
                                 headers={"Authorization": "Bearer router-key"})
        return none, wrong, models, good

    none, wrong, models, good = asyncio.run(_with_client(keyed, run))
    assert none.status_code == wrong.status_code == models.status_code == 401
    assert good.status_code == 200 and good.json()["authorization"] == "Bearer router-key"


def test_a_sent_request_is_never_run_twice_and_a_slow_instance_stays_in_rotation(fakes):
    procs = fakes(["a", "b"])
    router = _router(RouterConfig(instances=specs(procs, ["a", "b"]), request_timeout_s=0.5,
                                  health_interval_s=0.2))

    async def run(client):
        slow = await client.post("/v1/completions", json={"prompt": "sleep:3"})
        metrics = (await client.get("/metrics")).text
        return slow, metrics

    slow, metrics = asyncio.run(_with_client(router, run))
    assert slow.status_code == 504 and "not retried" in slow.json()["error"]["message"]
    assert _count(procs, "a") + _count(procs, "b") == 1  # ran once, on one instance
    assert 'p2pkv_router_instance_up{instance="a",role="both"} 1.0' in metrics
    assert 'p2pkv_router_instance_up{instance="b",role="both"} 1.0' in metrics


def test_an_instance_dying_with_the_request_is_retried_and_statuses_are_passed_on(fakes):
    procs = fakes(["a", "b"])
    router = _router(RouterConfig(instances=specs(procs, ["a", "b"])))

    async def run(client):
        died = await client.post("/v1/completions", json={"prompt": "die:a"})
        busy = await client.post("/v1/completions", json={"prompt": "status:503"})
        failed = await client.post("/v1/completions", json={"prompt": "status:500"})
        return died, busy, failed

    died, busy, failed = asyncio.run(_with_client(router, run))
    # a died with the request (or never got it): it runs nowhere else, so b ran it, once
    assert died.status_code == 200 and died.json()["choices"][0]["text"] == "b"
    # 503 (did not run) is retried on the other instance, and in the end answered 503;
    # a 500 is the instance's answer, passed on
    assert busy.status_code == 503 and failed.status_code == 500
    assert json.loads(failed.content)["error"] in ("a", "b")
