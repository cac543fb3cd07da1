"""Lookups in flight and their results: the directory client's bookkeeping, no I/O.

Owned by :class:`~p2pkv.directory.client.DirectoryClient` (under its lock), which sends the
Lookup and hands every reply here; time comes in as ``now`` arguments. A lookup ends once:
with its LookupReply, or as None (refused, or no reply read by the first poll past its deadline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Union

from p2pkv.directory.protocol import LookupReply, Reply

RESULT_GRACE_S = 30.0
"""How long an arrived but never polled lookup reply is kept after its deadline."""

PURGE_ABOVE = 1024
"""Lookups tracked before the ones nobody will poll are looked for."""


class Pending:
    """Type of :data:`PENDING`: the lookup is still in flight, ask again later."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PENDING"


PENDING: Final = Pending()

LookupResult = Union[LookupReply, Pending, None]


@dataclass(slots=True)
class _Lookup:
    deadline: float
    done: bool = False
    reply: LookupReply | None = None


class Lookups:
    """rid -> one lookup's state."""

    def __init__(self) -> None:
        self._lookups: dict[int, _Lookup] = {}

    def start(self, rid: int, deadline: float, now: float) -> None:
        """Track the Lookup sent with ``rid``."""
        if len(self._lookups) > PURGE_ABOVE:
            self._purge(now)
        self._lookups[rid] = _Lookup(deadline=deadline)

    def dropped(self, rid: int, now: float) -> None:
        """A Lookup that could not be sent: ``rid`` ends as None at its first poll."""
        if len(self._lookups) > PURGE_ABOVE:
            self._purge(now)
        self._lookups[rid] = _Lookup(deadline=now, done=True)

    def on_reply(self, reply: Reply) -> None:
        """Any reply; the one to a tracked lookup not yet reported as timed out ends it.

        NOTE: no deadline check here: a reply is read when the scheduler polls, once per engine
        step, and one slow step (seen in CI: ~290 ms, against a 250 ms deadline) would throw
        away a reply that sat in the socket in time. The deadline only
        says when :meth:`result` stops waiting; a reply already here is never wasted."""
        entry = self._lookups.get(reply.rid)
        if entry is not None and not entry.done:
            entry.done = True
            entry.reply = reply if isinstance(reply, LookupReply) else None

    def result(self, rid: int, now: float) -> LookupResult:
        """The LookupReply, PENDING, or None (failed, deadline passed, or unknown rid). A final
        result is returned once; the rid is then forgotten."""
        entry = self._lookups.get(rid)
        if entry is None:
            return None
        if entry.done:
            del self._lookups[rid]
            return entry.reply
        if now >= entry.deadline:
            del self._lookups[rid]
            return None
        return PENDING

    def deadline(self, rid: int) -> float:
        """Deadline of a lookup still PENDING (the last :meth:`result` said so)."""
        return self._lookups[rid].deadline

    def __len__(self) -> int:
        return len(self._lookups)

    def _purge(self, now: float) -> None:
        """Forget lookups nobody will poll: in flight past their deadline, or answered and
        unpolled well past it."""
        for rid, entry in list(self._lookups.items()):
            if now >= entry.deadline + (RESULT_GRACE_S if entry.done else 0.0):
                del self._lookups[rid]
