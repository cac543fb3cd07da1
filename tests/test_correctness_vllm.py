"""The correctness suite's CI set on real vLLM (CPU): pulled KV never changes an answer.

See p2pkv/harness/correctness.py for what each case checks. Skipped only where vLLM is not
installed; CI sets P2PKV_REQUIRE_E2E=1, which turns that skip into a failure.
"""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

if os.environ.get("P2PKV_REQUIRE_E2E") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")

from p2pkv.harness.cluster import LocalCluster  # noqa: E402
from p2pkv.harness.correctness import run_suite, small_cases  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from p2pkv.harness.demo_model import prepare

    model = prepare()
    with LocalCluster(tmp_path_factory.mktemp("correctness"), model) as cluster:
        cluster.start_directory()
        yield {r.case.name: r for r in run_suite(cluster, small_cases(), model)}


@pytest.mark.parametrize("name", [c.name for c in small_cases()])
def test_case(results, name):
    r = results[name]
    assert r.ok, r.detail
