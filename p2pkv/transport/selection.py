"""A part of a stored chunk: the bytes a pull asks a holder for, when not all of them.

A holder's chunk is ``groups`` of ``rows`` rows of ``row_bytes`` each (for the connector: the
chunk's blocks, each one row per layer the holder rank holds, a row being its KV heads'
bytes of that block and layer). A :class:`Selection` takes rows ``[first_row, first_row +
num_rows)`` of every group and bytes ``[offset, offset + length)`` of each such row: a range
of heads and layers. The holder sends only those bytes (``transport/wire.py``), so a puller
rank at a higher TP than the holder receives its own heads only.

Pure byte arithmetic, shared by the holder (what to send), the puller (what to expect) and
the same-host path (what to copy out of a peer's slab).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import msgspec


class Selection(msgspec.Struct, frozen=True):
    rows: int
    row_bytes: int
    first_row: int
    num_rows: int
    offset: int
    length: int

    def check(self, chunk_bytes: int) -> str:
        """Why this selection does not fit a chunk of ``chunk_bytes`` ("" when it does)."""
        if min(self.rows, self.row_bytes, self.num_rows, self.length) <= 0:
            return f"empty selection {self}"
        if self.first_row < 0 or self.first_row + self.num_rows > self.rows:
            return f"rows {self.first_row}+{self.num_rows} outside {self.rows}"
        if self.offset < 0 or self.offset + self.length > self.row_bytes:
            return f"bytes {self.offset}+{self.length} outside a row of {self.row_bytes}"
        if chunk_bytes % (self.rows * self.row_bytes):
            return (f"a chunk of {chunk_bytes} bytes is not made of groups of {self.rows} rows "
                    f"of {self.row_bytes} bytes")
        return ""

    def groups(self, chunk_bytes: int) -> int:
        return chunk_bytes // (self.rows * self.row_bytes)

    def nbytes(self, chunk_bytes: int) -> int:
        """Bytes selected out of a chunk of ``chunk_bytes``."""
        return self.groups(chunk_bytes) * self.num_rows * self.length

    def ranges(self, chunk_bytes: int) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` of every selected byte range of the chunk, in order; ranges
        that touch are merged (a whole-row selection is one range per group)."""
        group = self.rows * self.row_bytes
        whole_rows = self.offset == 0 and self.length == self.row_bytes
        for g in range(self.groups(chunk_bytes)):
            base = g * group + self.first_row * self.row_bytes + self.offset
            if whole_rows:
                yield base, self.num_rows * self.row_bytes
                continue
            for r in range(self.num_rows):
                yield base + r * self.row_bytes, self.length


def cut(views: Sequence[memoryview], ranges: Iterable[tuple[int, int]]) -> list[memoryview]:
    """The byte ranges ``(offset, length)`` (in order, of the concatenation of ``views``) as
    views into ``views``: a chunk held as several pieces (leased blocks) is selected without a
    copy."""
    flat = [v.cast("B") if v.format != "B" or v.ndim != 1 else v for v in views]
    out: list[memoryview] = []
    i, start = 0, 0  # flat[i] begins at byte ``start`` of the chunk
    for off, n in ranges:
        while n:
            while i < len(flat) and off >= start + flat[i].nbytes:
                start += flat[i].nbytes
                i += 1
            if i == len(flat):
                raise ValueError("range past the end of the chunk")
            take = min(n, start + flat[i].nbytes - off)
            out.append(flat[i][off - start:off - start + take])
            off, n = off + take, n - take
    return out
