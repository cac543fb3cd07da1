"""CURVE keys for the directory, derived from the cluster secret; who a caller is; the
loopback rule.

Keys, all derived from the cluster secret ``S`` (so the launchers hold one secret):

* the server's pair (``directory-curve-server``), which every client needs the public half of;
* the shared *member* pair (``directory-curve-client``): routers, ``p2pkv status``, the
  doctor. It may only read (Lookup, Stats, Snapshot);
* one pair per instance ``i`` (``directory-curve-instance/i``): what a launcher writes into
  ``i``'s credential file (``p2pkv.credential``) instead of ``S``. It may read, and change
  the registrations of ``i`` and of its worker ranks ``i/<n>``, and of nothing else.

NOTE: libzmq's ZAP request carries the client's public key but not its routing id (its
"identity" frame is the *server* socket's own routing id, measured with libzmq 4.3.5), so ZAP
cannot tell which instance a key claims to be. The server's ZAP handler therefore lets in
the member key (user id ``member``) and every other CURVE key with the key itself as user id;
an instance's client names its instance in its routing id (:func:`routing_id`), and the
server checks per message (:class:`Callers`) that the key is that instance's. Messages from
any other key are dropped unanswered, as if ZAP had refused them. Without the server's public
key (derived from ``S``, in no file but credential files) no handshake even starts.

Used by ``server`` (bind side: ROUTER and feed XPUB; :class:`Callers`) and ``client``
(DEALER, feed SUB; :class:`Credential`).
"""

from __future__ import annotations

import ipaddress
import secrets
from collections import OrderedDict
from dataclasses import dataclass

import zmq
import zmq.utils.z85

from p2pkv.errors import ConfigError
from p2pkv.keys import InstanceId
from p2pkv.secret import ClusterSecret, derive

MEMBER_USER = "member"
"""ZAP user id of a connection with the shared member key."""

ROUTER_DOMAIN = b"p2pkv"
FEED_DOMAIN = b"p2pkv-feed"
"""ZAP domains of the two server sockets: the feed lets in the member key only."""

MAX_CREDENTIAL_INSTANCE_BYTES = 200
"""Longest instance id a credential may name (it travels in a ZeroMQ routing id, ≤ 255 B)."""

_RID_PREFIX = b"p2pkv-"
_RID_RANDOM = 16
_RID_SEP = len(_RID_PREFIX) + _RID_RANDOM
_CACHE_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """A Z85-encoded CURVE key pair (40 ASCII bytes each)."""

    public: bytes
    secret: bytes


@dataclass(frozen=True, slots=True)
class Credential:
    """What a client presents to a CURVE directory: the server's public key, its own key
    pair, and whose pair that is (None: the shared member pair, read-only)."""

    server_public: bytes
    keys: CurveKeys
    instance: InstanceId | None = None


def _pair(secret: ClusterSecret, purpose: str) -> CurveKeys:
    if not zmq.has("curve"):
        raise ConfigError("this libzmq has no CURVE support; a cluster secret cannot be used")
    private = zmq.utils.z85.encode(derive(secret, purpose))
    return CurveKeys(zmq.curve_public(private), private)


def server_keys(secret: ClusterSecret) -> CurveKeys:
    return _pair(secret, "directory-curve-server")


def client_keys(secret: ClusterSecret) -> CurveKeys:
    """The shared member pair (read-only at the directory)."""
    return _pair(secret, "directory-curve-client")


def instance_keys(secret: ClusterSecret, instance: InstanceId) -> CurveKeys:
    """Instance ``instance``'s own pair (writes for it and its ranks ``instance/<n>``)."""
    return _pair(secret, "directory-curve-instance/" + instance)


def member_credential(secret: ClusterSecret) -> Credential:
    return Credential(server_keys(secret).public, client_keys(secret))


def instance_credential(secret: ClusterSecret, instance: InstanceId) -> Credential:
    check_credential_instance(instance)
    return Credential(server_keys(secret).public, instance_keys(secret, instance), instance)


def check_credential_instance(instance: str) -> None:
    if not instance or len(instance.encode()) > MAX_CREDENTIAL_INSTANCE_BYTES:
        raise ConfigError(f"a credential's instance id must be 1-{MAX_CREDENTIAL_INSTANCE_BYTES}"
                          f" bytes, not {instance!r}")


def covers(credential: InstanceId, instance: InstanceId) -> bool:
    """Whether ``credential``'s holder may act as ``instance``: itself or one of its worker
    ranks (``<credential>/<n>``, as the connector names ranks above 0)."""
    if instance == credential:
        return True
    rank = instance[len(credential) + 1:]
    return instance.startswith(credential + "/") and rank.isascii() and rank.isdigit()


def routing_id(instance: InstanceId | None) -> bytes:
    """A client's ZeroMQ routing id: random (the connection that registered an instance owns
    it, and nobody can guess it to take the connection over), plus the credential's instance
    when it has one, so the server knows which instance's key to expect."""
    rid = _RID_PREFIX + secrets.token_bytes(_RID_RANDOM)
    return rid if instance is None else rid + b"@" + instance.encode()


def routing_instance(rid: bytes) -> InstanceId | None:
    """The instance a routing id made by :func:`routing_id` names (None: none)."""
    if len(rid) <= _RID_SEP + 1 or not rid.startswith(_RID_PREFIX) or rid[_RID_SEP] != 0x40:
        return None
    try:
        return InstanceId(rid[_RID_SEP + 1:].decode())
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a message to a CURVE directory: the shared member key (``credential`` None:
    reads only) or instance ``credential``'s key (reads; writes for it and its ranks)."""

    credential: InstanceId | None = None
    key: str = ""
    """With ``credential``: its Z85 public key (what a Holder of its registrations names)."""

    def may_act_as(self, instance: InstanceId) -> bool:
        return self.credential is not None and covers(self.credential, instance)


MEMBER = Caller()


class Callers:
    """The server's side of the keys: answers ZAP, and tells per message who sent it.

    Deriving an instance's public key costs an HMAC and a curve multiplication (~0.25 ms
    on a loaded 2-core host), so the (routing id, key) pairs checked are remembered (at most
    4,096, least recently seen out).
    """

    def __init__(self, secret: ClusterSecret) -> None:
        self._secret = secret
        self.member_key = client_keys(secret).public
        self._checked: OrderedDict[tuple[bytes, str], Caller | None] = OrderedDict()

    def zap_user(self, domain: bytes, mechanism: bytes, key: bytes) -> str | None:
        """The ZAP user id for a CURVE client with raw public ``key``; None: refused."""
        if mechanism != b"CURVE" or len(key) != 32:
            return None
        z85 = zmq.utils.z85.encode(key)
        if z85 == self.member_key:
            return MEMBER_USER
        return z85.decode() if domain == ROUTER_DOMAIN else None

    def caller(self, rid: bytes, user: str) -> Caller | None:
        """Who a message from routing id ``rid`` with ZAP user id ``user`` comes from; None:
        a key that is neither the member key nor the key of the instance ``rid`` names."""
        if user == MEMBER_USER:
            return MEMBER
        cache_key = (rid, user)
        try:
            caller = self._checked[cache_key]
        except KeyError:
            caller = self._check(rid, user)
            self._checked[cache_key] = caller
            if len(self._checked) > _CACHE_ENTRIES:
                self._checked.popitem(last=False)
        else:
            self._checked.move_to_end(cache_key)
        return caller

    def _check(self, rid: bytes, user: str) -> Caller | None:
        instance = routing_instance(rid)
        if instance is None or len(instance.encode()) > MAX_CREDENTIAL_INSTANCE_BYTES:
            return None
        return (Caller(instance, user) if instance_keys(self._secret, instance).public
                == user.encode() else None)


def secure_server_socket(sock: zmq.Socket, secret: ClusterSecret, domain: bytes) -> None:
    """Make ``sock`` (before bind) a CURVE server; ZAP then checks each client's key."""
    keys = server_keys(secret)
    sock.curve_server = True
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.zap_domain = domain


def secure_client_socket(sock: zmq.Socket, credential: Credential | ClusterSecret) -> None:
    """Make ``sock`` (before connect) a CURVE client of the directory: with ``credential``'s
    keys, or with a cluster secret's member keys (read-only)."""
    if not isinstance(credential, Credential):
        credential = member_credential(credential)
    sock.curve_serverkey = credential.server_public
    sock.curve_publickey = credential.keys.public
    sock.curve_secretkey = credential.keys.secret


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// endpoints on a loopback address."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: not provably loopback


def check_bind(endpoint: str, secret: ClusterSecret | None, insecure_any_address: bool) -> None:
    """Refuse an unauthenticated bind that other hosts could reach."""
    if secret is None and not insecure_any_address and not is_loopback_endpoint(endpoint):
        raise ConfigError(
            f"refusing to bind {endpoint} without a cluster secret: anyone who can reach it "
            f"could register or look up. Pass --secret-file (or P2PKV_SECRET_FILE), bind "
            f"to 127.0.0.1, or pass --insecure-any-address on a trusted network")
