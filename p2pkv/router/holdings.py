"""Who holds which chunk, as the router sees it.

Two sources: the directory's change feed (a :class:`FeedSubscriber` replica followed by one
thread; a :class:`ShardedFeed`, every shard's merged, when ``directory`` names shards), and *hints*: the keys of requests the router just sent to an instance, which that
instance will hold (in its vLLM prefix cache, and in its store once computed) before the
feed can say so. Hints expire after ``hint_ttl_s``; the feed is authoritative for what an
instance's store holds (``wait_held`` looks at the feed only).

Readers never wait long: they take the lock for at most ``read_wait_s`` and otherwise
answer "nothing cached" (the request is then routed by load).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from p2pkv.directory.auth import Credential
from p2pkv.directory.feed import FeedSubscriber
from p2pkv.directory.shards import ShardedFeed, follow, parse_directory
from p2pkv.keys import ChunkKey, InstanceId, seed_part
from p2pkv.secret import ClusterSecret

logger = logging.getLogger(__name__)

MAX_HINTS_PER_INSTANCE = 100_000


class Holdings:
    def __init__(self, directory: str | None, *, secret: ClusterSecret | None = None,
                 credential: Credential | None = None, probe: str = "",
                 hint_ttl_s: float = 30.0, read_wait_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._directory = directory
        self._shards = parse_directory(directory) if directory is not None else []
        self._secret = secret
        self._credential = credential  # a reader credential's keys (read-only)
        self._probe = probe
        self._hint_ttl_s = hint_ttl_s
        self._read_wait_s = read_wait_s
        self._clock = clock
        self._changed = threading.Condition()
        self._feed: FeedSubscriber | ShardedFeed | None = None
        self._hints: dict[InstanceId, dict[ChunkKey, float]] = {}
        self._warned_probe: set[InstanceId] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.synced = threading.Event()

    def start(self) -> None:
        if self._directory is None:
            return
        self._thread = threading.Thread(target=self._follow, name="p2pkv-router-feed",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._feed is not None:
            self._feed.close()

    # -- reads ----------------------------------------------------------------------------

    def run(self, instance: InstanceId, keys: Sequence[ChunkKey]) -> int:
        """How many of ``keys`` (from the first) ``instance`` holds or was just sent."""
        if not self._changed.acquire(timeout=self._read_wait_s):
            return 0
        try:
            held = self._feed.holdings.get(instance, ()) if self._feed else ()
            hints = self._hints.get(instance, {})
            now = self._clock()
            n = 0
            for key in keys:
                if key not in held and hints.get(key, 0.0) <= now:
                    break
                n += 1
            return n
        finally:
            self._changed.release()

    def wait_held(self, instance: InstanceId, key: ChunkKey, timeout_s: float) -> bool:
        """Wait until the feed shows ``instance`` holding ``key`` (its publish is visible to
        every instance's lookups then); False at the deadline."""
        deadline = self._clock() + timeout_s
        with self._changed:
            while True:
                if self._feed is not None and key in self._feed.holdings.get(instance, ()):
                    return True
                left = deadline - self._clock()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.05))

    # -- writes ---------------------------------------------------------------------------

    def note_routed(self, instance: InstanceId, keys: Sequence[ChunkKey]) -> None:
        if not keys:
            return
        with self._changed:
            hints = self._hints.setdefault(instance, {})
            now = self._clock()
            if len(hints) + len(keys) > MAX_HINTS_PER_INSTANCE:
                for k in [k for k, t in hints.items() if t <= now]:
                    del hints[k]
                if len(hints) + len(keys) > MAX_HINTS_PER_INSTANCE:
                    hints.clear()
            expiry = now + self._hint_ttl_s
            for key in keys:
                hints[key] = expiry

    def forget(self, instance: InstanceId) -> None:
        """An instance left rotation: its hints are void."""
        with self._changed:
            self._hints.pop(instance, None)

    # -- the feed thread ------------------------------------------------------------------

    def _follow(self) -> None:
        assert self._directory is not None
        feed = follow(self._shards, secret=self._secret, credential=self._credential)
        while not self._stop.is_set() and not feed.sync(timeout_s=2.0):
            logger.warning("router: directory %s does not answer; routing by load until it "
                           "does", self._directory)
            self._stop.wait(1.0)
        with self._changed:
            self._feed = feed
            self._check_probes()
            self._changed.notify_all()
        self.synced.set()
        logger.info("router: following the directory's change feed (%d instances)",
                    len(feed.instances))
        while not self._stop.is_set():
            if not feed.wait(0.5):
                continue
            with self._changed:
                if feed.poll(0.0):
                    self._check_probes()
                    self._changed.notify_all()

    def _check_probes(self) -> None:
        if self._feed is None or not self._probe:
            return
        for info in self._feed.instances.values():
            if info.probe and seed_part(info.probe) != self._probe \
                    and info.instance not in self._warned_probe:
                self._warned_probe.add(info.instance)
                logger.error("router: instance %s hashes blocks with another seed (probe %s, "
                             "router %s): set the same PYTHONHASHSEED and hash algorithm "
                             "everywhere; its cache is invisible to the router",
                             info.instance, info.probe, self._probe)
