"""The doctor's two network questions, each with a deadline: "does the directory answer, and
if not, why?" and "can this host reach an instance's data plane, and over which path?".

Called by :mod:`p2pkv.doctor.checks`. The directory is asked over a fresh DEALER socket with a
ZeroMQ monitor attached: CURVE failures are silent to a socket's user, but the monitor's
events tell "nothing accepts TCP connections" from "TCP connected, handshake refused" (wrong
or missing secret) from "authenticated, no answer" (a stuck directory). The data plane is
checked with the transport's own connect + HMAC challenge-response (``connect_peer``) and its
own shm-or-tcp decision (``open_peer_slab``) and path rule (``TransportChoice.path``, explained
by ``choose.explain_path``), so the doctor cannot disagree with a real pull.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from p2pkv.directory import auth, protocol
from p2pkv.directory.protocol import Error, InstanceInfo, ProtocolError, Stats, StatsReply
from p2pkv.doctor.report import PeerCheck
from p2pkv.errors import AuthError, DeadlineExceeded, TransportError
from p2pkv.secret import ClusterSecret
from p2pkv.transport.base import TransportChoice
from p2pkv.transport.choose import explain_path
from p2pkv.transport.conn import connect_peer
from p2pkv.transport.shm import open_peer_slab
from p2pkv.transport.sockio import parse_address

_SLICE_MS = 50


@dataclass(frozen=True, slots=True)
class DirectoryAnswer:
    """The directory's StatsReply, or why there is none (``problem``, for humans)."""

    stats: StatsReply | None
    elapsed_ms: float
    problem: str = ""


@dataclass(slots=True)
class _Seen:
    """What the monitor reported about the connection so far."""

    connected: bool = False
    authenticated: bool = False
    handshake_failure: str = ""
    mechanism_mismatch: bool = False


def ask_directory(endpoint: str, secret: ClusterSecret | None, timeout_s: float
                  ) -> DirectoryAnswer:
    """Send one Stats request and wait at most ``timeout_s`` for its reply."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 4 * protocol.MAX_MESSAGE_BYTES)
    monitor = None
    try:
        if secret is not None:
            auth.secure_client_socket(sock, secret)
        monitor = sock.get_monitor_socket()
        sock.connect(endpoint)
        # NOTE: no IMMEDIATE: the request waits in the queue until the connection is up.
        sock.send(protocol.encode(Stats(rid=1)), zmq.NOBLOCK)
        seen = _Seen()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(max(1, min(_SLICE_MS, int(left * 1000)))))
            if monitor in ready:
                _note(seen, recv_monitor_message(monitor))
            if sock in ready:
                return _answer(sock.recv(), t0)
        return DirectoryAnswer(None, _ms_since(t0), _silence(seen, endpoint, timeout_s,
                                                             secret is not None))
    except zmq.ZMQError as e:
        return DirectoryAnswer(None, _ms_since(t0), f"cannot connect to {endpoint}: {e}")
    finally:
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()


def _note(seen: _Seen, event: dict) -> None:
    kind = event["event"]
    if kind == zmq.EVENT_CONNECTED:
        seen.connected = True
    elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        seen.authenticated = True
    elif kind in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                  zmq.EVENT_HANDSHAKE_FAILED_AUTH):
        seen.handshake_failure = zmq.Event(kind).name
        seen.mechanism_mismatch |= (kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and event["value"]
                                    == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)


def _answer(body: bytes, t0: float) -> DirectoryAnswer:
    try:
        reply = protocol.decode(body)
    except ProtocolError as e:
        return DirectoryAnswer(None, _ms_since(t0), f"answered something undecodable: {e}")
    if isinstance(reply, Error):
        return DirectoryAnswer(None, _ms_since(t0),
                               f"refused the Stats request ({reply.status}): {reply.reason}")
    if not isinstance(reply, StatsReply):
        return DirectoryAnswer(None, _ms_since(t0),
                               f"answered {type(reply).__name__} to a Stats request")
    return DirectoryAnswer(reply, _ms_since(t0))


def _silence(seen: _Seen, endpoint: str, timeout_s: float, have_secret: bool) -> str:
    """Why no reply came, from what the monitor saw."""
    within = f"within {timeout_s:g} s"
    if seen.mechanism_mismatch:
        return (f"AUTH: connected to {endpoint}, but the directory requires a cluster secret "
                f"(CURVE) and none was given: pass --secret-file or set P2PKV_SECRET_FILE"
                if not have_secret else
                f"AUTH: connected to {endpoint}, but the directory runs without a cluster "
                f"secret while we have one")
    if seen.handshake_failure:
        return (f"AUTH: connected to {endpoint}, but the CURVE handshake failed "
                f"({seen.handshake_failure}): the directory holds another cluster secret, or "
                f"none. Check --secret-file / P2PKV_SECRET_FILE on both sides"
                if have_secret else
                f"AUTH: connected to {endpoint}, but the handshake failed "
                f"({seen.handshake_failure}): not a p2pkv directory, or it wants a secret")
    if seen.authenticated:
        return (f"TIMEOUT: connected to {endpoint} (handshake OK), but no answer {within}: "
                f"the directory is stuck or overloaded")
    if seen.connected:
        return (f"TIMEOUT: TCP connection to {endpoint} made, but no ZeroMQ handshake "
                f"{within}: the directory process is stalled, or this is not a ZeroMQ endpoint")
    return (f"UNREACHABLE: no TCP connection to {endpoint} {within}: the directory is down, "
            f"or the address or port is wrong or filtered")


def check_peer(info: InstanceInfo, key: bytes | None, choice: TransportChoice,
               host: str, timeout_s: float, to_gpu: bool = False) -> PeerCheck:
    """Connect to ``info.address`` and run the data-plane handshake, within ``timeout_s``;
    say which path a pull from this host (transport ``choice``, host id ``host``; ``to_gpu``:
    into a KV cache in GPU memory) would take, and why (``choose.explain_path``)."""
    base = dict(instance=str(info.instance), namespace=str(info.namespace),
                address=info.address)
    t0 = time.monotonic()
    try:
        sock, peer_info = connect_peer(parse_address(info.address), key, t0 + timeout_s)
    except AuthError as e:
        return PeerCheck(**base, reachable=False, error=f"AUTH: {e}")
    except (DeadlineExceeded, socket.timeout, TimeoutError):
        return PeerCheck(**base, reachable=False,
                         error=f"TIMEOUT: no handshake within {timeout_s:g} s")
    except OSError as e:
        return PeerCheck(**base, reachable=False, error=f"UNREACHABLE: {e}")
    except TransportError as e:
        kind = "SATURATED" if "connection cap" in str(e) else "HANDSHAKE FAILED"
        return PeerCheck(**base, reachable=False, error=f"{kind}: {e}")
    handshake_ms = _ms_since(t0)
    sock.close()
    same_host = bool(peer_info.host_id) and peer_info.host_id == host
    slab_mapped, slab_reason = False, ""
    if choice.same_host:
        slab, slab_reason = open_peer_slab(peer_info, host)
        if slab is not None:
            slab.close()
            slab_mapped = True
    explained = explain_path(choice, peer_offers_ucx=bool(peer_info.ucx_address),
                             same_host=same_host, slab_mapped=slab_mapped,
                             slab_reason=slab_reason, to_gpu=to_gpu)
    path, why = explained.path, explained.why
    return PeerCheck(**base, reachable=True, handshake_ms=round(handshake_ms, 2),
                     transport=path, transport_reason=why)


def _ms_since(t0: float) -> float:
    return (time.monotonic() - t0) * 1000
