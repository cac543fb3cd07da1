"""What a p2pkv policy of ``p2pkv bench trace`` does, from its name.

Used by ``sim/replay.py`` (making the policies) and ``sim/processes.py`` (which policies get
a worker and a directory fleet of their own); ``sim/policies.py`` implements the mechanisms.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class P2pkvOptions:
    """A p2pkv policy's mechanisms, from its name: ``p2pkv`` then ``+``-joined features:
    ``planner`` (route by expected TTFT and pull only when it pays), ``holdersN`` (pull one
    request's chunks from up to N holders, a Lookup each), ``save`` (pulled chunks are saved
    to the puller's store, so it can serve them too), ``fastest`` (of the holders of the
    longest run, pull from the one expected fastest, not the first by name), ``sticky``
    (the planner's router, among the candidates within its spread, takes the shortest queue
    and then the most cached tokens, not the fewest requests in flight); ``multi`` is
    ``planner+holders4+save``."""

    planner: bool = False
    max_holders: int = 1
    save_pulled: bool = False
    fastest_holder: bool = False
    sticky: bool = False


def p2pkv_options(name: str) -> P2pkvOptions | None:
    """The options a p2pkv policy name stands for; None for other policies. Raises
    ValueError for an unknown feature."""
    head, *features = name.split("+")
    if head != "p2pkv":
        return None
    planner, holders, save, fastest, sticky = False, 1, False, False, False
    for f in features:
        if f == "planner":
            planner = True
        elif f == "multi":
            planner, holders, save = True, max(holders, 4), True
        elif f == "save":
            save = True
        elif f == "fastest":
            fastest = True
        elif f == "sticky":
            planner = sticky = True
        elif f.startswith("holders") and f[7:].isdigit() and int(f[7:]) >= 1:
            holders = int(f[7:])
        else:
            raise ValueError(f"policy {name!r}: unknown feature {f!r} (planner, multi, save, "
                             "fastest, holdersN)")
    return P2pkvOptions(planner, holders, save, fastest, sticky)


def uses_directory(name: str) -> bool:
    return name.split("+", 1)[0] == "p2pkv"
