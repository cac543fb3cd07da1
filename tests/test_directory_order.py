"""The directory answers Lookups ahead of other connections' writes, never ahead of its own
connection's (``DirectoryServer._handle_batch``): a real server socket on loopback, raw
DEALER clients, one batch handled by the test."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from p2pkv.directory import protocol
from p2pkv.directory.protocol import Lookup, LookupReply, Ok, Publish, Register, RegisterReply
from p2pkv.directory.server import DirectoryServer, ServerConfig
from p2pkv.keys import ChunkKey, InstanceId, Namespace

pytestmark = pytest.mark.timeout(60)

NS = Namespace("ns")
A = InstanceId("a")
SETTLE_S = 0.3
"""Time for the queued messages to reach the server's socket before its batch runs."""


class RecordingServer(DirectoryServer):
    """Remembers the order of its replies: (routing id, reply type)."""

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config)
        self.sent: list[tuple[bytes, type]] = []

    def _send(self, envelope, reply) -> None:
        self.sent.append((envelope[0], type(reply)))
        super()._send(envelope, reply)


@pytest.fixture(params=[True, False], ids=["lookups-first", "arrival-order"])
def server(request) -> Iterator[RecordingServer]:
    s = RecordingServer(ServerConfig(lookups_first=request.param))
    yield s
    s.close()


def _dealer(ctx: zmq.Context, endpoint: str, rid: bytes) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, rid)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _replies(sock: zmq.Socket, n: int) -> list:
    got = []
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        if sock.poll(100):
            got.append(protocol.decode(sock.recv()))
    return got


def _batch(server: RecordingServer) -> None:
    assert server._socket.poll(5000)  # noqa: SLF001 - the test drives the loop's step
    time.sleep(SETTLE_S)
    server._handle_batch()  # noqa: SLF001


def _keys(n: int, base: int = 0) -> list[ChunkKey]:
    return [ChunkKey((base + i).to_bytes(32, "little")) for i in range(n)]


def test_a_lookup_goes_ahead_of_writes_but_not_its_own(server: RecordingServer) -> None:
    ctx = zmq.Context()
    writer = _dealer(ctx, server.endpoint, b"\x00writer")
    reader = _dealer(ctx, server.endpoint, b"\x00reader")
    try:
        writer.send(protocol.encode(Register(instance=A, epoch=1, namespace=NS,
                                             address="a:1", rid=1)))
        _batch(server)
        assert isinstance(_replies(writer, 1)[0], RegisterReply)
        server.sent.clear()
        first = _keys(4)
        for seq in range(1, 4):  # three big writes, then the writer's own lookup
            writer.send(protocol.encode(Publish(
                instance=A, namespace=NS, seq=seq, epoch=1, removed=[], rid=1 + seq,
                added=first if seq == 1 else _keys(20_000, base=seq * 100_000))))
        writer.send(protocol.encode(Lookup(namespace=NS, keys=first, rid=9)))
        reader.send(protocol.encode(Lookup(namespace=NS, keys=first, rid=10)))
        _batch(server)
        got = _replies(writer, 4)
        assert [type(r) for r in got] == [Ok, Ok, Ok, LookupReply]
        # the writer's lookup comes after its own publishes and sees them
        assert [h.instance for h in got[-1].holders] == [A] and got[-1].holders[0].run == 4
        reader_reply = _replies(reader, 1)[0]
        assert isinstance(reader_reply, LookupReply)
        order = [rid for rid, _ in server.sent]
        assert order.count(b"\x00writer") == 4 and order.count(b"\x00reader") == 1
        if server.config.lookups_first:
            # every message was queued before the batch: the reader's lookup is answered
            # before any of the writer's publishes is handled, and so sees none of them
            assert order[0] == b"\x00reader" and reader_reply.holders == []
    finally:
        writer.close()
        reader.close()
        ctx.term()
