"""Staged pulls: the same chunks pulled in parts (*stages*), in order, each stage announced
as soon as its bytes have landed, so that a consumer can start on stage 0 while the later
stages are still in flight (the connector's layer-wise loads: a stage is a group of layers).

Every stage names the same chunks in the same order, each with its own selection
(``selection.py``). Over the TCP stream each stage is one ``Pull`` with its selection on one
connection, the holder digesting the selected bytes (one pass over each chunk in all). Out of
a same-host holder's slab, the chunks are pinned once, each stage's bytes are copied, and each
chunk's stored digest (which covers the whole chunk) is checked once, after the last stage,
instead of once per stage.

NOTE: a stage is announced when its bytes have *landed*, not when they are verified: results
are final only when the pull returns. The caller must not let anything computed from a stage
outlive a failed result (the connector reports the chunk's blocks to vLLM, which throws the
step's output away and recomputes).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence

import numpy as np

from p2pkv.errors import DeadlineExceeded, TransportError
from p2pkv.transport import wire
from p2pkv.transport.base import (
    Outcome,
    PullItem,
    PullResult,
    host_pieces,
    mismatch,
    missing,
    ok,
)
from p2pkv.transport.selection import Selection
from p2pkv.transport.session import Session
from p2pkv.transport.shm import pins

OnStage = Callable[[int], None]
"""Called with a stage's index once its bytes have landed (on the pulling thread)."""


def check_stages(stages: Sequence[Sequence[PullItem]]) -> None:
    """ValueError (a caller bug) unless every stage names the same keys in the same order."""
    keys = [i.key for i in stages[0]] if stages else []
    if any([i.key for i in s] != keys for s in stages):
        raise ValueError("the stages of a staged pull must name the same chunks in order")


def merge(stages: Sequence[list[PullResult]]) -> list[PullResult]:
    """Per chunk, the first result of any stage that is not OK (else OK)."""
    out = []
    for results in zip(*stages):
        bad = [r for r in results if r.outcome is not Outcome.OK]
        out.append(bad[0] if bad else results[0])
    return out


def pull_shm(sock: socket.socket, session: Session, slab, stages: Sequence[Sequence[PullItem]],
             deadline: float, on_stage: OnStage, namespace: str = "", epoch: int = 0,
             keyed: bool = False) -> list[list[PullResult]]:
    """Pin the chunks on the holder over ``sock`` (its ``session``), copy each stage's bytes
    out of ``slab`` (a ``shm.MappedSlab``), announcing each, check every chunk's digest (with
    ``keyed``: its keyed tag, as ``shm.pull``) once, release the pins. One result list per
    stage (a chunk's outcome is the same in every stage). Raises TransportError/OSError when
    the whole pull failed (the connection is then unusable)."""
    check_stages(stages)
    items = stages[0]
    with pins(sock, session, items, deadline, namespace, epoch, keyed) as pinned:
        sources = [_source(slab, stages, i, h) for i, (h, _) in enumerate(pinned)]
        for s, stage in enumerate(stages):
            for item, src in zip(stage, sources):
                if src is not None:
                    if time.monotonic() > deadline:
                        raise DeadlineExceeded("deadline passed while copying")
                    _copy_selected(src, item.select, item.dest)  # type: ignore[arg-type]
            on_stage(s)
        outcome = [missing(item) if src is None else
                   ok(item) if want.of(memoryview(src)) else mismatch(item)
                   for item, src, (_, want) in zip(items, sources, pinned)]
        return [[PullResult(item.key, r.outcome, r.reason) for item, r in zip(stage, outcome)]
                for stage in stages]


def _source(slab, stages: Sequence[Sequence[PullItem]], i: int, h: wire.PinHeader
            ) -> np.ndarray | None:
    """The holder's chunk ``i`` in its slab (None: it no longer has it), checked against
    what every stage expects of it."""
    if h.status is wire.Status.MISSING:
        return None
    if h.status is not wire.Status.OK:
        raise TransportError(f"holder answered {h.status.name}")
    if h.nbytes > slab.slot_bytes or h.slot * slab.slot_bytes + h.nbytes > slab.nbytes:
        raise TransportError(f"bad pin reply: slot {h.slot}, {h.nbytes} bytes")
    for stage in stages:
        item = stage[i]
        if not host_pieces(item.dest):
            raise TransportError("a staged pull into GPU memory is not supported")
        select = item.select
        if select is not None and (why := select.check(h.nbytes)):
            raise TransportError(f"selection does not fit the holder's chunk: {why}")
        want = select.nbytes(h.nbytes) if select is not None else h.nbytes
        if want != item.nbytes:
            raise TransportError(f"a stage expects {item.nbytes} bytes of a chunk, the "
                                 f"holder's selection has {want}")
    off = h.slot * slab.slot_bytes
    return slab.array[off:off + h.nbytes]


def _copy_selected(src: np.ndarray, select: Selection | None, dest: Sequence[memoryview]
                   ) -> None:
    """Copy the selected bytes of ``src`` (all of them without a selection) into ``dest``."""
    pieces = [np.frombuffer(d, dtype=np.uint8) for d in dest]
    ranges = select.ranges(src.nbytes) if select is not None else iter([(0, src.nbytes)])
    i = at = 0
    for a, n in ranges:
        while n:
            piece = pieces[i]
            take = min(n, piece.nbytes - at)
            np.copyto(piece[at:at + take], src[a:a + take])
            a, n, at = a + take, n - take, at + take
            if at == piece.nbytes:
                i, at = i + 1, 0
