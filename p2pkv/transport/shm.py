"""Same-host path: copy chunks straight out of a same-host holder's shared slab.

The holder's store lives in a /dev/shm file (``ChunkStore(shared=True)``). Over the TCP control
connection the puller asks the holder to pin the chunks (``wire.Pin``: the store's refcount,
not page-locking); the reply gives each chunk's slot, generation, size and digest (on a keyed
connection, ``conn.ChunkDigest``: its keyed tag instead, ``wire.Pin.keyed``, so that whoever
can write the slab cannot change a byte unnoticed either). The puller copies from its read-only
mapping of the slab into the destination pieces, checks the digest or tag
(``session.Expected``), and releases the pins with one message (``wire.Release``). A pinned
slot is never rewritten, so the bytes copied are the chunk's; an evicted chunk cannot be pinned
and is reported missing. Used by ``PeerTransport`` when the holder's ``PeerInfo`` says it runs
on this host and its slab file can be opened here (the connection pool maps it: ``conn.py``).
"""

from __future__ import annotations

import mmap
import os
import re
import socket
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, TypeVar

import numpy as np
import xxhash

from p2pkv.cuda import page_lock, page_unlock
from p2pkv.errors import DeadlineExceeded, TransportError
from p2pkv.transport import wire
from p2pkv.transport.base import PullItem, PullResult, host_pieces, mismatch, missing, ok
from p2pkv.transport.land import scatter
from p2pkv.transport.selection import Selection
from p2pkv.transport.session import Expected, Session, encode_request, read_reply
from p2pkv.transport.sockio import send_views
from p2pkv.transport.wire import PeerInfo

# A holder's slab is always an fd of the holder's, unlinked file (store.SharedSlab): a PeerInfo
# naming anything else is refused before it is opened.
_SLAB_PATH = re.compile(r"/proc/[1-9][0-9]{0,9}/fd/[0-9]{1,10}")

# Copy and hash in blocks that stay in L2: the hash then reads the bytes the copy just wrote
# from cache instead of from memory (measured: ~1.5x faster than copy-then-hash for 64 MiB).
_BLOCK = 256 << 10


class _Hasher(Protocol):
    def update(self, data: memoryview, /) -> object: ...


H = TypeVar("H", bound=_Hasher)


def host_id() -> str:
    """Equal for processes on one host (one boot of one kernel), different across hosts."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{boot}/{socket.gethostname()}"


class MappedSlab:
    """A read-only mapping of a same-host peer's slab file (``nbytes``, in slots of
    ``slot_bytes``)."""

    def __init__(self, path: str, ident: str, nbytes: int, slot_bytes: int) -> None:
        self._path, self._ident, self.nbytes = path, ident, nbytes
        self.slot_bytes = slot_bytes
        self._map = self._map_read_only()
        self.array = np.frombuffer(self._map, dtype=np.uint8)
        self.dma_mode = ""  # how GPU copies read it: "" (not asked yet), see device_array

    def _map_read_only(self) -> mmap.mmap:
        if not _SLAB_PATH.fullmatch(self._path):
            raise TransportError(f"slab path {self._path!r} is not /proc/<pid>/fd/<n>")
        if self.slot_bytes <= 0 or self.nbytes <= 0 or self.nbytes % self.slot_bytes:
            raise TransportError(f"slab of {self.nbytes} bytes in slots of {self.slot_bytes}")
        # NOTE: O_NONBLOCK: whatever the path turns out to be, opening it cannot block the
        # pull thread (a FIFO without a writer would, for ever); it must then be a regular file.
        fd = os.open(self._path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise TransportError(f"{self._path} is not a regular file")
            if f"{st.st_dev}:{st.st_ino}" != self._ident:
                raise TransportError(f"{self._path} is not the holder's slab "
                                     "(another pid namespace?)")
            if st.st_size != self.nbytes:
                raise TransportError(f"slab {self._path} is not {self.nbytes} bytes")
            return mmap.mmap(fd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)

    def device_array(self) -> np.ndarray:
        """The slab as GPU copies should read it: page-locked, so that a host-to-device copy
        is one DMA. Tried once: the read-only mapping registered read-only (where the driver
        supports it), else the plain mapping (the driver stages the copy). The slab is never
        mapped writable here: a puller only reads it."""
        if not self.dma_mode:
            if page_lock(self.array.ctypes.data, self.nbytes, read_only=True):
                self.dma_mode = "page-locked read-only"
            else:
                self.dma_mode = "pageable"
        return self.array

    def close(self) -> None:
        if self.dma_mode.startswith("page-locked"):
            page_unlock(self.array.ctypes.data)
        self.dma_mode = "closed"
        m = self._map
        del self.array
        try:
            m.close()
        except BufferError:
            pass  # a view is still alive somewhere: the mapping goes when it does


def open_peer_slab(info: PeerInfo, local_host_id: str) -> tuple[MappedSlab | None, str]:
    """The holder's slab mapped here, or None and why not: the one per-peer shm-or-tcp
    decision (used by the connection pool and ``p2pkv doctor``).

    NOTE: processes in different network namespaces of one kernel are one host here (same
    boot id and, unless a UTS namespace says otherwise, hostname; same /proc and /dev/shm),
    and the shared path works between them: it needs one memory, not one network.
    """
    if not info.shm_path:
        return None, "it has no shared slab"
    if info.host_id != local_host_id:
        return None, "it runs on another host"
    try:
        return MappedSlab(info.shm_path, info.shm_ident, info.slab_bytes, info.slot_bytes), ""
    except (OSError, ValueError, TransportError) as e:
        return None, f"its slab cannot be mapped here ({e})"


def copy_and_digest(src: np.ndarray, dest: Sequence[memoryview]) -> int:
    """Copy ``src`` into the ``dest`` pieces in order; return xxh3-64 of the bytes written."""
    return copy_and_hash(src, dest, xxhash.xxh3_64()).intdigest()


def copy_and_hash(src: np.ndarray, dest: Sequence[memoryview], h: H) -> H:
    """Copy ``src`` into the ``dest`` pieces in order, feeding ``h`` the bytes written."""
    off = 0
    for piece in dest:
        out = np.frombuffer(piece, dtype=np.uint8)
        for a in range(0, out.nbytes, _BLOCK):
            b = min(a + _BLOCK, out.nbytes)
            np.copyto(out[a:b], src[off + a:off + b])
            h.update(memoryview(out[a:b]))
        off += out.nbytes
    return h


def _copy_selected(src: np.ndarray, select: Selection, dest: Sequence[memoryview]) -> None:
    """Copy the selected bytes of the chunk ``src`` into the ``dest`` pieces in order."""
    pieces = [np.frombuffer(d, dtype=np.uint8) for d in dest]
    i = at = 0
    for a, n in select.ranges(src.nbytes):
        while n:
            piece = pieces[i]
            take = min(n, piece.nbytes - at)
            np.copyto(piece[at:at + take], src[a:a + take])
            a, n, at = a + take, n - take, at + take
            if at == piece.nbytes:
                i, at = i + 1, 0


def pull(sock: socket.socket, session: Session, slab: MappedSlab, items: Sequence[PullItem],
         deadline: float, namespace: str = "", epoch: int = 0, keyed: bool = False
         ) -> list[PullResult]:
    """Pin ``items`` on the holder over ``sock`` (its ``session``), copy them out of ``slab``
    (checking each digest, or each keyed tag with ``keyed``), release the pins. Raises
    TransportError/OSError when the whole pull failed (the connection is then unusable)."""
    with pins(sock, session, items, deadline, namespace, epoch, keyed) as pinned:
        return [_copy_out(slab, item, h, want, deadline) for item, (h, want)
                in zip(items, pinned)]


@contextmanager
def pins(sock: socket.socket, session: Session, items: Sequence[PullItem], deadline: float,
         namespace: str = "", epoch: int = 0, keyed: bool = False
         ) -> Iterator[list[tuple[wire.PinHeader, Expected]]]:
    """Pin ``items``' chunks on the holder over ``sock`` (its ``session``): yields one
    ``PinHeader`` per item, with what its bytes must hash to (its digest, or with ``keyed``
    its keyed tag), and releases the pinned ones on exit, whatever happened."""
    number = session.requests
    send_views(sock, [encode_request(session, wire.Pin([bytes(i.key) for i in items],
                                                       namespace=namespace, epoch=epoch,
                                                       keyed=keyed))],
               max(deadline - time.monotonic(), 0.001))
    n = wire.KEYED_PIN_HEADER_BYTES if keyed else wire.PIN_HEADER_BYTES
    table = read_reply(sock, session, number, n, len(items), deadline)
    headers: list[tuple[wire.PinHeader, Expected]] = []
    for i in range(len(items)):
        if keyed:
            h, tag = wire.unpack_keyed_pin(table[i * n:(i + 1) * n])
            headers.append((h, Expected(0, tag, session, number, i)))
        else:
            h = wire.unpack_pin(table[i * n:(i + 1) * n])
            headers.append((h, Expected(h.digest)))
    pinned = [(h.slot, h.generation) for h, _ in headers if h.status is wire.Status.OK]
    try:
        yield headers
    finally:
        if pinned:
            send_views(sock, [encode_request(session, wire.Release(pinned))],
                       max(deadline - time.monotonic(), 0.001))


def _copy_out(slab: MappedSlab, item: PullItem, h: wire.PinHeader, want: Expected,
              deadline: float) -> PullResult:
    if h.status is wire.Status.MISSING:
        return missing(item)
    if h.status is not wire.Status.OK:
        raise TransportError(f"holder answered {h.status.name}")
    select = item.select
    if select is not None and (why := select.check(h.nbytes)):
        raise TransportError(f"selection does not fit the holder's chunk: {why}")
    size = select.nbytes(h.nbytes) if select is not None else h.nbytes
    if size != item.nbytes or h.nbytes > slab.slot_bytes or \
            h.slot * slab.slot_bytes + h.nbytes > slab.nbytes:
        raise TransportError(f"bad pin reply: slot {h.slot}, {h.nbytes} bytes, "
                             f"expected {item.nbytes}")
    if time.monotonic() > deadline:
        raise DeadlineExceeded("deadline passed while copying")
    off = h.slot * slab.slot_bytes
    src = slab.array[off:off + h.nbytes]
    if select is not None:
        if not host_pieces(item.dest):
            raise TransportError("a part of a chunk into GPU memory is not supported")
        # NOTE: the stored digest (or tag) covers the whole chunk: it is checked over the
        # whole chunk (read, not copied), and only the selected bytes are copied.
        _copy_selected(src, select, item.dest)  # type: ignore[arg-type]
        return ok(item) if want.of(memoryview(src)) else mismatch(item)
    if host_pieces(item.dest):
        good = want.matches(copy_and_hash(src, item.dest, want.hasher()))  # type: ignore[arg-type]
        return ok(item) if good else mismatch(item)
    # GPU destination: DMA straight from the mapped slab, hashed meanwhile
    dma = slab.device_array()[off:off + h.nbytes]
    good = scatter(dma, item.dest, verify=lambda: want.of(memoryview(src)))
    return ok(item) if good else mismatch(item)
