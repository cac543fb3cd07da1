"""The directory's promises with real processes on loopback: leases, epochs, restart + resync,
CURVE auth, probe compatibility, the change feed, and floods of bad input."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import zmq

from p2pkv.directory import auth, protocol
from p2pkv.directory.client import DirectoryClient, RegState, Registration
from p2pkv.directory.feed import FeedSubscriber
from p2pkv.directory.protocol import (
    Heartbeat, Publish, Register, RegisterReply, Stats, StatsReply, Status,
)
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from p2pkv.secret import ClusterSecret
from tests.test_directory_service import Directory, lookup, registered, wait_lookup_equals

pytestmark = pytest.mark.timeout(60)

NS = Namespace("ns")
A, B = InstanceId("a"), InstanceId("b")
K = [ChunkKey(bytes([i]) * 32) for i in range(6)]
HB = "0.2"  # heartbeat interval of the directories under test (lease = 0.2 s x 3)


def reg(inst: InstanceId, epoch: int = 1, probe: str = "p", port: int = 7001) -> Registration:
    return Registration(inst, epoch, NS, f"127.0.0.1:{port}", probe)


def stats(client: DirectoryClient) -> StatsReply:
    reply = client.call(Stats(), 5)
    assert isinstance(reply, StatsReply), reply
    return reply


def until(predicate, timeout_s: float = 5.0, step: float = 0.01):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(step)
    return value


@pytest.fixture
def directory(tmp_path: Path):
    d = Directory(tmp_path, "--heartbeat-interval", HB, "--liveness", "3")
    yield d
    d.stop()


@pytest.fixture
def make(directory: Directory):
    made: list[DirectoryClient] = []

    def _make(endpoint: str | None = None, **kw) -> DirectoryClient:
        made.append(DirectoryClient(endpoint or directory.endpoint, **kw))
        return made[-1]

    yield _make
    for c in made:
        c.close()


def test_lease_expires_when_heartbeats_stop(directory: Directory, make) -> None:
    a, b, looker = make(), make(), make()
    a.register(reg(A, port=1))
    b.register(reg(B, port=2))
    a.publish(K[:3])
    b.publish(K[:2])
    registered(a, b)
    wait_lookup_equals(looker, K[:3], [("a", "127.0.0.1:1", 3), ("b", "127.0.0.1:2", 2)])
    a._stop.set()  # the process hangs: its keeper stops heartbeating
    a._keeper.join()
    t0 = time.monotonic()
    wait_lookup_equals(looker, K[:3], [("b", "127.0.0.1:2", 2)])
    assert time.monotonic() - t0 < 3 * 0.2 + 0.5
    s = stats(looker)
    assert s.expirations == 1 and [i.instance for i in s.instances] == ["b"]


def test_lower_epoch_is_refused_and_stays_refused(directory: Directory, make) -> None:
    new, stale, looker = make(), make(), make()
    new.register(reg(A, epoch=5, port=5))
    new.publish(K[:2])
    registered(new)
    stale.register(reg(A, epoch=4, port=4))
    until(lambda: stale.state is RegState.REFUSED)
    assert "older" in stale.refused_reason
    stale.publish(K[:4])  # recorded, never sent
    wait_lookup_equals(looker, K[:4], [("a", "127.0.0.1:5", 2)])


def test_directory_restart_on_same_port_resyncs_within_two_intervals(
        directory: Directory, make, tmp_path: Path) -> None:
    a, looker = make(), make()
    a.register(reg(A))
    a.publish(K[:4])
    registered(a)
    wait_lookup_equals(looker, K[:4], [("a", "127.0.0.1:7001", 4)])
    old_epoch = a.directory_epoch
    directory.proc.kill()
    directory.proc.wait(5)
    a.publish(K[4:5])  # published while the directory is down
    port_bind = directory.endpoint
    restarted = Directory(tmp_path, "--heartbeat-interval", HB, "--liveness", "3",
                          bind=port_bind, name="restarted")
    try:
        t0 = time.monotonic()
        wait_lookup_equals(looker, K[:5], [("a", "127.0.0.1:7001", 5)], timeout_s=5)
        elapsed = time.monotonic() - t0
        # 2 heartbeat intervals + ZeroMQ's reconnect interval (client: at most 0.25 s)
        assert elapsed < 2 * 0.2 + 0.25 + 0.3, elapsed
        assert a.directory_epoch != old_epoch and a.resyncs >= 2
    finally:
        restarted.stop()


def test_seq_gap_makes_the_client_resend_a_snapshot(directory: Directory, make) -> None:
    a, looker = make(), make()
    a.register(reg(A))
    a.publish(K[:2])
    registered(a)
    wait_lookup_equals(looker, K[:2], [("a", "127.0.0.1:7001", 2)])
    with a._lock:  # simulate a lost publish: the client believes it sent seq+1
        a._reg.seq += 1
        a._reg.keys.update(K[2:4])
    resyncs = a.resyncs
    wait_lookup_equals(looker, K[:4], [("a", "127.0.0.1:7001", 4)])  # heartbeat saw the gap
    assert a.resyncs > resyncs


def test_probe_mismatch_is_refused_with_a_reason(directory: Directory, make,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    a, odd = make(), make()
    a.register(reg(A, probe="1111"))
    registered(a)
    with caplog.at_level("ERROR"):
        odd.register(reg(B, probe="2222"))
        until(lambda: odd.state is RegState.REFUSED)
    assert "2222" in odd.refused_reason and "1111" in odd.refused_reason
    assert "PYTHONHASHSEED" in odd.refused_reason
    assert any("REFUSED" in r.message for r in caplog.records)
    s = stats(a)
    assert [i.instance for i in s.instances] == ["a"]
    (refused,) = s.refused  # listed for operators (p2pkv doctor) though not a member
    assert (refused.instance, refused.probe, refused.status) == ("b", "2222",
                                                                  Status.PROBE_MISMATCH)
    assert refused.address == "127.0.0.1:7001" and "1111" in refused.reason
    a.unregister()  # the odd one is now alone: its retry registers it, and it leaves the list
    until(lambda: odd.state is RegState.REGISTERED, timeout_s=15)  # retry: 10 x 1 s
    assert stats(odd).refused == []


def test_feed_subscriber_follows_snapshot_and_events(directory: Directory, make) -> None:
    a = make()
    a.register(reg(A))
    a.publish(K[:2])
    registered(a)
    until(lambda: stats(a).instances[0].chunks == 2)
    sub = FeedSubscriber(directory.endpoint)
    try:
        assert sub.sync()
        assert sub.holdings[A] == set(K[:2]) and sub.seq >= 2
        time.sleep(0.2)  # let the subscription reach the directory
        b = make()
        b.register(reg(B, port=2))
        b.publish(K[:1])
        a.publish([K[5]], [K[0]])
        until(lambda: (sub.poll(0.05) or True) and sub.holdings.get(B) == {K[0]}
              and sub.holdings[A] == {K[1], K[5]})
        assert sub.holders(NS, K[0]) == ["b"]
        b.unregister()
        until(lambda: (sub.poll(0.05) or True) and B not in sub.holdings)
        assert sub.seq == stats(a).feed_seq
    finally:
        sub.close()


def test_late_subscriber_gap_triggers_resync(directory: Directory, make) -> None:
    a = make()
    a.register(reg(A))
    registered(a)
    sub = FeedSubscriber(directory.endpoint)
    try:
        assert sub.sync()
        sub.seq -= 1  # pretend one event was lost
        resyncs = sub.resyncs
        time.sleep(0.2)
        a.publish(K[:1])
        until(lambda: (sub.poll(0.05) or True) and sub.resyncs > resyncs)
        assert sub.holdings[A] == {K[0]}
    finally:
        sub.close()


# -- auth ---------------------------------------------------------------------------------


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text("correct horse battery staple 42\n")
    path.chmod(0o600)
    return path


def test_curve_members_get_in_others_do_not(tmp_path: Path, secret_file: Path) -> None:
    assert zmq.has("curve")
    d = Directory(tmp_path, "--secret-file", str(secret_file), "--heartbeat-interval", HB)
    good = DirectoryClient(d.endpoint, secret=ClusterSecret(b"correct horse battery staple 42"))
    wrong = DirectoryClient(d.endpoint, secret=ClusterSecret(b"a wrong secret of enough bytes"))
    none = DirectoryClient(d.endpoint)
    try:
        s = stats(good)
        assert s.secure
        good.register(reg(A))
        good.publish(K[:1])
        registered(good)
        assert wrong.call(Stats(), 1.0) is None
        assert none.call(Stats(), 0.5) is None
        wrong.register(reg(B))
        time.sleep(0.3)
        assert wrong.state is not RegState.REGISTERED
        assert [i.instance for i in stats(good).instances] == ["a"]
        # Knows the server's public key but not the members' client key: ZAP refuses it.
        ctx = zmq.Context()
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.curve_serverkey = auth.server_keys(ClusterSecret(
            b"correct horse battery staple 42")).public
        rogue.curve_publickey, rogue.curve_secretkey = zmq.curve_keypair()
        rogue.connect(d.endpoint)
        rogue.send(protocol.encode(Stats()), zmq.NOBLOCK) if rogue.poll(500, zmq.POLLOUT) else None
        assert not rogue.poll(500)
        rogue.close()
        ctx.term()
        until(lambda: "not a cluster member" in d.log.read_text())
        env = dict(os.environ, P2PKV_SECRET_FILE=str(secret_file))
        ok = subprocess.run([sys.executable, "-m", "p2pkv", "status", "--directory",
                             d.endpoint], env=env, capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0 and "CURVE" in ok.stdout
        refused = subprocess.run([sys.executable, "-m", "p2pkv", "status", "--directory",
                                  d.endpoint, "--timeout", "0.5"],
                                 env={k: v for k, v in os.environ.items()
                                      if k != "P2PKV_SECRET_FILE"},
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode == 1
    finally:
        for c in (good, wrong, none):
            c.close()
        d.stop()


def test_unauthenticated_directory_refuses_a_public_bind() -> None:
    out = subprocess.run([sys.executable, "-m", "p2pkv", "directory", "--bind",
                          "tcp://0.0.0.0:0"], capture_output=True, text=True, timeout=30,
                         env={k: v for k, v in os.environ.items() if k != "P2PKV_SECRET_FILE"})
    assert out.returncode == 2 and "--insecure-any-address" in out.stderr


# -- bad input ----------------------------------------------------------------------------


def test_floods_of_bad_input_are_counted_and_never_crash(directory: Directory, make) -> None:
    good = make()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(directory.endpoint)
    rng = random.Random(7)
    valid = protocol.encode(Publish(instance=A, namespace=NS, added=K, removed=[], seq=1))
    bad: list[list[bytes]] = []
    for _ in range(500):
        bad.append([rng.randbytes(rng.randrange(0, 200))])  # random bytes
        cut = rng.randrange(1, len(valid))
        bad.append([valid[:cut]])  # truncated
    bad += [[protocol.encode(Stats(v=protocol.PROTOCOL_VERSION + 3))]] * 100  # wrong version
    bad += [[msgspec.msgpack.encode({"t": "reg", "v": protocol.PROTOCOL_VERSION,
                                     "instance": 5, "epoch": "x"})]] * 100  # wrong types
    bad += [[b"\x00" * (protocol.MAX_MESSAGE_BYTES + 10)]] * 3  # oversized
    unknown = [[protocol.encode(Heartbeat(instance=InstanceId(f"ghost{i}"), epoch=1))]
               for i in range(2000)]  # unknown instance ids, thousands of them
    try:
        for frames in bad + unknown:
            sock.send_multipart(frames)
        replies = 0
        deadline = time.monotonic() + 20
        while replies < len(bad) + len(unknown) and time.monotonic() < deadline:
            if sock.poll(1000):
                reply = protocol.decode(sock.recv())
                assert isinstance(reply, protocol.Error) and reply.reason
                replies += 1
        assert replies == len(bad) + len(unknown)
        s = stats(good)
        assert s.rejected >= len(bad) - 50  # a few random byte strings may decode as Stats
        good.register(reg(A))
        registered(good)  # still serving
        assert directory.proc.poll() is None
    finally:
        sock.close()
        ctx.term()


def test_raw_register_reply_and_heartbeat_gap(directory: Directory, make) -> None:
    c = make()
    reply = c.call(Register(instance=A, epoch=1, namespace=NS, address="h:1", probe="p"), 5)
    assert isinstance(reply, RegisterReply) and reply.heartbeat_ms == 200 and reply.liveness == 3
    gap = c.call(Heartbeat(instance=A, epoch=1, seq=3), 5)
    assert isinstance(gap, protocol.Error) and gap.status == Status.SEQ_GAP
    assert lookup(c, K) == []


def test_metrics_endpoint_reports_counters() -> None:
    import urllib.request

    from p2pkv.directory.metrics import start_metrics
    from p2pkv.directory.server import DirectoryServer, ServerConfig

    server = DirectoryServer(ServerConfig())
    try:
        server._handle(protocol.encode(Stats(v=99)))  # one rejected message
        port = start_metrics(server, "127.0.0.1", 0)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"p2pkv_directory_instances 0.0" in text
        assert b'p2pkv_directory_rejected_messages_total{status="version_mismatch"} 1.0' in text
    finally:
        server.close()


def test_metrics_report_lookup_time_and_holdings() -> None:
    """Lookups answered by the serving loop land in ``p2pkv_directory_lookup_seconds``; the
    (chunk, holder) pairs in ``p2pkv_directory_holdings``."""
    import threading
    import urllib.request

    from p2pkv.directory.client import DirectoryClient
    from p2pkv.directory.metrics import start_metrics
    from p2pkv.directory.server import DirectoryServer, ServerConfig

    server = DirectoryServer(ServerConfig())
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    client = DirectoryClient(server.endpoint)
    try:
        for inst in (A, B):
            assert isinstance(client.call(Register(instance=inst, epoch=1, namespace=NS,
                                                   address=f"{inst}:1"), 5), RegisterReply)
            assert isinstance(client.call(Publish(instance=inst, namespace=NS, added=K[:3],
                                                  removed=[], seq=1, epoch=1), 5), protocol.Ok)
        for _ in range(3):
            assert len(lookup(client, K)) == 2
        port = start_metrics(server, "127.0.0.1", 0)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"p2pkv_directory_lookup_seconds_count 3.0" in text
        assert b'p2pkv_directory_lookup_seconds_bucket{le="+Inf"} 3.0' in text
        assert b"p2pkv_directory_holdings 6.0" in text
        assert b"p2pkv_directory_chunks 3.0" in text
    finally:
        client.close()
        stop.set()
        thread.join(5)
        server.close()
