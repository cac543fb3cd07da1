"""``p2pkv bench trace``'s latency probe (``bench/trace/probe.py``): its report per scheduling
mode from constructed samples, its config's checks, and switching a real process's threads
to SCHED_FIFO and back (skipped where that is not permitted)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from p2pkv.bench.trace import probe


def _raw(samples, failed=(), loads=(), sched="alternate") -> dict:
    return {"samples": list(samples), "failed": list(failed), "loads": list(loads),
            "rate": 100.0, "namespace": "trace-p2pkv", "sched": sched,
            "realtime_refused": False}


def test_summary_splits_the_round_trips_by_mode():
    samples = [("normal", 0.001 * i) for i in range(1, 101)]
    samples += [("realtime", 0.0005)] * 50
    got = probe.summarize(_raw(samples, failed=["normal"],
                               loads=[("normal", 4.0, 20.0), ("normal", 6.0, 40.0),
                                      ("realtime", 5.0, None)]))
    assert got["lookups"] == 150 and got["failed"] == 1
    normal, realtime = got["by_mode"]["normal"], got["by_mode"]["realtime"]
    assert normal["lookups"] == 100 and normal["failed"] == 1
    assert normal["rtt_ms"]["p50"] == pytest.approx(51.0)
    assert normal["rtt_ms"]["p99"] == pytest.approx(100.0)
    assert normal["load_avg_1m"] == pytest.approx(5.0)
    assert normal["cpu_pressure_some_pct"] == pytest.approx(30.0)
    assert realtime["rtt_ms"]["p99"] == pytest.approx(0.5) and realtime["failed"] == 0
    assert realtime["cpu_pressure_some_pct"] is None
    lines = probe.describe(got, worker_nice=10)
    assert "nice +10" in lines[0] and "sched alternate" in lines[0]
    assert any("SCHED_FIFO" in line and "p99 0.50" in line for line in lines[1:])
    assert any("load avg 5.0, CPU pressure 30 %" in line for line in lines[1:])


def test_a_normal_run_reports_one_mode():
    got = probe.summarize(_raw([("normal", 0.002)] * 10, loads=[("normal", 1.0, 0.0)],
                               sched="normal"))
    assert list(got["by_mode"]) == ["normal"]


def test_config_refuses_an_unknown_mode_or_no_rate():
    args = ((("s0", "tcp://127.0.0.1:1", None),), "ns", "t.jsonl", None, 4)
    with pytest.raises(ValueError, match="sched"):
        probe.ProbeConfig(*args, 100.0, 10.0, sched="fast")
    with pytest.raises(ValueError, match="rate"):
        probe.ProbeConfig(*args, 0.0, 10.0)


def test_machine_load_reads_the_load_average():
    load, pressure = probe.machine_load()
    assert load >= 0 and (pressure is None or 0 <= pressure <= 100)


def test_set_realtime_switches_every_thread_of_a_process_and_back():
    child = subprocess.Popen([sys.executable, "-c", (
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
        "time.sleep(30)\n")])
    try:
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{child.pid}/task")) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        if not probe.set_realtime(child.pid, True):
            pytest.skip("SCHED_FIFO not permitted here (no CAP_SYS_NICE)")
        tids = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
        assert len(tids) >= 2
        assert all(os.sched_getscheduler(t) == os.SCHED_FIFO for t in tids)
        assert probe.set_realtime(child.pid, False)
        assert all(os.sched_getscheduler(t) == os.SCHED_OTHER for t in tids)
    finally:
        child.kill()
        child.wait()
    assert not probe.set_realtime(child.pid, True)  # gone
