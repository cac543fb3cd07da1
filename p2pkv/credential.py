"""Per-instance credential files: what a launcher gives an instance instead of the cluster
secret.

A credential names one instance (a vLLM engine id; it also covers that engine's worker
ranks ``<id>/<n>``) and carries, all derived from the cluster secret ``S``: the instance's
CURVE key pair for the directory (``directory-curve-instance/<id>``), the directory's server
public key, and the data plane's secret (``secret.data_plane_secret``). Not ``S``: an
instance that is broken into can then act at the directory only as itself (and still pull
and serve as any member: the data plane keeps one member key).

Written by ``LocalCluster`` (the demo, benches and tests), ``p2pkv launch node`` and
``p2pkv credential``; read by the connector (``credential_file`` in its config). The file is
JSON, readable by its owner only (refused otherwise, like the secret file).

A *reader* credential (``p2pkv credential --reader``; issue 13) is what the KV-aware router
gets: the members' shared CURVE pair, which the directory lets only read (Lookup, Stats,
Snapshot and the change feed), and the directory's public key. It has no instance and no
data-plane secret, so its holder can neither register, publish nor unregister anything, nor
pull or serve KV bytes. Each loader refuses the other kind's file by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq

from p2pkv.directory.auth import (
    Credential, CurveKeys, check_credential_instance, instance_credential, member_credential,
)
from p2pkv.errors import ConfigError
from p2pkv.keys import InstanceId
from p2pkv.secret import ClusterSecret, data_plane_secret, read_private_file

FORMAT = 1


class _File(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    p2pkv_credential: int
    instance: str
    directory_server_key: str
    public_key: str
    secret_key: str
    data_plane_secret: str
    """Hex."""


class _ReaderFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    p2pkv_credential: int
    reader: bool
    directory_server_key: str
    public_key: str
    secret_key: str


@dataclass(frozen=True, slots=True)
class InstanceCredential:
    """One instance's credential: its directory keys and the data plane's secret."""

    directory: Credential
    data_plane: ClusterSecret

    @property
    def instance(self) -> InstanceId:
        assert self.directory.instance is not None
        return self.directory.instance


@dataclass(frozen=True, slots=True)
class ReaderCredential:
    """The router's credential: read-only directory keys, nothing for the data plane."""

    directory: Credential


def credential_for(secret: ClusterSecret, instance: InstanceId) -> InstanceCredential:
    """Instance ``instance``'s credential, derived from the cluster secret."""
    return InstanceCredential(instance_credential(secret, instance),
                              data_plane_secret(secret))


def reader_credential_for(secret: ClusterSecret) -> ReaderCredential:
    """The read-only credential (the members' shared directory keys), from the secret."""
    return ReaderCredential(member_credential(secret))


def write_credential(path: str | Path,
                     credential: InstanceCredential | ReaderCredential) -> None:
    """Write ``credential`` to ``path`` (mode 0600, atomically: a reader never sees half)."""
    c = credential.directory
    file: _File | _ReaderFile
    if isinstance(credential, ReaderCredential):
        file = _ReaderFile(
            p2pkv_credential=FORMAT, reader=True, directory_server_key=c.server_public.decode(),
            public_key=c.keys.public.decode(), secret_key=c.keys.secret.decode())
    else:
        file = _File(
            p2pkv_credential=FORMAT, instance=credential.instance,
            directory_server_key=c.server_public.decode(), public_key=c.keys.public.decode(),
            secret_key=c.keys.secret.decode(), data_plane_secret=credential.data_plane.hex())
    data = msgspec.json.encode(file)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _is_reader_file(data: bytes) -> bool:
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return False
    return isinstance(raw, dict) and "reader" in raw


def _keys(server_key: str, public_key: str, secret_key: str) -> tuple[bytes, CurveKeys]:
    keys = CurveKeys(public_key.encode(), secret_key.encode())
    server = server_key.encode()
    if len(server) != 40 or len(keys.secret) != 40 or len(keys.public) != 40:
        raise ValueError("CURVE keys are 40 Z85 characters")
    if zmq.curve_public(keys.secret) != keys.public:
        raise ValueError("its public key is not that of its secret key")
    return server, keys


def load_credential(path: str | Path) -> InstanceCredential:
    """Read and check an instance's credential file; ConfigError if it is unreadable,
    readable by group or others, malformed, a reader credential, or its key pair does not
    match."""
    data = read_private_file(path, "credential file")
    if _is_reader_file(data):
        raise ConfigError(f"{str(path)!r} is a reader credential (read-only: lookups and the "
                          "feed, for the router); an instance needs its own, from "
                          "`p2pkv credential --instance ID`")
    try:
        f = msgspec.json.decode(data, type=_File)
        if f.p2pkv_credential != FORMAT:
            raise ValueError(f"format {f.p2pkv_credential}, this p2pkv reads {FORMAT}")
        check_credential_instance(f.instance)
        server, keys = _keys(f.directory_server_key, f.public_key, f.secret_key)
        plane = bytes.fromhex(f.data_plane_secret)
        if len(plane) != 32:
            raise ValueError("the data plane's secret is 32 bytes")
    except (msgspec.DecodeError, ValueError, ConfigError, zmq.ZMQError) as e:
        raise ConfigError(f"{str(path)!r} is not a p2pkv credential file: {e}") from None
    return InstanceCredential(Credential(server, keys, InstanceId(f.instance)),
                              ClusterSecret(plane))


def load_reader_credential(path: str | Path) -> ReaderCredential:
    """Read and check a reader credential file (the router's); ConfigError as
    :func:`load_credential`, and for an instance's credential (it could write)."""
    data = read_private_file(path, "credential file")
    if not _is_reader_file(data):
        raise ConfigError(f"{str(path)!r} is not a reader credential: the router takes the "
                          "read-only one from `p2pkv credential --reader`, not an instance's")
    try:
        f = msgspec.json.decode(data, type=_ReaderFile)
        if f.p2pkv_credential != FORMAT:
            raise ValueError(f"format {f.p2pkv_credential}, this p2pkv reads {FORMAT}")
        if not f.reader:
            raise ValueError("'reader' must be true")
        server, keys = _keys(f.directory_server_key, f.public_key, f.secret_key)
    except (msgspec.DecodeError, ValueError, zmq.ZMQError) as e:
        raise ConfigError(f"{str(path)!r} is not a p2pkv credential file: {e}") from None
    return ReaderCredential(Credential(server, keys, None))
