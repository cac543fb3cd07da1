"""Which of an instance's keys leased paged blocks serve (issue 14), as a Publish changes it.

The directory's index (per registration) and the client's registration machine (for its
snapshots) keep the same map, key -> when its lease ends, each on its own clock; a Publish
updates both the same way, here.
"""

from __future__ import annotations

from collections.abc import Iterable

from p2pkv.keys import ChunkKey


def apply_publish(leased: dict[ChunkKey, float], added: Iterable[ChunkKey],
                  removed: Iterable[ChunkKey], until: float | None) -> None:
    """``added`` are leased until ``until`` (None: in the store, no longer leased);
    ``removed`` are gone. Costs nothing while no key is leased and none becomes so."""
    if until is not None:
        leased.update((key, until) for key in added)
    elif leased:
        for key in added:
            leased.pop(key, None)
    if leased:
        for key in removed:
            leased.pop(key, None)
