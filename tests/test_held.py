"""HeldWaiter (p2pkv/harness/held.py) against a real directory process: it returns once the
directory shows an engine holding every key, and raises NotHeld at its deadline."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from p2pkv.directory.client import DirectoryClient, Registration
from p2pkv.harness.held import HeldWaiter, NotHeld
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from tests.test_directory_service import Directory

pytestmark = pytest.mark.timeout(60)

NS = Namespace("ns")
K = [ChunkKey(bytes([i]) * 32) for i in range(4)]


def test_waits_for_a_late_publish_and_times_out_on_a_missing_one(tmp_path: Path) -> None:
    d = Directory(tmp_path)
    holder = DirectoryClient(d.endpoint)
    try:
        holder.register(Registration(InstanceId("A"), 1, NS, "127.0.0.1:7001", "p",
                                     ("TcpTransport",)))
        waiter = HeldWaiter(d.endpoint)
        assert waiter.held_run("A", K[:3]) == 0
        assert waiter.held_run("nobody", K[:3]) == 0
        holder.publish(added=K[:1])
        late = threading.Timer(0.5, lambda: holder.publish(added=K[1:3]))  # a save thread
        late.start()
        t0 = time.monotonic()
        waited = waiter.wait_held("A", K[:3], timeout_s=10)
        late.join()
        assert 0.4 < waited <= time.monotonic() - t0
        assert waiter.held_run("A", K) == 3
        assert waiter.wait_held("A", [], timeout_s=0) == pytest.approx(0, abs=0.1)
        with pytest.raises(NotHeld, match="holding 3 of the prompt's 4 chunks"):
            waiter.wait_held("A", K, timeout_s=0.3)
        with pytest.raises(ValueError, match="needs the model"):
            waiter.keys([1, 2, 3])
    finally:
        holder.close()
        d.stop()
