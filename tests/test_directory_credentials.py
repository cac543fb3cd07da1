"""Per-instance credentials (issue 13) against a real CURVE directory process on loopback:
instance i's key (derived from the cluster secret and i, from a credential file) may act as i
and its ranks only; the members' shared key only reads; a key that is nobody's gets no answer;
quotas count per credential; a client holding the secret still registers (it derives the
instance's key)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from p2pkv.credential import credential_for, load_credential, write_credential
from p2pkv.directory import auth, protocol
from p2pkv.directory.client import DirectoryClient, RegState
from p2pkv.directory.protocol import (
    Error, Heartbeat, Lookup, LookupReply, Ok, Publish, Register, RegisterReply, Report,
    Snapshot, SnapshotReply, Stats, StatsReply, Status, Unregister,
)
from p2pkv.directory.registration import Registration
from p2pkv.errors import ConfigError
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from p2pkv.secret import ClusterSecret, data_plane_secret
from tests.test_directory_service import Directory, raw_reply

pytestmark = pytest.mark.timeout(60)

S = ClusterSecret(b"correct horse battery staple 42")
NS = Namespace("ns")
I, J = InstanceId("inst-i"), InstanceId("inst-j")
K = [ChunkKey(bytes([n]) * 32) for n in range(4)]


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(S.decode() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def directory(tmp_path: Path, secret_file: Path):
    d = Directory(tmp_path, "--secret-file", str(secret_file),
                  "--max-registrations-per-connection", "2")
    yield d
    d.stop()


@pytest.fixture
def connect(directory: Directory):
    ctx = zmq.Context()

    def _connect(cred: auth.Credential, rid: bytes | None = None) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, rid or auth.routing_id(cred.instance))
        auth.secure_client_socket(s, cred)
        s.connect(directory.endpoint)
        return s

    yield _connect
    ctx.destroy(linger=0)


def ask(sock: zmq.Socket, msg) -> protocol.Message:
    return raw_reply(sock, [protocol.encode(msg)])


def register(instance: InstanceId, epoch: int, port: int = 1) -> Register:
    return Register(instance=instance, epoch=epoch, namespace=NS, address=f"127.0.0.1:{port}")


def writes(instance: InstanceId, epoch: int) -> list:
    return [register(instance, epoch, port=666),
            Publish(instance=instance, namespace=NS, added=K, removed=[], seq=1, epoch=epoch),
            Heartbeat(instance=instance, epoch=epoch),
            Report(instance=instance, counters={"x": 1}, epoch=epoch),
            Unregister(instance=instance, epoch=epoch)]


def refused(reply: protocol.Message) -> bool:
    return isinstance(reply, Error) and reply.status == Status.NOT_THIS_INSTANCE


def members(sock: zmq.Socket) -> dict[str, tuple[int, str, int]]:
    reply = ask(sock, Stats())
    assert isinstance(reply, StatsReply) and reply.secure
    return {i.instance: (i.epoch, i.address, i.chunks) for i in reply.instances}


def test_the_members_key_reads_and_cannot_register(connect) -> None:
    member = connect(auth.member_credential(S))
    i = connect(auth.instance_credential(S, I))
    epoch = time.time_ns()
    assert isinstance(ask(i, register(I, epoch)), RegisterReply)
    assert isinstance(ask(i, Publish(instance=I, namespace=NS, added=K, removed=[], seq=1,
                                     epoch=epoch)), Ok)
    for msg in writes(I, epoch + 1) + writes(J, epoch):
        reply = ask(member, msg)
        assert refused(reply), (msg, reply)
        assert "only look up" in reply.reason
    lookup = ask(member, Lookup(namespace=NS, keys=K))
    assert isinstance(lookup, LookupReply) and [(h.instance, h.run) for h in lookup.holders] \
        == [(I, 4)]
    assert members(member) == {I: (epoch, "127.0.0.1:1", 4)}
    snap = ask(member, Snapshot())
    assert isinstance(snap, SnapshotReply) and [i.instance for i in snap.instances] == [I]


def test_an_instance_credential_cannot_act_as_another(tmp_path, connect) -> None:
    # the files as `p2pkv credential` writes them
    paths = {}
    for name in (I, J):
        paths[name] = tmp_path / f"{name}.credential"
        out = subprocess.run([sys.executable, "-m", "p2pkv", "credential", "--instance", name,
                              "--out", str(paths[name]), "--secret-file",
                              str(tmp_path / "secret")], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
    ci, cj = (load_credential(paths[n]).directory for n in (I, J))
    assert ci.keys.secret not in paths[J].read_bytes() and S not in paths[I].read_bytes()
    i, j = connect(ci), connect(cj)
    epoch = time.time_ns()
    assert isinstance(ask(j, register(J, epoch, port=2)), RegisterReply)
    assert isinstance(ask(i, register(I, epoch)), RegisterReply)
    assert isinstance(ask(i, register(InstanceId(f"{I}/1"), epoch, port=3)), RegisterReply)
    for msg in writes(J, epoch) + writes(J, epoch + 1) + writes(InstanceId(f"{I}x"), epoch) \
            + writes(InstanceId(f"{J}/1"), epoch):
        reply = ask(i, msg)
        assert refused(reply), (msg, reply)
        assert f"credential of instance {I}" in reply.reason
    # j is untouched: its address, epoch and lease are its own
    assert members(j)[J] == (epoch, "127.0.0.1:2", 0)
    assert isinstance(ask(j, Heartbeat(instance=J, epoch=epoch)), Ok)
    # an instance credential reads too (the connector's scheduler side looks up with it)
    assert isinstance(ask(j, Lookup(namespace=NS, keys=K)), LookupReply)


def test_a_key_that_is_nobodys_gets_no_answer(connect, directory: Directory) -> None:
    # i's key under a routing id naming j, and a random key naming i: dropped unanswered
    ci = auth.instance_credential(S, I)
    rogue = auth.Credential(ci.server_public, auth.CurveKeys(*zmq.curve_keypair()), I)
    for sock in (connect(ci, rid=auth.routing_id(J)), connect(rogue),
                 connect(ci, rid=b"no-instance-named")):
        sock.send(protocol.encode(Stats()))
        sock.send(protocol.encode(register(I, time.time_ns())))
        assert not sock.poll(500)
    assert "not a cluster member" in directory.log.read_text()
    assert ask(connect(ci), Stats()) is not None  # the right pair still gets in


def test_registrations_count_against_the_credential(connect) -> None:
    """--max-registrations-per-connection 2: i's credential registers two of its ranks, on
    two connections; a third is over quota on any connection of it, j's still gets in."""
    ci = auth.instance_credential(S, I)
    epoch = time.time_ns()
    assert isinstance(ask(connect(ci), register(I, epoch)), RegisterReply)
    assert isinstance(ask(connect(ci), register(InstanceId(f"{I}/1"), epoch)), RegisterReply)
    over = ask(connect(ci), register(InstanceId(f"{I}/2"), epoch))
    assert isinstance(over, Error) and over.status == Status.OVER_QUOTA, over
    assert "credential" in over.reason
    assert isinstance(ask(connect(auth.instance_credential(S, J)), register(J, epoch)),
                      RegisterReply)


def test_clients_with_a_credential_or_the_secret_register(directory: Directory,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "i.credential"
    write_credential(path, credential_for(S, I))
    cred = load_credential(path)
    assert cred.data_plane == data_plane_secret(S) and cred.data_plane != S
    with_file = DirectoryClient(directory.endpoint, credential=cred.directory)
    with_secret = DirectoryClient(directory.endpoint, secret=S)  # derives j's key itself
    reader = DirectoryClient(directory.endpoint, secret=S)
    try:
        with pytest.raises(ConfigError, match="credential of instance inst-i"):
            with_file.register(Registration(J, time.time_ns(), NS, "127.0.0.1:9"))
        with_file.register(Registration(InstanceId(f"{I}/1"), time.time_ns(), NS,
                                        "127.0.0.1:1"), wait_connected_s=2)
        with_file.publish(K[:2])
        with_secret.register(Registration(J, time.time_ns(), NS, "127.0.0.1:2"),
                             wait_connected_s=2)
        with_secret.publish(K[:1])
        deadline = time.monotonic() + 10
        while not (with_file.state is with_secret.state is RegState.REGISTERED):
            assert time.monotonic() < deadline, (with_file.state, with_secret.state)
            time.sleep(0.05)
        while True:  # publishes land after the Register
            reply = reader.call(Lookup(namespace=NS, keys=K), 5)
            runs = sorted((h.instance, h.run) for h in reply.holders)
            if runs == [(f"{I}/1", 2), (J, 1)] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert runs == [(f"{I}/1", 2), (J, 1)]
        # each holder names the key it registered with (a rank: its engine's credential),
        # what its data plane must prove to a puller (transport/identity.py)
        assert {h.instance: h.key for h in reply.holders} == {
            f"{I}/1": auth.instance_keys(S, I).public.decode(),
            J: auth.instance_keys(S, J).public.decode()}
    finally:
        for c in (with_file, with_secret, reader):
            c.close()


def test_credential_files_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "c"
    write_credential(path, credential_for(S, I))
    assert load_credential(path).instance == I
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_credential(path)
    path.chmod(0o600)
    other = credential_for(S, J).directory.keys.public.decode()
    path.write_text(path.read_text().replace(
        credential_for(S, I).directory.keys.public.decode(), other))
    with pytest.raises(ConfigError, match="not that of its secret key"):
        load_credential(path)
    with pytest.raises(ConfigError, match="instance id"):
        credential_for(S, InstanceId("x" * 201))


def test_covers_an_instance_and_its_ranks_only() -> None:
    a = InstanceId("a")
    assert auth.covers(a, a) and auth.covers(a, InstanceId("a/3"))
    for other in ("b", "ab", "a/", "a/b", "a/1/2", "a/٣"):
        assert not auth.covers(a, InstanceId(other)), other
    rid = auth.routing_id(a)
    assert auth.routing_instance(rid) == a and auth.routing_instance(auth.routing_id(None)) \
        is None


def test_a_reader_credential_reads_and_follows_the_feed_only(tmp_path: Path, connect,
                                                              directory: Directory) -> None:
    """The router's credential (`p2pkv credential --reader`): the members' read-only pair and
    the directory's key; no instance, no data-plane secret. The directory refuses its writes;
    its lookups, snapshot and feed work (the router's Holdings syncs with it)."""
    from p2pkv.credential import load_reader_credential
    from p2pkv.directory.feed import FeedSubscriber
    from p2pkv.router.holdings import Holdings

    path = tmp_path / "router.credential"
    out = subprocess.run([sys.executable, "-m", "p2pkv", "credential", "--reader", "--out",
                          str(path), "--secret-file", str(tmp_path / "secret")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert "data_plane" not in text and "instance" not in text and S.decode() not in text
    assert data_plane_secret(S).hex() not in text
    reader = load_reader_credential(path).directory
    assert reader.instance is None and reader == auth.member_credential(S)
    epoch = time.time_ns()
    i = connect(auth.instance_credential(S, I))
    assert isinstance(ask(i, register(I, epoch)), RegisterReply)
    r = connect(reader)
    for msg in writes(I, epoch) + writes(I, epoch + 1):
        reply = ask(r, msg)
        assert refused(reply) and "only look up" in reply.reason, (msg, reply)
    assert members(r) == {I: (epoch, "127.0.0.1:1", 0)}  # untouched
    sub = FeedSubscriber(directory.endpoint, credential=reader)
    holdings = Holdings(directory.endpoint, credential=reader)
    holdings.start()
    try:
        assert sub.sync(timeout_s=5.0) and set(sub.instances) == {I}
        # the feed may drop events sent before its CURVE handshake ends (PUB/SUB): publish
        # again until one arrives (a later one after a drop is a gap: it resyncs)
        deadline, seq = time.monotonic() + 20, 0
        while sub.holders(NS, K[0]) != [I]:
            assert time.monotonic() < deadline, sub.holdings
            seq += 1
            added = K if seq == 1 else [ChunkKey(bytes([100 + seq % 100]) * 32)]
            assert isinstance(ask(i, Publish(instance=I, namespace=NS, added=added, removed=[],
                                             seq=seq, epoch=epoch)), Ok)
            sub.poll(0.5)
        assert holdings.synced.wait(10)
    finally:
        holdings.close()
        sub.close()


def test_each_credential_loader_refuses_the_other_kind(tmp_path: Path) -> None:
    from p2pkv.credential import load_reader_credential, reader_credential_for

    inst, reader = tmp_path / "i", tmp_path / "r"
    write_credential(inst, credential_for(S, I))
    write_credential(reader, reader_credential_for(S))
    with pytest.raises(ConfigError, match="is a reader credential"):
        load_credential(reader)
    with pytest.raises(ConfigError, match="not a reader credential"):
        load_reader_credential(inst)
    reader.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_reader_credential(reader)
    reader.chmod(0o600)
    reader.write_text(reader.read_text().replace("true", "false"))
    with pytest.raises(ConfigError, match="'reader' must be true"):
        load_reader_credential(reader)
    out = subprocess.run([sys.executable, "-m", "p2pkv", "credential", "--reader",
                          "--instance", "x", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "not allowed with" in out.stderr
