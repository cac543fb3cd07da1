"""The overhead table of ``p2pkv bench ttft`` without vLLM: interleaving against stand-in
OpenAI servers on loopback, the statistics, the goals and the printed table."""

from __future__ import annotations

from pathlib import Path

from p2pkv.harness import overhead
from p2pkv.harness.overhead import DocumentPair, Sample
from p2pkv.harness.cluster import Instance, Proc


def test_samples_interleave_setups_with_a_rotating_order(spawn):
    fake = str(Path(__file__).with_name("fake_openai.py"))
    instances = {}
    for name in ("vllm", "p2pkv"):
        proc, url = spawn(["-u", fake, name, f"{name}.ready"], f"{name}.ready")
        instances[name] = Instance(name, url, Proc(name, proc, Path(f"{name}.log")))
    pairs = [DocumentPair((1, 2, 3), (1, 2, 3, 4)), DocumentPair((5, 6), (5, 6, 7))]
    done = []
    samples = overhead.measure(pairs, instances, settle_s=0.0, progress=done.append)
    assert len(done) == len(samples) == 2 * 2 * 2
    assert [(s.setup, s.kind, s.index) for s in samples] == [
        ("vllm", "cold", 0), ("p2pkv", "cold", 0), ("vllm", "hit", 0), ("p2pkv", "hit", 0),
        ("p2pkv", "cold", 1), ("vllm", "cold", 1), ("p2pkv", "hit", 1), ("vllm", "hit", 1)]
    assert all(s.ttft_s > 0 for s in samples)


def _samples(setup: str, cold: list[float], hit: list[float]) -> list[Sample]:
    return ([Sample(setup, "cold", i, t) for i, t in enumerate(cold)]
            + [Sample(setup, "hit", i, t) for i, t in enumerate(hit)])


def test_summary_ratios_goals_and_table():
    samples = (_samples("vllm", [8.0, 9.0, 10.0, 7.0, 8.5], [0.50, 0.40, 0.60, 0.45, 0.55])
               + _samples("p2pkv", [8.1, 9.0, 10.5, 7.0, 8.5], [0.50, 0.40, 0.70, 0.45, 0.56]))
    s = overhead.summarize(samples)
    t = s["table"]
    assert t["vllm"]["cold"]["p50_s"] == 8.5 and t["p2pkv"]["cold"]["p50_s"] == 8.5
    assert t["p2pkv"]["hit"]["n"] == 5
    assert abs(s["goals"]["p2pkv_hit_over_vllm"] - 0.50 / 0.50) < 1e-9
    assert abs(t["p2pkv"]["hit"]["paired_over_vllm_p50"] - 1.0) < 1e-9
    lines = overhead.render(s, "VLLM_CPU_NUM_OF_RESERVED_CPU=0")
    assert lines[0].startswith("OVERHEAD")
    assert any(line.startswith("local hit") for line in lines)
    assert any("goal p2pkv cold miss <= 1.02x" in line and "(met)" in line for line in lines)
    worse = overhead.summarize(samples + _samples("p2pkv", [], [9.0, 9.0, 9.0]))
    assert "NOT met" in "\n".join(overhead.render(worse, "x"))


def test_setups_always_include_plain_vllm_and_refuse_unknown_ones(monkeypatch):
    monkeypatch.setattr(overhead.lmcache, "installed", lambda: False)
    assert overhead.setups_available() == ["vllm", "p2pkv"]
    assert overhead.setups_available(["p2pkv"]) == ["vllm", "p2pkv"]
    monkeypatch.setattr(overhead.lmcache, "installed", lambda: True)
    assert overhead.setups_available() == ["vllm", "p2pkv", "lmcache"]
    assert overhead.setups_available(["p2pkv", "vllm"]) == ["vllm", "p2pkv"]
    try:
        overhead.setups_available(["plain"])
    except ValueError as e:
        assert "unknown overhead setups" in str(e)
    else:
        raise AssertionError("an unknown setup was accepted")


def test_table_names_the_load_it_was_measured_under():
    s = overhead.summarize(_samples("vllm", [8.0], [0.5]) + _samples("p2pkv", [8.0], [0.5]))
    assert "load average 1.5 -> 2.2" in overhead.render(s, "x", (1.5, 2.25))[0]
    assert "load average" not in overhead.render(s, "x")[0]


def test_a_control_instance_shows_the_noise_floor_next_to_the_goal():
    samples = (_samples("vllm", [8.0, 9.0, 10.0], [0.50, 0.40, 0.60])
               + _samples("p2pkv", [8.0, 9.0, 10.0], [0.52, 0.42, 0.62])
               + _samples("vllm-control", [8.8, 9.9, 11.0], [0.55, 0.44, 0.66]))
    s = overhead.summarize(samples)
    assert abs(s["control"]["hit"]["over_vllm"] - 1.1) < 1e-9
    assert abs(s["control"]["cold"]["paired_over_vllm_p50"] - 1.1) < 1e-9
    assert "vllm-control_hit_over_vllm" not in s["goals"]  # the goals stay p2pkv's
    text = "\n".join(overhead.render(s, "x"))
    assert "A/A control (a second plain vLLM instance): 1.100x" in text
    assert "vllm-control" in text.splitlines()[1]  # its own column
    assert "A/A control" not in "\n".join(overhead.render(overhead.summarize(
        samples[:12]), "x"))


def test_the_control_is_asked_for_not_default(monkeypatch):
    monkeypatch.setattr(overhead.lmcache, "installed", lambda: False)
    assert "vllm-control" not in overhead.setups_available()
    assert overhead.setups_available(["vllm-control", "p2pkv"]) == ["vllm", "p2pkv",
                                                                   "vllm-control"]
