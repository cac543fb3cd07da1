"""``p2pkv bench serve``'s plumbing without vLLM servers: nginx balances round robin, and
vLLM's own benchmark client (``p2pkv.bench.vllm_client``, the CPU wheel's stand-in for the
``vllm bench serve`` command) drives it with the bench's arguments and leaves its result JSON.

The fake OpenAI servers (tests/fake_openai.py) answer instead of vLLM; the numbers come from
real runs (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx
import pytest

from p2pkv.bench import serve
from p2pkv.harness.cluster import Instance, LocalCluster
from p2pkv.harness.nginx import find_nginx, start_round_robin
from tests.conftest import python_env, wait_for_file

REQUIRED = os.environ.get("P2PKV_REQUIRE_E2E") == "1" and os.environ.get("CI") == "true"
FAKE = Path(__file__).resolve().parent / "fake_openai.py"


@pytest.fixture
def balanced(tmp_path):
    if find_nginx() is None:
        reason = "nginx is not installed (scripts/setup.sh installs nginx-light as root)"
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    with LocalCluster(tmp_path, Path(".")) as c:
        upstreams = []
        for name in ("A", "B"):
            ready = tmp_path / f"{name}.url"
            proc = c.start_process(name, [sys.executable, str(FAKE), name, str(ready)],
                                   env=python_env())
            upstreams.append(Instance(name, wait_for_file(ready, proc.popen), proc))
        yield start_round_robin(c, upstreams)


def test_nginx_takes_turns(balanced):
    names = [httpx.post(balanced.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
             .json()["choices"][0]["text"] for _ in range(4)]
    assert sorted(names) == ["A", "A", "B", "B"] and names[0] != names[1]


def test_vllm_bench_client_runs_with_the_bench_arguments(balanced, tmp_path):
    if not REQUIRED:
        pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")
    from p2pkv.harness.demo_model import prepare

    parser = argparse.ArgumentParser()
    serve.add_args(parser)
    args = parser.parse_args(["--num-prompts", "4", "--prefix-len", "128", "--suffix-len", "8",
                              "--num-prefixes", "2", "--output-len", "3",
                              "--request-rate", "inf"])
    argv = serve.client_argv(args, balanced.url, prepare(), tmp_path, "fake")
    assert serve.run_client(argv, tmp_path / "client.log") == 0, \
        (tmp_path / "client.log").read_text()[-3000:]
    result = json.loads((tmp_path / "fake.json").read_text())
    assert result["completed"] == 4 and result["failed"] == 0
    assert result["mean_ttft_ms"] > 0 and "mean_itl_ms" in result
    assert "Serving Benchmark Result" in (tmp_path / "client.log").read_text()
