"""scripts/gpu_check.py's flow on CPU (``--cpu``): the holder/puller pulls and the
heterogeneous-TP parts (two holder ranks into one puller, one holder into two puller ranks),
every byte checked. The GPU numbers come from running it on a GPU host (docs/gpu.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_flow_verifies_every_byte(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--out", str(tmp_path),
         "--layers", "2", "--heads", "4", "--head-size", "16", "--block-size", "4",
         "--chunks", "2", "--chunk-blocks", "2", "--reps", "1"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "RESULT OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = results["tp_parts"]
    assert {"tp2_to_tp1_tcp", "tp2_to_tp1_shm", "tp1_to_tp2_tcp_heads_0_2",
            "tp1_to_tp2_shm_heads_2_4"} <= set(parts)
    assert all(v["bytes_verified"] for v in parts.values()), parts
    assert results["pull_tcp"]["bytes_verified"] and results["pull_shm"]["bytes_verified"]
