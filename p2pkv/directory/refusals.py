"""Registrations the directory refused recently (pure, no I/O; time is passed in).

Called only by ``DirectoryServer``: a refused instance (PROBE_MISMATCH, STALE_EPOCH) is in no
member list, yet it is the one an operator has to find, so ``StatsReply.refused`` lists it
(shown by ``p2pkv status`` and ``p2pkv doctor``) for ``memory_s`` after its latest refusal, at
most ``protocol.MAX_REFUSED`` of them. It leaves the list when it registers.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pkv.directory.protocol import MAX_REFUSED, RefusedRegistration, Register
from p2pkv.keys import InstanceId


@dataclass(slots=True)
class _Refusal:
    """The latest refused Register of one instance, and how often it was refused."""

    msg: Register
    status: str
    reason: str
    at: float
    count: int = 1


class RecentRefusals:
    """instance -> its latest refusal.

    NOTE: insertion order is refusal order (an entry is re-inserted when refused again), so
    the first entry is the oldest: purged by age, capped at ``limit``.
    """

    def __init__(self, memory_s: float, limit: int = MAX_REFUSED) -> None:
        self.memory_s = memory_s
        self._limit = limit
        self._refused: dict[InstanceId, _Refusal] = {}

    def remember(self, msg: Register, status: str, reason: str, now: float) -> bool:
        """Note a refused Register; True if it is news (first refusal, or another status)."""
        old = self._refused.pop(msg.instance, None)
        self._refused[msg.instance] = _Refusal(msg, status, reason, now,
                                               old.count + 1 if old is not None else 1)
        while len(self._refused) > self._limit:
            del self._refused[next(iter(self._refused))]
        return old is None or old.status != status

    def forget(self, instance: InstanceId) -> None:
        """``instance`` registered."""
        self._refused.pop(instance, None)

    def recent(self, now: float) -> list[RefusedRegistration]:
        """The refusals within ``memory_s``, newest first."""
        horizon = now - self.memory_s
        while self._refused and next(iter(self._refused.values())).at < horizon:
            del self._refused[next(iter(self._refused))]
        return [RefusedRegistration(instance=r.msg.instance, namespace=r.msg.namespace,
                                    address=r.msg.address, epoch=r.msg.epoch, probe=r.msg.probe,
                                    status=r.status, reason=r.reason[:4096], count=r.count,
                                    age_ms=int((now - r.at) * 1000))
                for r in reversed(self._refused.values())]
