"""Trace parsing: typed records, and bad lines fail with the file and line named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2pkv.sim.trace import TraceError, load_trace, parse_line

SHARED = Path("/work/shared/traces/mooncake_conversation.jsonl")


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _rec(ts=0, n=1000, out=10, ids=(0, 1)) -> str:
    return json.dumps({"timestamp": ts, "input_length": n, "output_length": out,
                       "hash_ids": list(ids)})


def test_records_are_typed():
    path_lines = [_rec(0, 1000, 5, (0, 1)), _rec(1500, 513, 7, (0, 2))]
    reqs = [parse_line(line, i) for i, line in enumerate(path_lines)]
    assert reqs[1].arrival_s == 1.5 and reqs[1].blocks == (0, 2)
    assert reqs[0].block_tokens(1, 512) == 488 and reqs[0].prefix_tokens(1, 512) == 512
    assert reqs[1].prefix_tokens(2, 512) == 513


def test_load_skips_blank_lines_and_honours_limit(tmp_path):
    path = _write(tmp_path, [_rec(0), "", _rec(10), _rec(20)])
    assert [r.index for r in load_trace(path)] == [0, 1, 2]
    assert len(load_trace(path, limit=2)) == 2


@pytest.mark.parametrize("bad, why", [
    ("{not json", "not a trace record"),
    (json.dumps({"timestamp": 0, "input_length": 10, "output_length": 1}), "hash_ids"),
    (json.dumps({"timestamp": -1, "input_length": 10, "output_length": 1, "hash_ids": [0]}),
     "not a trace record"),
    (json.dumps({"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": []}),
     "hash_ids is empty"),
    (json.dumps({"timestamp": 0, "input_length": 2000, "output_length": 1, "hash_ids": [1]}),
     "expected 4"),
    (json.dumps({"timestamp": 0, "input_length": "x", "output_length": 1, "hash_ids": [1]}),
     "not a trace record"),
])
def test_bad_lines_name_the_line(tmp_path, bad, why):
    path = _write(tmp_path, [_rec(0), "", bad])
    with pytest.raises(TraceError, match=rf"t\.jsonl:3: .*{why}"):
        load_trace(path)


def test_time_going_backwards_is_an_error(tmp_path):
    path = _write(tmp_path, [_rec(100), _rec(50)])
    with pytest.raises(TraceError, match=r":2: timestamp 50 ms is earlier"):
        load_trace(path)


@pytest.mark.skipif(not SHARED.exists(), reason="the shared Mooncake trace is not on this host")
def test_the_mooncake_trace_parses():
    reqs = load_trace(SHARED)
    assert len(reqs) == 12031
    assert reqs[-1].arrival_s == pytest.approx(3536.999)


def test_the_vendored_sample_parses():
    reqs = load_trace(Path(__file__).parent / "data" / "mooncake_conversation_head400.jsonl")
    assert len(reqs) == 400 and all(r.blocks for r in reqs)
    assert reqs[0].blocks[0] == 0
