"""The directory as a real process on loopback, its client, and the status command."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

from p2pkv.directory import protocol
from p2pkv.directory.cli import add_directory_parser, add_status_parser
from p2pkv.directory.client import PENDING, DirectoryClient
from p2pkv.directory.protocol import (
    Error, LookupReply, Ok, Register, Report, Stats, StatsReply, Unregister,
)
from p2pkv.keys import ChunkKey, InstanceId, Namespace

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
NS = Namespace("ns")
A, B = InstanceId("a"), InstanceId("b")
K = [ChunkKey(bytes([i]) * 32) for i in range(6)]


class Directory:
    """A directory subprocess on an ephemeral port."""

    def __init__(self, tmp_path: Path) -> None:
        ready = tmp_path / "ready"
        self.log = tmp_path / "directory.log"
        env = dict(os.environ,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                            os.environ.get("PYTHONPATH")])))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "p2pkv.directory.server", "--bind", "tcp://127.0.0.1:0",
                 "--ready-file", str(ready)], cwd=REPO, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 15
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"directory did not start:\n{self.log.read_text()}")
            time.sleep(0.02)
        self.endpoint = ready.read_text().strip()

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Directory]:
    d = Directory(tmp_path)
    yield d
    d.stop()


@pytest.fixture
def client(directory: Directory) -> Iterator[DirectoryClient]:
    c = DirectoryClient(directory.endpoint)
    yield c
    c.close()


@pytest.fixture
def dead_endpoint() -> Iterator[str]:
    """A loopback port held (bound, not listening) so nothing answers there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def raw(directory: Directory) -> Iterator[zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(directory.endpoint)
    yield sock
    sock.close()
    ctx.term()


def raw_reply(sock: zmq.Socket, frames: list[bytes]) -> protocol.Message:
    sock.send_multipart(frames)
    assert sock.poll(5000), "no reply"
    return protocol.decode(sock.recv())


def stats(client: DirectoryClient) -> StatsReply:
    reply = client.call(Stats(), timeout_s=5)
    assert isinstance(reply, StatsReply)
    return reply


def test_register_publish_lookup_stats(client: DirectoryClient) -> None:
    assert client.wait_connected(5)
    assert client.register(A, 1, NS, "127.0.0.1:7001") > 0
    assert client.register(B, 1, NS, "127.0.0.1:7002") > 0
    client.publish(A, NS, added=K[:2])
    client.publish(B, NS, added=K[:4])
    client.report(B, {"chunks_pulled": 3, "bytes_pulled": 1024})
    rid = client.start_lookup(NS, K[:5], timeout_s=5)
    reply = client.wait_lookup(rid, max_wait_s=5)
    assert isinstance(reply, LookupReply)
    assert [(h.instance, h.address, h.run) for h in reply.holders] == [
        ("b", "127.0.0.1:7002", 4), ("a", "127.0.0.1:7001", 2)]
    assert client.poll_lookup(rid) is None  # forgotten once returned

    s = stats(client)
    assert [(i.instance, i.chunks, i.epoch) for i in s.instances] == [("a", 2, 1), ("b", 4, 1)]
    assert s.instances[1].counters == {"chunks_pulled": 3, "bytes_pulled": 1024}
    assert (s.lookups, s.keys_looked_up, s.keys_hit, s.rejected) == (1, 5, 4, 0)
    assert client.dropped == 0
    assert s.directory_epoch == client.directory_epoch


def test_poll_lookup_goes_pending_then_reply(client: DirectoryClient) -> None:
    assert client.wait_connected(5)
    client.register(A, 1, NS, "h:1")
    client.publish(A, NS, added=K[:1])
    rid = client.start_lookup(NS, K[:2], timeout_s=5)
    deadline = time.monotonic() + 5
    while (result := client.poll_lookup(rid)) is PENDING and time.monotonic() < deadline:
        time.sleep(0.001)
    assert isinstance(result, LookupReply) and result.holders[0].run == 1


def test_reregister_new_epoch_and_unregister(client: DirectoryClient) -> None:
    assert isinstance(client.call(Register(instance=A, epoch=1, namespace=NS, address="h:1"),
                                  5), Ok)
    client.publish(A, NS, added=K)
    assert stats(client).instances[0].chunks == len(K)
    client.register(A, 2, NS, "h:2")
    assert [(i.epoch, i.chunks, i.address) for i in stats(client).instances] == [(2, 0, "h:2")]
    assert isinstance(client.call(Unregister(instance=A), 5), Ok)
    assert stats(client).instances == []


def test_publish_is_split_into_messages_within_limits(client: DirectoryClient) -> None:
    assert client.wait_connected(5)
    client.register(A, 1, NS, "h:1")
    keys = [ChunkKey(i.to_bytes(8, "big")) for i in range(protocol.MAX_KEYS_PER_MESSAGE + 5)]
    client.publish(A, NS, added=keys)
    s = stats(client)
    assert s.instances[0].chunks == len(keys) and s.rejected == 0


def test_unknown_instance_gets_error(client: DirectoryClient) -> None:
    reply = client.call(Report(instance=A, counters={}), 5)
    assert isinstance(reply, Error) and "unknown instance" in reply.reason


def test_bad_frames_are_answered_and_counted(raw: zmq.Socket, client: DirectoryClient) -> None:
    assert isinstance(raw_reply(raw, [b"\xc1\xff random bytes"]), Error)
    assert isinstance(raw_reply(raw, [b"one", b"two", b"three"]), Error)
    too_big = raw_reply(raw, [b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1)])
    assert isinstance(too_big, Error) and "exceeds" in too_big.reason

    wrong = raw_reply(raw, [protocol.encode(Stats(v=protocol.PROTOCOL_VERSION + 1, rid=77))])
    assert isinstance(wrong, Error) and wrong.rid == 77 and "version" in wrong.reason
    future = raw_reply(raw, [msgspec.msgpack.encode({"t": "newfangled", "v": 9, "rid": 5})])
    assert isinstance(future, Error) and future.rid == 5 and "v9" in future.reason
    typo = raw_reply(raw, [msgspec.msgpack.encode({"t": "look", "v": 1, "rid": 6, "keys": 3})])
    assert isinstance(typo, Error) and typo.rid == 6 and "malformed" in typo.reason
    not_request = raw_reply(raw, [protocol.encode(Ok(rid=8))])
    assert isinstance(not_request, Error) and not_request.rid == 8

    assert stats(client).rejected == 7


def test_req_socket_envelope_is_supported(directory: Directory) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(directory.endpoint)
        sock.send(protocol.encode(Stats(rid=3)))
        assert sock.poll(5000)
        reply = protocol.decode(sock.recv())
        assert isinstance(reply, StatsReply) and reply.rid == 3
    finally:
        sock.close()
        ctx.term()


def test_sigterm_stops_the_directory_cleanly(directory: Directory) -> None:
    directory.proc.send_signal(signal.SIGTERM)
    assert directory.proc.wait(5) == 0
    assert "p2pkv directory listening on tcp://127.0.0.1:" in directory.log.read_text()


def test_dead_directory_lookup_ends_none_and_publish_never_blocks(dead_endpoint: str) -> None:
    client = DirectoryClient(dead_endpoint)
    try:
        start = time.monotonic()
        rid = client.start_lookup(NS, K, timeout_s=0.2)
        while (result := client.poll_lookup(rid)) is PENDING:
            assert time.monotonic() - start < 3
            time.sleep(0.01)
        assert result is None
        assert client.wait_lookup(client.start_lookup(NS, K, timeout_s=0.2), 5) is None
        for _ in range(2000):
            client.publish(A, NS, added=K)
        assert client.dropped >= 2000
        assert client.send_nowait(Stats()) == -1
        assert client.call(Stats(), timeout_s=0.2) is None
        assert time.monotonic() - start < 3
    finally:
        client.close()


def test_directory_killed_mid_session(directory: Directory, client: DirectoryClient) -> None:
    assert client.wait_connected(5)
    client.register(A, 1, NS, "h:1")
    stats(client)
    directory.proc.kill()
    directory.proc.wait(5)
    start = time.monotonic()
    rid = client.start_lookup(NS, K, timeout_s=0.3)
    assert client.wait_lookup(rid, max_wait_s=5) is None
    for _ in range(5000):
        client.publish(A, NS, added=K[:1])
    assert time.monotonic() - start < 3


class BlackHole:
    """A ROUTER that accepts requests and never answers."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def test_lookup_deadline_with_injected_clock() -> None:
    hole = BlackHole()
    now = [100.0]
    client = DirectoryClient(hole.endpoint, clock=lambda: now[0])
    try:
        assert client.wait_connected(5)
        rid = client.start_lookup(NS, K, timeout_s=1.0)
        assert rid > 0
        assert client.poll_lookup(rid) is PENDING
        now[0] += 0.5
        assert client.poll_lookup(rid) is PENDING
        now[0] += 0.6
        assert client.poll_lookup(rid) is None
        assert client.poll_lookup(rid) is None
    finally:
        client.close()
        hole.close()


def test_wait_lookup_bounds() -> None:
    hole = BlackHole()
    client = DirectoryClient(hole.endpoint)
    try:
        assert client.wait_connected(5)
        rid = client.start_lookup(NS, K, timeout_s=5)
        start = time.monotonic()
        assert client.wait_lookup(rid, max_wait_s=0.05) is PENDING
        assert client.wait_lookup(client.start_lookup(NS, K, timeout_s=0.1), 5) is None
        assert time.monotonic() - start < 2
    finally:
        client.close()
        hole.close()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="p2pkv")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_directory_parser(subparsers)
    add_status_parser(subparsers)
    return parser.parse_args(argv)


def test_cli_parsers() -> None:
    args = _parse(["directory", "--bind", "tcp://127.0.0.1:0", "--ready-file", "/tmp/x"])
    assert (args.bind, args.ready_file, callable(args.func)) == ("tcp://127.0.0.1:0", "/tmp/x",
                                                                   True)
    args = _parse(["status", "--directory", "tcp://h:1"])
    assert (args.directory, args.timeout) == ("tcp://h:1", 2.0)


def test_status_prints_instances_and_totals(client: DirectoryClient, directory: Directory,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert client.wait_connected(5)
    client.register(A, 1, NS, "127.0.0.1:7001")
    client.publish(A, NS, added=K[:3])
    client.report(A, {"chunks_pulled": 3})
    client.wait_lookup(client.start_lookup(NS, K[:4], timeout_s=5), 5)
    args = _parse(["status", "--directory", directory.endpoint])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "127.0.0.1:7001" in out and "chunks_pulled=3" in out
    assert "keys looked up 4" in out and "hit ratio 75.0%" in out


def test_status_without_directory_exits_1(dead_endpoint: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse(["status", "--directory", dead_endpoint, "--timeout", "0.3"])
    start = time.monotonic()
    assert args.func(args) == 1
    assert time.monotonic() - start < 3
    assert "no answer" in capsys.readouterr().err
