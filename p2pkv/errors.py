"""Error types shared across p2pkv (one hierarchy, so callers can catch P2PKVError).

Tiers (STYLE.md): ``None``/empty for "not available"; a P2PKVError subclass for peer and caller
errors; ``assert`` only for our own invariants.
"""


class P2PKVError(Exception):
    """Base of every error p2pkv raises on purpose."""


class ConfigError(P2PKVError, ValueError):
    """A configuration value is invalid."""


class TransportError(P2PKVError):
    """A pull failed: peer gone, deadline passed, bad framing, bad checksum."""


class DeadlineExceeded(TransportError):
    """A network wait ran past its deadline."""


class ChecksumMismatch(TransportError):
    """Received bytes do not match the digest the holder sent."""


class BadRequest(TransportError):
    """A peer sent data-plane bytes that are not a valid request or reply."""


class AuthError(TransportError):
    """A data-plane peer failed (or refused) the shared-secret challenge-response."""


# -- directory -------------------------------------------------------------------------------


class ProtocolError(P2PKVError, ValueError):
    """Bytes that are not a valid directory message (the reason says why); raised by
    ``p2pkv.directory.protocol.decode``."""


class DirectoryIndexError(P2PKVError, ValueError):
    """A request the directory's index refuses; ``status`` is a
    ``p2pkv.directory.protocol.Status`` value for the reply."""

    def __init__(self, status: str, reason: str, *, retry_after_s: float = 0.0) -> None:
        super().__init__(reason)
        self.status = status
        self.retry_after_s = retry_after_s
        """For INSTANCE_TAKEN: when the other lease lapses, unless it is renewed."""
