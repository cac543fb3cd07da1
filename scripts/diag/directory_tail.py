"""What in the directory's loop can hold a Lookup back, each timed alone (issue 15).

``PYTHONPATH=$PWD python scripts/diag/directory_tail.py [--members 3000] [--keys 2000000]``

1. The lease purge with ``members`` registrations: ``DirectoryIndex.expire`` (a heap now)
   against the scan of every member it replaced.
2. A sweep step deep into a namespace of ``keys`` keys: a slice of the key list (now)
   against ``islice``, which walks the list from its start every step.
3. A full GC collection in a process that imported what the directory imports, with and
   without ``gc.freeze()`` after start-up.
Prints one line per measurement (medians of several runs, in ms).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from itertools import islice


def _median_ms(fn, runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def purge(members: int) -> None:
    from p2pkv.directory.index import DirectoryIndex
    from p2pkv.keys import InstanceId, Namespace

    index = DirectoryIndex(5.0, max_registrations=members + 1)
    for i in range(members):
        index.register(InstanceId(f"i{i}"), 1, Namespace("n"), "a", "p", [], i / members)
    now = 1.0
    heap = _median_ms(lambda: index.expire(now))
    values = index._members.values()  # noqa: SLF001 - the scan it replaced, for comparison
    scan = _median_ms(lambda: [m.instance for m in values if m.expires_at <= now])
    print(f"lease purge, {members} members: heap {heap:.3f} ms, scan of every member "
          f"{scan:.3f} ms")


def sweep(keys: int, budget: int = 2000) -> None:
    table = {i.to_bytes(32, "little"): 1 for i in range(keys)}
    listed = list(table)
    pos = keys - budget
    copy = _median_ms(lambda: list(table), runs=3)
    sliced = _median_ms(lambda: [table.get(k) for k in listed[pos:pos + budget]])
    walked = _median_ms(lambda: [table.get(k) for k in islice(listed, pos, pos + budget)])
    print(f"sweep step of {budget} keys at {pos} of {keys}: slice {sliced:.3f} ms, islice "
          f"{walked:.3f} ms; the key list's copy at a sweep's start {copy:.1f} ms")


def collection() -> None:
    import msgspec  # noqa: F401 - what the directory process imports
    import zmq  # noqa: F401

    import p2pkv.directory.cli  # noqa: F401
    import p2pkv.directory.server  # noqa: F401

    gc.collect()
    full = _median_ms(lambda: gc.collect(2))
    gc.freeze()
    frozen = _median_ms(lambda: gc.collect(2))
    print(f"full GC collection after start-up ({gc.get_freeze_count()} objects frozen): "
          f"{full:.2f} ms unfrozen, {frozen:.2f} ms frozen")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3000)
    parser.add_argument("--keys", type=int, default=2_000_000)
    args = parser.parse_args()
    purge(args.members)
    sweep(args.keys)
    collection()


if __name__ == "__main__":
    main()
