"""Request traces (Mooncake's FAST'25 format): one JSON object per line, parsed into typed
records once, at the edge.

Used by ``p2pkv bench trace`` and its tests. A line is
``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}``; each hash id
names one ``block_tokens``-token prefix block (512 in Mooncake's traces), and two requests
whose leading ids are equal share that prefix's KV. Any line that is not such a record
raises :class:`TraceError` naming the file and line, so a bad trace fails before a replay.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec

from p2pkv.errors import P2PKVError

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per hash id in Mooncake's published traces (its README)."""

_NonNeg = Annotated[int, msgspec.Meta(ge=0)]
_Positive = Annotated[int, msgspec.Meta(ge=1)]


class TraceError(P2PKVError, ValueError):
    """A trace line that is not a valid request record (the message names the line)."""


class _Line(msgspec.Struct, forbid_unknown_fields=False):
    timestamp: _NonNeg
    input_length: _Positive
    output_length: _NonNeg
    hash_ids: list[_NonNeg]


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace: when it arrives, how long it is, which prefix blocks it has."""

    index: int
    """Position in the trace (0-based), a stable request id for the replay."""
    arrival_s: float
    input_tokens: int
    output_tokens: int
    blocks: tuple[int, ...]
    """Hash ids of the prompt's prefix blocks, in prompt order."""

    def block_tokens(self, i: int, block_tokens: int) -> int:
        """Tokens of block ``i`` (the last block may be partial)."""
        return min(block_tokens, self.input_tokens - i * block_tokens)

    def prefix_tokens(self, blocks: int, block_tokens: int) -> int:
        """Tokens covered by the first ``blocks`` blocks."""
        return min(self.input_tokens, blocks * block_tokens)


_DECODER = msgspec.json.Decoder(_Line)


def parse_line(text: str | bytes, index: int, *, block_tokens: int = MOONCAKE_BLOCK_TOKENS,
               where: str = "<trace>", line_no: int | None = None) -> TraceRequest:
    """One record; raises TraceError naming ``where:line_no`` and what is wrong."""
    line_no = index + 1 if line_no is None else line_no
    try:
        rec = _DECODER.decode(text)
    except msgspec.DecodeError as e:
        raise TraceError(f"{where}:{line_no}: not a trace record: {e}") from None
    if not rec.hash_ids:
        raise TraceError(f"{where}:{line_no}: hash_ids is empty")
    needed = -(-rec.input_length // block_tokens)
    if len(rec.hash_ids) != needed:
        raise TraceError(f"{where}:{line_no}: {len(rec.hash_ids)} hash ids for "
                         f"input_length {rec.input_length}, expected {needed} "
                         f"({block_tokens}-token blocks)")
    return TraceRequest(index, rec.timestamp / 1000.0, rec.input_length, rec.output_length,
                        tuple(rec.hash_ids))


def iter_trace(path: Path, *, block_tokens: int = MOONCAKE_BLOCK_TOKENS,
               limit: int | None = None) -> Iterator[TraceRequest]:
    """Records in file order (blank lines skipped); arrival times must not go backwards."""
    last = 0.0
    index = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and index >= limit:
                return
            if not line.strip():
                continue
            req = parse_line(line, index, block_tokens=block_tokens, where=str(path),
                             line_no=line_no)
            if req.arrival_s < last:
                raise TraceError(f"{path}:{line_no}: timestamp {req.arrival_s * 1000:.0f} ms "
                                 f"is earlier than the previous line's {last * 1000:.0f} ms")
            last = req.arrival_s
            index += 1
            yield req


def load_trace(path: Path, *, block_tokens: int = MOONCAKE_BLOCK_TOKENS,
               limit: int | None = None) -> list[TraceRequest]:
    """The whole trace (or its first ``limit`` records) as a list."""
    return list(iter_trace(path, block_tokens=block_tokens, limit=limit))
