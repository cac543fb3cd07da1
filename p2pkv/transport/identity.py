"""A holder's identity on the data plane (wire v6): which instance answers at an address.

The cluster's data-plane key makes a peer a *member*; it does not say *which* member. Every
instance also has its own CURVE key pair for the directory (``directory/auth.py``, derived
from the cluster secret and the instance id; what its credential file carries), and the
directory, which checked that key when the instance registered, hands its public half out
with the instance's address (``protocol.Holder.key``). A holder serves with its instance's
private key (:class:`Identity`); the puller's handshake nonce is a fresh X25519 public key
(:class:`Ephemeral`), and the holder's proof and the connection's session key cover
``X25519(instance key, that nonce)`` and the holder's ``PeerInfo`` (``wire``, ``session``,
``conn.client_handshake``, ``accept.Acceptor``). So:

- a puller told the holder's public key (``Transport.pull(..., holder_key=...)``) refuses
  any other member answering at that address (``conn.check_holder``): it cannot show that
  key in its PeerInfo and then prove it holds its private half;
- a member on the path that relays the handshake cannot compute the session key (it needs
  the puller's ephemeral private key or the holder's instance key), so it cannot read
  sealed bytes or forge any MACed header or keyed tag either.

A holder without an identity (no key given: tests, the doctor's peers) sends none, and a
puller that was told a key refuses it. CURVE keys are Curve25519 (libsodium's
``crypto_box``), so the instance's Z85 CURVE key pair is its X25519 pair as is.
"""

from __future__ import annotations

from typing import NewType

import zmq.utils.z85
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from p2pkv.errors import AuthError

KEY_BYTES = 32

HolderKey = NewType("HolderKey", bytes)
"""An instance's X25519 public key, raw (32 bytes): what a puller expects its holder to
prove (``PeerInfo.identity``)."""


def holder_key(z85: str | bytes) -> HolderKey:
    """A Z85 CURVE public key (40 characters, as the directory gives it) as a HolderKey;
    ValueError if it is not one."""
    raw = zmq.utils.z85.decode(z85.encode() if isinstance(z85, str) else z85)
    if len(raw) != KEY_BYTES:
        raise ValueError(f"a holder key is {KEY_BYTES} bytes, not {len(raw)}")
    return HolderKey(raw)


def _shared(private: X25519PrivateKey, peer: bytes) -> bytes:
    if len(peer) != KEY_BYTES:
        raise AuthError(f"an X25519 key of {len(peer)} bytes")
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise AuthError("an X25519 key of low order") from None


class Identity:
    """A holder's instance key pair (the X25519 view of its CURVE pair)."""

    __slots__ = ("_private", "public")

    def __init__(self, private: bytes) -> None:
        self._private = X25519PrivateKey.from_private_bytes(private)
        self.public = HolderKey(self._private.public_key().public_bytes_raw())

    @classmethod
    def from_curve_secret(cls, z85_secret: bytes) -> Identity:
        """From a Z85 CURVE secret key (``CurveKeys.secret``)."""
        return cls(zmq.utils.z85.decode(z85_secret))

    def shared(self, nonce_c: bytes) -> bytes:
        """X25519 with the puller's ephemeral key; AuthError for a key that is not one."""
        return _shared(self._private, nonce_c)


class Ephemeral:
    """A puller's one-connection X25519 key pair; its public half is the handshake nonce."""

    __slots__ = ("_private", "public")

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes_raw()

    def shared(self, identity: bytes) -> bytes:
        """X25519 with the holder's claimed identity key; AuthError for one that is not."""
        return _shared(self._private, identity)
