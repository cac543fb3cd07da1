"""The directory service: one ZeroMQ ROUTER socket and one loop in front of a DirectoryIndex.

Run by ``p2pkv directory`` (via :func:`run_directory`), by launch scripts and by tests
(``python -m p2pkv.directory.server --bind tcp://127.0.0.1:0 --ready-file F``). The loop is
``poll -> receive batch -> handle each -> reply``; the step that will purge expired leases and
feed the change stream (a later issue) slots in after the batch. Bad input from the network is
answered with an Error when a reply is possible, counted in ``rejected``, and never raises.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

import zmq

from p2pkv.directory import protocol
from p2pkv.directory.index import DirectoryIndex, DirectoryIndexError
from p2pkv.directory.protocol import (
    PROTOCOL_VERSION, Error, Lookup, LookupReply, Ok, ProtocolError, Publish, Register, Reply,
    Report, Stats, StatsReply, Unregister,
)

logger = logging.getLogger(__name__)

POLL_INTERVAL_MS = 100
"""Longest the loop sleeps before it looks at its stop event again."""

MAX_BATCH = 1000
"""Most messages handled per poll wake-up, so a flood cannot starve the stop check."""

HARD_FRAME_LIMIT = 4 * protocol.MAX_MESSAGE_BYTES
"""ZeroMQ disconnects a peer sending a frame above this (uncounted: no reply is possible).
Frames between MAX_MESSAGE_BYTES and this get a counted Error reply."""


class DirectoryServer:
    """Binds on construction (``.endpoint`` is the real address); :meth:`serve` runs the loop.

    Not thread-safe: construct, then call :meth:`serve` from one thread and stop it through
    the event; :meth:`close` after serve returns.
    """

    def __init__(self, bind: str, *, context: zmq.Context | None = None,
                 directory_epoch: int | None = None) -> None:
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
        try:
            self._socket.bind(bind)
        except zmq.ZMQError:
            self.close()
            raise
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        # Wall-clock nanoseconds: distinct across restarts and increasing, so a client can tell
        # that the directory it talks to lost its state.
        self.directory_epoch: int = (directory_epoch if directory_epoch is not None
                                     else time.time_ns())
        self.index = DirectoryIndex()
        self.lookups = 0
        self.keys_looked_up = 0
        self.keys_hit = 0
        self.rejected = 0

    def serve(self, stop: threading.Event) -> None:
        """Answer requests until ``stop`` is set (checked at least every POLL_INTERVAL_MS)."""
        logger.info("directory serving on %s (epoch %s)", self.endpoint, self.directory_epoch)
        while not stop.is_set():
            if self._socket.poll(POLL_INTERVAL_MS, zmq.POLLIN):
                self._handle_batch()
        logger.info("directory on %s stopping", self.endpoint)

    def close(self) -> None:
        """Close the socket (and the context if this server created it)."""
        self._socket.close(linger=0)
        if self._own_context:
            self._context.term()

    def _handle_batch(self) -> None:
        for _ in range(MAX_BATCH):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            envelope, reply = self._handle_frames(frames)
            if envelope:
                self._send(envelope, reply)

    def _handle_frames(self, frames: list[bytes]) -> tuple[list[bytes], Reply]:
        """Split the ROUTER envelope and answer the body; an empty envelope means no reply."""
        # DEALER peers send [body]; REQ peers send ["", body]. ROUTER prepends the identity.
        if len(frames) == 2:
            envelope, body = frames[:1], frames[1]
        elif len(frames) == 3 and frames[1] == b"":
            envelope, body = frames[:2], frames[2]
        else:
            return frames[:1], self._reject(0, f"expected one message frame, got {len(frames) - 1}")
        if len(body) > protocol.MAX_MESSAGE_BYTES:
            return envelope, self._reject(
                0, f"message of {len(body)} bytes exceeds {protocol.MAX_MESSAGE_BYTES}")
        try:
            return envelope, self._handle(body)
        except Exception:  # noqa: BLE001 - one bad message must never stop the directory
            logger.exception("internal error handling a message")
            return envelope, self._reject(0, "internal error in the directory")

    def _handle(self, body: bytes) -> Reply:
        try:
            msg = protocol.decode(body)
        except ProtocolError as e:
            header = protocol.peek_header(body)
            if header is None:
                return self._reject(0, str(e))
            v, rid = header
            rid = rid if 0 <= rid < 2**63 else 0
            if v != PROTOCOL_VERSION:
                return self._reject(rid, protocol.version_mismatch_reason(v))
            return self._reject(rid, str(e))
        if msg.v != PROTOCOL_VERSION:
            return self._reject(msg.rid, protocol.version_mismatch_reason(msg.v))
        rid = msg.rid
        try:
            match msg:
                case Register():
                    self.index.register(msg.instance, msg.epoch, msg.namespace, msg.address)
                case Publish():
                    self.index.publish(msg.instance, msg.namespace, msg.added, msg.removed)
                case Lookup():
                    return self._lookup(msg)
                case Report():
                    self.index.set_counters(msg.instance, msg.counters)
                case Stats():
                    return self._stats(rid)
                case Unregister():
                    self.index.drop_instance(msg.instance)
                case _:
                    return self._reject(rid, f"{type(msg).__name__} is not a request")
        except DirectoryIndexError as e:
            return self._reject(rid, str(e))
        return Ok(rid=rid, directory_epoch=self.directory_epoch)

    def _lookup(self, msg: Lookup) -> LookupReply:
        holders = self.index.lookup(msg.namespace, msg.keys)
        self.lookups += 1
        self.keys_looked_up += len(msg.keys)
        self.keys_hit += holders[0].run if holders else 0
        logger.debug("lookup %s keys in %s: %s holders", len(msg.keys), msg.namespace,
                     len(holders))
        return LookupReply(rid=msg.rid, directory_epoch=self.directory_epoch, holders=holders)

    def _stats(self, rid: int) -> StatsReply:
        return StatsReply(rid=rid, directory_epoch=self.directory_epoch,
                          instances=self.index.instances(), lookups=self.lookups,
                          keys_looked_up=self.keys_looked_up, keys_hit=self.keys_hit,
                          rejected=self.rejected)

    def _reject(self, rid: int, reason: str) -> Error:
        self.rejected += 1
        logger.debug("rejected request %s: %s", rid, reason)
        return Error(rid=rid, directory_epoch=self.directory_epoch, reason=reason[:4096])

    def _send(self, envelope: list[bytes], reply: Reply) -> None:
        try:
            # NOTE: a ROUTER drops (does not block on) replies to a peer whose queue is full
            # or that is gone; NOBLOCK guards against anything else.
            self._socket.send_multipart([*envelope, protocol.encode(reply)], zmq.NOBLOCK)
        except zmq.Again:
            logger.debug("dropped a reply to a slow or gone client")


def run_directory(bind: str, ready_file: str | None = None) -> int:
    """Serve until SIGINT/SIGTERM; the ``p2pkv directory`` command. Returns an exit code.

    ``ready_file`` receives the real endpoint (one line) once bound, written atomically.
    """
    server = DirectoryServer(bind)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("directory got signal %s", signum)
        stop.set()

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = ({sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
                if in_main_thread else {})
    try:
        if ready_file:
            tmp = f"{ready_file}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(server.endpoint + "\n")
            os.replace(tmp, ready_file)
        logger.info("p2pkv directory listening on %s", server.endpoint)
        server.serve(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
    return 0


if __name__ == "__main__":
    from p2pkv.directory.cli import directory_main

    raise SystemExit(directory_main())
