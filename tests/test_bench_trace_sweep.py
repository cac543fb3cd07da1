"""``p2pkv bench trace --merge``: sweep points run as separate commands, joined into one
report and plot (constructed reports, no replay)."""

from __future__ import annotations

import argparse
import json

import pytest

from p2pkv.bench import trace as bench_trace
from p2pkv.bench.trace.sweep import MergeError, merge

POLICIES = ("kv-aware", "global-pool")


def _result(policy: str, share: float) -> dict:
    return {"policy": policy, "saved_share": share, "reuse_captured": share * 2,
            "local_tokens": 1, "pulled_tokens": 0, "recomputed_tokens": 1,
            "ttft_s": {"p50": 0.2, "p90": 1.0, "p99": 5.0},
            "load": {"requests_per_instance_max": 3, "busy_share_max": 0.1}}


def _run(instances: int, share: float, speedup: float) -> dict:
    return {"instances": instances, "speedup": speedup, "wall_s": 1.0, "shards": 1,
            "load_avg_1m": {"start": 1.0, "end": 1.0},
            "results": [_result(p, share) for p in POLICIES],
            "directory": {"lookup_rtt_ms": {}, "processes": [], "messages_per_s": 0.0,
                          "bytes_per_s": 0, "lookups_failed": 0, "failovers": 0}}


def _report(run: dict, sweep: list[dict], profile: str = "llama3.1-8b-h100") -> dict:
    return {"trace": "t.jsonl", "limit": None, "profile": profile, "keys_per_block": 4,
            "max_holders": 1, "slow_fraction": 0.1, "slow_factor": 0.05,
            "local_host_tier": True, "run": run, "sweep": sweep, "total_wall_s": 2.0}


def _point(instances: int, share: float) -> dict:
    return {"instances": instances, "wall_s": 1.0, "speedup": 0.0, "load_avg_1m": None,
            "results": [_result(p, share) for p in POLICIES]}


def test_merge_keeps_the_first_headline_and_every_size():
    paced = _report(_run(1000, 0.37, 10.0), [])
    unpaced = _report(_run(300, 0.30, 0.0), [_point(10, 0.2), _point(300, 0.30),
                                              _point(1000, 0.99)])
    out = merge([paced, unpaced], ["a.json", "b.json"])
    assert out["run"]["instances"] == 1000
    assert [p["instances"] for p in out["sweep"]] == [10, 300, 1000]
    by_size = {p["instances"]: p for p in out["sweep"]}
    # a headline run wins over another report's sweep point of the same size
    assert by_size[1000]["results"][0]["saved_share"] == 0.37
    assert by_size[1000]["speedup"] == 10.0
    assert out["merged_from"] == ["a.json", "b.json"] and out["total_wall_s"] == 4.0


def test_merge_refuses_a_different_setup_or_policies():
    a = _report(_run(1000, 0.37, 10.0), [])
    with pytest.raises(MergeError, match="profile"):
        merge([a, _report(_run(10, 0.2, 0.0), [], profile="cpu")], ["a", "b"])
    other = _run(10, 0.2, 0.0)
    other["results"] = other["results"][:1]
    with pytest.raises(MergeError, match="policies"):
        merge([a, _report(other, [])], ["a", "b"])


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_trace.add_args(parser)
    return parser.parse_args(list(argv))


def test_merge_flag_writes_one_report_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_report(_run(1000, 0.37, 10.0), [])))
    b.write_text(json.dumps(_report(_run(10, 0.2, 0.0), [_point(10, 0.2), _point(30, 0.3)])))
    out = tmp_path / "out"
    assert bench_trace.main(_args("--merge", f"{a},{b}", "--out", str(out))) == 0
    report = json.loads((out / "trace.json").read_text())
    assert [p["instances"] for p in report["sweep"]] == [10, 30, 1000]
    assert (out / "trace.png").stat().st_size > 0


def test_merge_flag_errors_name_the_file(tmp_path, capsys):
    missing = tmp_path / "none.json"
    assert bench_trace.main(_args("--merge", str(missing), "--out", str(tmp_path))) == 2
    assert "none.json" in capsys.readouterr().err
    assert bench_trace.main(_args("--merge", str(missing))) == 2  # no --out
