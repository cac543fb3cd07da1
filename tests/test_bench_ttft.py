"""``p2pkv bench ttft`` without vLLM: the request plan, the per-row statistics, the goals, and
the LMCache comparison's instance arguments."""

from __future__ import annotations

import json

from p2pkv.bench.ttft import (
    CONFIGS,
    Record,
    chat_requests,
    goals,
    kind,
    qa_requests,
    summarize,
    warm_up_plan,
    warm_up_prompts,
)
from p2pkv.harness import lmcache
from p2pkv.harness.correctness import full_cases, preemption_cases


def tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]


TOKENS = list(range(5000, 8600))


def test_qa_plan_alternates_instances_and_gives_each_doc_its_own_prefix():
    reqs = qa_requests(TOKENS, [1000, 3000], docs=3, questions=3, tokenize=tokenize)
    assert len(reqs) == 2 * 3 * 3
    for r in reqs:
        assert r.instance == (r.group % 100 + r.step) % 2
    firsts = [r.prompt[:128] for r in reqs if r.step == 0]
    assert len(set(firsts)) == len(firsts)  # no two documents share a first block
    doc = [r for r in reqs if r.group == reqs[0].group]
    assert all(r.prompt[:1000] == doc[0].prompt[:1000] for r in doc)


def test_chat_plan_wraps_the_token_source_for_many_users():
    reqs = chat_requests(TOKENS, users=6, rounds=3, tokenize=tokenize)
    assert len(reqs) == 18
    assert len({r.prompt[:800] for r in reqs if r.step == 0}) == 6
    for a, b in zip(reqs, reqs[1:]):
        if a.group == b.group:
            assert b.prompt[:len(a.prompt)] == a.prompt and b.instance != a.instance


def _records(config: str, other: float, same: float, first: float) -> list[Record]:
    out = []
    for g in range(3):
        for step, t in enumerate((first, other, same)):
            out.append(Record(config, "qa", g, step, 3000, (g + step) % 2, t + g * 0.01, t))
    return out


def test_summary_rows_have_samples_p50_p90_and_goals():
    configs = {
        "plain": summarize(_records("plain", 20.0, 20.0, 20.0), {"busy_s": 60.0}),
        "p2pkv": summarize(_records("p2pkv", 0.5, 0.45, 9.0), {"busy_s": 10.0}),
        "lmcache": summarize(_records("lmcache", 1.5, 0.45, 9.0), {"busy_s": 12.0}),
    }
    p = configs["p2pkv"]
    assert p["samples_by_row"] == {"qa/3000/first": 3, "qa/3000/other": 3, "qa/3000/same": 3}
    assert p["ttft_p50_by_row_s"]["qa/3000/other"] == 0.51
    assert p["ttft_p90_by_row_s"]["qa/3000/other"] == 0.52
    g = goals(configs)
    assert g["length"] == 3000
    assert abs(g["remote_over_local_hit"] - 0.51 / 0.46) < 1e-9
    assert abs(g["cold_over_remote"] - 20.01 / 0.51) < 1e-9
    assert g["lmcache_remote_s"] == 1.51
    assert kind(Record("x", "chat", 0, 2, 900, 0, 0, 0)) == "other"


def test_lmcache_configs_and_transfer_config():
    assert {n for n, c in CONFIGS.items() if c.lmcache} == {"lmcache", "lmcache-shm"}
    tcp = json.loads(lmcache.LMCacheServer(5555, "tcp").kv_transfer_config())
    assert tcp["kv_connector"] == "LMCacheMPConnector"
    assert tcp["kv_connector_extra_config"] == {"lmcache.mp.host": "tcp://127.0.0.1",
                                                "lmcache.mp.port": 5555}
    shm = lmcache.LMCacheServer(5555, "shm").vllm_args()
    assert shm[0] == "--kv-transfer-config"
    assert json.loads(shm[1])["kv_connector_extra_config"]["lmcache.mp.mp_transfer_mode"] == \
        "lmcache_driven"


def test_preemption_case_prompts_are_distinct_and_end_before_a_block_boundary():
    (case,) = preemption_cases(128)
    assert case in full_cases(128) and case.small_cache
    assert case.num_tokens % 128 == 124
    starts = [case.offset + i * case.distinct_stride for i in range(case.concurrent)]
    assert len(set(starts)) == case.concurrent
    assert starts[-1] + case.num_tokens < 3500  # the bundled document has ~3,560 tokens


def test_goals_need_a_local_hit_row():
    records = [r for r in _records("p2pkv", 0.5, 0.45, 9.0) if r.step < 2]
    assert goals({"p2pkv": summarize(records, {"busy_s": 1.0})}) == {}


def test_vllm_p2p_config_names_the_p2p_tier_and_each_request_its_source():
    from p2pkv.harness import vllm_p2p

    assert CONFIGS["vllm-p2p"].vllm_p2p and not CONFIGS["vllm-p2p"].connector
    tier = vllm_p2p.TierAddress("127.0.0.1", 5711)
    config = json.loads(vllm_p2p.kv_transfer_config(tier, engine_id="A"))
    assert config["kv_connector"] == "OffloadingConnector" and config["engine_id"] == "A"
    extra = config["kv_connector_extra_config"]
    assert extra["spec_name"] == "TieringOffloadingSpec" and extra["cpu_bytes_to_use"] > 0
    assert extra["secondary_tiers"] == [{"type": "p2p", "host": "127.0.0.1", "port": 5711}]
    assert vllm_p2p.source_params(tier, "r1") == {"remote_kv_source": {
        "kv_request_id": "r1", "remote_host": "127.0.0.1", "remote_port": 5711}}


def test_vllm_p2p_start_failure_is_the_exception_and_its_vllm_line(tmp_path):
    from p2pkv.harness import vllm_p2p

    log = tmp_path / "a.log"
    w = "(Worker pid=7) ERROR 12-02 02:25:06 [multiproc_executor.py:1063] "
    e = "(EngineCore pid=6) ERROR 12-02 02:25:06 [core.py:1510] "
    log.write_text(
        "(APIServer pid=5) WARNING 12-02 02:24:29 [system_utils.py:255] can cause `OSError: "
        "[Errno 24] Too many open files`\n"
        f"{w}Traceback (most recent call last):\n"
        f'{w}  File "/venv/site-packages/vllm/v1/engine/core.py", line 9, in run\n'
        f'{w}  File "/venv/site-packages/vllm/v1/kv_offload/cpu/spec.py", line 200, in '
        "get_worker\n"
        f"{w}    raise Exception(\n"
        f"{w}Exception: CPU Offloading is currently only supported on CUDA-alike and XPU "
        "GPUs\n"
        f'{e}  File "/venv/site-packages/vllm/v1/executor/multiproc_executor.py", line 444, '
        "in get_response\n"
        f"{e}RuntimeError: Worker failed with error 'CPU Offloading ...'\n")
    assert vllm_p2p.start_failure(log) == (
        "Exception: CPU Offloading is currently only supported on CUDA-alike and XPU GPUs "
        "(raised at vllm/v1/kv_offload/cpu/spec.py:200 in get_worker)")


def test_warm_up_gives_each_instance_its_own_prompt_then_asks_it_on_the_other():
    assert warm_up_plan(2, cross=True) == [(0, 0), (0, 1), (1, 1), (1, 0)]
    assert warm_up_plan(2, cross=False) == [(0, 0), (1, 1)]
    prompts = warm_up_prompts(2)
    assert len(set(prompts)) == 2
    assert all(len(p.split()) > 2 * 128 // 2 for p in prompts)  # ~300 tokens: 2 full blocks
    docs = qa_requests(TOKENS, [1000], docs=2, questions=3, tokenize=tokenize)
    warm = [tokenize(p)[:128] for p in prompts]
    assert not any(list(r.prompt[:128]) in warm for r in docs)


def test_tp_rows_compare_a_remote_hit_with_the_local_hit_at_the_same_tp():
    recs = [Record("p2pkv-tp2-tp1", "qa", g, step, 1500, inst, t, t)
            for g, (step, inst, t) in enumerate([(1, 1, 0.22), (2, 1, 0.20), (1, 0, 0.33),
                                                 (2, 0, 0.30), (0, 0, 1.0)])]
    configs = {"p2pkv-tp2-tp1": summarize(recs, {"busy_s": 5.0, "tp": (2, 1)}),
               "p2pkv-tp2": summarize(_records("p2pkv-tp2", 0.3, 0.3, 1.0), {"busy_s": 5.0})}
    ratios = goals(configs)["remote_over_local_by_length"]  # no plain "p2pkv" config in the run
    assert abs(ratios["p2pkv-tp2-tp1"]["1500@tp1"] - 0.22 / 0.20) < 1e-9
    assert abs(ratios["p2pkv-tp2-tp1"]["1500@tp2"] - 0.33 / 0.30) < 1e-9
    assert set(ratios["p2pkv-tp2"]) == {3000}
