"""A replica of the directory's state, kept current from its change feed.

Used by the router (``router/holdings.py``) to know who holds what without asking per
request. Clone pattern (ZeroMQ guide): subscribe to the feed first, then fetch a Snapshot
(the state as of feed event ``feed_seq``) over a :class:`DirectoryClient`, then apply the
events with a higher seq. A seq gap (events dropped by a slow subscriber's queue, or a
subscription that raced the snapshot) or a new directory epoch triggers a fresh snapshot.
"""

from __future__ import annotations

import logging

import zmq

from p2pkv.directory import auth, protocol
from p2pkv.directory.client import DirectoryClient, poll_ms
from p2pkv.directory.protocol import (
    ChunksChanged, FeedEvent, InstanceInfo, InstanceJoined, InstanceLeft, ProtocolError,
    Snapshot, SnapshotReply,
)
from p2pkv.keys import ChunkKey, InstanceId, Namespace
from p2pkv.secret import ClusterSecret

logger = logging.getLogger(__name__)

SUB_RCVHWM = 100_000
"""Feed events queued for a subscriber that falls behind before ZeroMQ drops (a gap)."""


class FeedSubscriber:
    """Follows the directory's change feed and keeps a replica of who holds what.

    Owns one ZeroMQ context for its SUB socket and its client. Not thread-safe: one thread
    calls :meth:`poll`.
    """

    def __init__(self, endpoint: str, *, secret: ClusterSecret | None = None,
                 credential: auth.Credential | None = None) -> None:
        # a feed only reads: the secret's member keys, or a reader credential's (the router's)
        self._keys: auth.Credential | ClusterSecret | None = (
            credential if credential is not None else secret)
        self._context = zmq.Context()
        self._client = DirectoryClient(endpoint, secret=secret, credential=credential,
                                       context=self._context)
        self._sub: zmq.Socket | None = None
        self._feed_endpoint = ""
        self.seq = 0
        self.directory_epoch = 0
        self.instances: dict[InstanceId, InstanceInfo] = {}
        self.holdings: dict[InstanceId, set[ChunkKey]] = {}
        self.namespaces: dict[InstanceId, Namespace] = {}
        self.resyncs = 0

    def sync(self, timeout_s: float = 5.0) -> bool:
        """(Re)build the replica from a Snapshot; False if the directory did not answer."""
        if self._sub is None:
            first = self._client.call_parts(Snapshot(), timeout_s)
            if not first or not isinstance(first[0], SnapshotReply):
                return False
            self._connect(first[0].feed_endpoint)
        parts = self._client.call_parts(Snapshot(), timeout_s)
        if not parts or not all(isinstance(p, SnapshotReply) for p in parts):
            return False
        self.resyncs += 1
        head = parts[0]
        assert isinstance(head, SnapshotReply)
        if head.feed_endpoint != self._feed_endpoint:
            self._connect(head.feed_endpoint)
        self.seq, self.directory_epoch = head.feed_seq, head.directory_epoch
        self.instances = {i.instance: i for i in head.instances}
        self.namespaces = {i.instance: i.namespace for i in head.instances}
        self.holdings = {i.instance: set() for i in head.instances}
        for part in parts:
            assert isinstance(part, SnapshotReply)
            for h in part.holdings:
                self.holdings.setdefault(h.instance, set()).update(h.keys)
        return True

    def poll(self, timeout_s: float = 0.0) -> list[FeedEvent]:
        """Apply the events that arrived (waiting up to ``timeout_s`` for the first); returns
        them. Resyncs by itself on a gap."""
        if self._sub is None and not self.sync():
            return []
        assert self._sub is not None
        applied: list[FeedEvent] = []
        wait = poll_ms(timeout_s) if timeout_s > 0 else 0
        while self._sub.poll(wait, zmq.POLLIN):
            wait = 0
            try:
                event = protocol.decode_event(self._sub.recv(zmq.NOBLOCK))
            except (ProtocolError, zmq.Again):
                continue
            if event.directory_epoch == self.directory_epoch and event.seq <= self.seq:
                continue  # already in the snapshot
            if event.directory_epoch != self.directory_epoch or event.seq != self.seq + 1:
                logger.info("feed gap (have %s/%s, got %s/%s): resyncing", self.directory_epoch,
                            self.seq, event.directory_epoch, event.seq)
                self.sync()
                continue
            self._apply(event)
            applied.append(event)
        return applied

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until feed events are ready, without applying them (a
        caller can then apply them with ``poll(0)`` under its own lock)."""
        if self._sub is None:
            return False
        return bool(self._sub.poll(poll_ms(timeout_s), zmq.POLLIN))

    def holders(self, namespace: Namespace, key: ChunkKey) -> list[InstanceId]:
        return sorted(i for i, keys in self.holdings.items()
                      if key in keys and self.namespaces.get(i) == namespace)

    def close(self) -> None:
        if self._sub is not None:
            self._sub.close(linger=0)
        self._client.close()
        self._context.term()

    def _connect(self, feed_endpoint: str) -> None:
        if self._sub is not None:
            self._sub.close(linger=0)
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, SUB_RCVHWM)
        sub.setsockopt(zmq.MAXMSGSIZE, 4 * protocol.MAX_MESSAGE_BYTES)
        if self._keys is not None:
            auth.secure_client_socket(sub, self._keys)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(feed_endpoint)
        self._sub, self._feed_endpoint = sub, feed_endpoint

    def _apply(self, event: FeedEvent) -> None:
        self.seq = event.seq
        match event:
            case InstanceJoined():
                self.namespaces[event.instance] = event.namespace
                self.holdings[event.instance] = set()
                self.instances[event.instance] = InstanceInfo(
                    instance=event.instance, namespace=event.namespace, address=event.address,
                    epoch=event.epoch, chunks=0, engine=event.engine, slice=event.slice)
            case InstanceLeft():
                for table in (self.namespaces, self.holdings, self.instances):
                    table.pop(event.instance, None)
            case ChunksChanged():
                keys = self.holdings.setdefault(event.instance, set())
                if event.reset:
                    keys.clear()
                keys.update(event.added)
                keys.difference_update(event.removed)
