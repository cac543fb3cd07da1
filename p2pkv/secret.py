"""The cluster secret: one shared secret that makes a process a member of the cluster.

Members prove they hold it to the directory (CURVE keys derived from it) and to each other's
data planes (an HMAC challenge-response). It is read from a file (never from argv, where
other users of the host could see it) by the CLI, launch scripts and the connector's config.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import NewType

from p2pkv.errors import ConfigError

ClusterSecret = NewType("ClusterSecret", bytes)

MIN_SECRET_BYTES = 16


def read_private_file(path: str | Path, what: str) -> bytes:
    """The bytes of a file only its owner may read (a secret, a credential); ConfigError
    naming ``what`` when it cannot be read or its group or others can read it."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {str(path)!r}: {e}") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        raise ConfigError(f"the {what} {str(path)!r} has mode "
                          f"{stat.S_IMODE(mode):o}: its group or others can read it; make it "
                          f"readable by its owner only (chmod 600)")
    return data


def load_secret(path: str | Path) -> ClusterSecret:
    """Read a secret file (surrounding whitespace ignored); refuse short or missing ones, and
    ones that the file's group or others may read (its mode, after symlinks: a Kubernetes
    secret volume's ``defaultMode`` 0400 passes)."""
    data = read_private_file(path, "cluster secret file").strip()
    if len(data) < MIN_SECRET_BYTES:
        raise ConfigError(f"the cluster secret in {str(path)!r} is shorter than "
                          f"{MIN_SECRET_BYTES} bytes")
    return ClusterSecret(data)


def derive(secret: ClusterSecret, purpose: str) -> bytes:
    """A 32-byte key for one purpose (e.g. "directory-curve-server"), so that no two uses of
    the secret share a key."""
    return hmac.new(secret, b"p2pkv/" + purpose.encode(), hashlib.sha256).digest()


def data_plane_secret(secret: ClusterSecret) -> ClusterSecret:
    """What the data plane's keys are derived from (``make_transport(secret=...)``): not the
    cluster secret itself, so that an instance's credential file can carry it without
    carrying the secret (the data plane keeps one member key: pulling is what members are
    for). Every member, with the secret or a credential, keys its data plane with this."""
    return ClusterSecret(derive(secret, "data-plane-members"))
