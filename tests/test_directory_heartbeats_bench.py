"""``p2pkv bench directory --heartbeats``: single and batched heartbeats of one fleet side by
side (small sizes: this checks the bench, not the numbers)."""

from __future__ import annotations

import argparse
import json

import pytest

from p2pkv.bench import directory
from p2pkv.bench.directory import heartbeats as directory_heartbeats

pytestmark = pytest.mark.timeout(120)


def test_bench_alternates_single_and_batched_rounds(capsys) -> None:
    parser = argparse.ArgumentParser()
    directory.add_args(parser)
    args = parser.parse_args(["--heartbeats", "100", "--throughput-s", "0.6",
                              "--heartbeat-interval-s", "0.1", "--heartbeat-rounds", "1",
                              "--json"])
    assert directory.main(args) == 0
    rows = json.loads(capsys.readouterr().out)["rounds"]
    assert [r["mode"] for r in rows] == ["single", "batched"]
    single, batched = rows
    for r in rows:
        assert r["registered"] == 100 and r["expirations"] == 0 and r["errors"] == {}
        assert r["heartbeats_applied_per_s"] > 0
    assert single["messages_per_s"] == single["beats_sent_per_s"]
    assert batched["messages_per_s"] * 8 <= batched["beats_sent_per_s"]


def test_sizes_are_parsed() -> None:
    assert directory_heartbeats.parse_sizes("2000,8000") == [2000, 8000]
    with pytest.raises(argparse.ArgumentTypeError):
        directory_heartbeats.parse_sizes("0")
