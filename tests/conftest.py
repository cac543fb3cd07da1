"""Shared fixtures: real subprocesses on loopback, each with a deadline and a teardown."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def wait_for_file(path: Path, proc: subprocess.Popen, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before it was ready")
        time.sleep(0.05)
    raise TimeoutError(f"{path} not written within {timeout_s} s")


def wait_until(cond, timeout_s: float = 5.0, step_s: float = 0.02) -> bool:
    """Poll ``cond()`` until it holds or ``timeout_s`` passes; its value at the end (counters
    of another thread or process reach their value asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step_s)
    return bool(cond())


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    """spawn(args, ready_name) -> (proc, ready_text): a Python subprocess killed at teardown."""
    procs: list[subprocess.Popen] = []

    def _spawn(args: list[str], ready_name: str, timeout_s: float = 30.0,
               env: dict[str, str] | None = None):
        ready = tmp_path / ready_name
        proc = subprocess.Popen([sys.executable, *args], env={**python_env(), **(env or {})},
                                cwd=tmp_path)
        procs.append(proc)
        return proc, wait_for_file(ready, proc, timeout_s)

    yield _spawn
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
