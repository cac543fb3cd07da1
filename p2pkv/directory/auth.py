"""CURVE keys for the directory, derived from the cluster secret, and the loopback rule.

Every member derives the same two key pairs from the secret: the server's
(``directory-curve-server``) and one shared client pair (``directory-curve-client``). The
server allows exactly that client public key (its ZAP handler, inside the server loop), so
holding the secret is what makes a process a member. Without a secret nothing is authenticated or encrypted, and
the server refuses to bind anywhere but loopback unless told otherwise.

Used by ``server`` (bind side: ROUTER and feed XPUB) and ``client`` (DEALER, feed SUB).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import zmq
import zmq.utils.z85

from p2pkv.errors import ConfigError
from p2pkv.secret import ClusterSecret, derive


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """A Z85-encoded CURVE key pair (40 ASCII bytes each)."""

    public: bytes
    secret: bytes


def _pair(secret: ClusterSecret, purpose: str) -> CurveKeys:
    if not zmq.has("curve"):
        raise ConfigError("this libzmq has no CURVE support; a cluster secret cannot be used")
    private = zmq.utils.z85.encode(derive(secret, purpose))
    return CurveKeys(zmq.curve_public(private), private)


def server_keys(secret: ClusterSecret) -> CurveKeys:
    return _pair(secret, "directory-curve-server")


def client_keys(secret: ClusterSecret) -> CurveKeys:
    return _pair(secret, "directory-curve-client")


def secure_server_socket(sock: zmq.Socket, secret: ClusterSecret) -> None:
    """Make ``sock`` (before bind) a CURVE server; ZAP then checks each client's key."""
    keys = server_keys(secret)
    sock.curve_server = True
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.zap_domain = b"p2pkv"


def secure_client_socket(sock: zmq.Socket, secret: ClusterSecret) -> None:
    """Make ``sock`` (before connect) a CURVE client of the directory."""
    mine = client_keys(secret)
    sock.curve_serverkey = server_keys(secret).public
    sock.curve_publickey = mine.public
    sock.curve_secretkey = mine.secret


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
