"""The doctor's checks: ask the network (:mod:`p2pkv.doctor.probe`), judge the answers, and
return one :class:`DoctorReport`. Called by ``p2pkv doctor`` and by tests.

What is checked, because it is what breaks clusters in practice:

* the directory answers, with the cluster secret as configured (auth failure, timeout and an
  unreachable endpoint are told apart);
* every namespace's instances agree on the hash-seed probe, and no instance was refused for
  a different one (a refused instance is listed by the directory in ``StatsReply.refused``:
  it is in no member list, yet it is the one with a 0 % hit rate);
* every instance advertises an address other hosts can reach (not loopback in a cluster whose
  directory is not on loopback);
* every data plane accepts a connection and the HMAC challenge-response from this host within
  the deadline, and which path (cuda_ipc, ucx-device, ucx-host, shm or tcp:
  ``choose.explain_path``) a pull from here would take, and why.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from p2pkv.directory.auth import is_loopback_endpoint
from p2pkv.directory.protocol import InstanceInfo, RefusedRegistration, Status, StatsReply
from p2pkv.doctor.probe import ask_directory, check_peer
from p2pkv.doctor.report import DoctorReport, Finding, PeerCheck, TransportInfo
from p2pkv.errors import ConfigError
from p2pkv.secret import ClusterSecret, data_plane_secret, derive
from p2pkv.transport.base import TransportChoice
from p2pkv.transport.choose import choose_transport
from p2pkv.transport.shm import host_id

MAX_PARALLEL_PEERS = 16
KV_MEMORY = ("host", "gpu")


@dataclass(frozen=True, slots=True)
class DoctorConfig:
    directory: str
    secret: ClusterSecret | None = None
    transport: str = "auto"
    """The transport kind this host's instances are configured with."""
    store_bytes: int = 2 << 30
    """Their store size (``auto`` picks shm only if /dev/shm has room for it)."""
    timeout_s: float = 2.0
    """Deadline of each network wait (the directory's answer; each peer's handshake)."""
    kv_memory: str = "host"
    """Where this host's instances keep their KV cache: ``host`` (CPU instances) or ``gpu``
    (pulls land in device memory: ``auto`` then wants UCX, and the paths differ)."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError("timeout must be positive")
        if self.kv_memory not in KV_MEMORY:
            raise ConfigError(f"kv_memory must be one of {KV_MEMORY}, not {self.kv_memory!r}")
        self.choice()  # raises ConfigError if unknown

    def choice(self) -> TransportChoice:
        return choose_transport(self.transport, self.store_bytes,
                                0 if self.kv_memory == "gpu" else None)


def diagnose(config: DoctorConfig) -> DoctorReport:
    """Run every check. Each network wait is bounded by ``config.timeout_s``; peers are
    checked MAX_PARALLEL_PEERS at a time, so a run takes at most one timeout for the
    directory plus one per MAX_PARALLEL_PEERS instances."""
    choice = config.choice()
    transport = TransportInfo(config.transport, choice.name, choice.reason, config.kv_memory)
    answer = ask_directory(config.directory, config.secret, config.timeout_s)
    findings: list[Finding] = []
    peers: list[PeerCheck] = []
    if answer.stats is None:
        findings.append(Finding("ERROR", "directory", config.directory, answer.problem))
    else:
        stats = answer.stats
        findings.append(_directory_finding(config, stats, answer.elapsed_ms))
        findings.extend(probe_findings(stats.instances, stats.refused))
        findings.extend(namespace_findings(stats.instances))
        findings.extend(address_findings(config.directory, stats.instances))
        findings.extend(server_findings(stats.instances))
        findings.extend(tier_findings(stats.instances))
        peers = _check_peers(config, choice, stats.instances)
        findings.extend(_peer_finding(p) for p in peers)
    return DoctorReport(directory=config.directory, secret=config.secret is not None,
                        transport=transport, findings=findings, peers=peers)


def _check_peers(config: DoctorConfig, choice: TransportChoice,
                 instances: Sequence[InstanceInfo]) -> list[PeerCheck]:
    if not instances:
        return []
    key = (derive(data_plane_secret(config.secret), "data-plane")
           if config.secret is not None else None)
    here = host_id()
    with ThreadPoolExecutor(min(MAX_PARALLEL_PEERS, len(instances))) as pool:
        return list(pool.map(lambda i: check_peer(i, key, choice, here, config.timeout_s,
                                                  config.kv_memory == "gpu"), instances))


def _directory_finding(config: DoctorConfig, stats: StatsReply, elapsed_ms: float) -> Finding:
    detail = (f"answered in {elapsed_ms:.1f} ms: protocol v{stats.v}, "
              f"{'CURVE (members only)' if stats.secure else 'UNAUTHENTICATED'}, "
              f"{len(stats.instances)} instance(s), {stats.chunks} chunk(s), "
              f"{len(stats.refused)} refused registration(s)")
    if not stats.secure and not is_loopback_endpoint(config.directory):
        return Finding("WARN", "directory", config.directory,
                       detail + "; anyone who can reach it may use it (give it a secret)")
    return Finding("OK", "directory", config.directory, detail)


def probe_findings(instances: Sequence[InstanceInfo],
                   refused: Sequence[RefusedRegistration]) -> list[Finding]:
    """Per namespace: do its members agree on the hash-seed probe? Per refused registration:
    why, naming the instances it disagrees with. Pure (tests feed it structs)."""
    by_ns: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for i in instances:
        by_ns[i.namespace][i.probe].append(i.instance)
    findings = []
    for ns, probes in sorted(by_ns.items()):
        if len(probes) == 1:
            ((probe, names),) = probes.items()
            findings.append(Finding("OK", "hash-probe", f"namespace {ns}",
                                    f"{len(names)} instance(s) agree on probe "
                                    f"{probe or '(none)'}: {', '.join(sorted(names))}"))
        else:
            groups = "; ".join(f"probe {p or '(none)'}: {', '.join(sorted(n))}"
                               for p, n in sorted(probes.items()))
            findings.append(Finding("ERROR", "hash-probe", f"namespace {ns}",
                                    f"members hash differently ({groups}): their block hashes "
                                    f"never match; start all with the same PYTHONHASHSEED"))
    for r in refused:
        level = "ERROR" if r.status == Status.PROBE_MISMATCH else "WARN"
        detail = f"refused {r.count}x (last {r.age_ms / 1000:.1f} s ago, {r.status})"
        if r.status == Status.PROBE_MISMATCH:
            members = by_ns.get(r.namespace, {})
            theirs = "; ".join(f"{p or '(none)'} of {', '.join(sorted(n))}"
                               for p, n in sorted(members.items()))
            detail += (f": its probe {r.probe or '(none)'} differs from "
                       f"{theirs or 'the namespace members'} in namespace {r.namespace}: "
                       f"different PYTHONHASHSEED, hash algorithm or KV layout; it gets no hits")
        else:
            detail += f": {r.reason}"
        findings.append(Finding(level, "hash-probe", f"{r.instance} ({r.address})", detail))
    return findings


def _fields(spec: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in spec.split("|") if "=" in part)


def namespace_findings(instances: Sequence[InstanceInfo]) -> list[Finding]:
    """Which engines share each namespace, at which tensor parallelism (OK: instances at
    different TP share KV); and namespaces that serve one model but can never share KV
    because another field differs (ERROR, naming the fields: KV dtype, head size, block
    size, ...). Pure (tests feed it structs)."""
    by_ns: dict[str, list[InstanceInfo]] = defaultdict(list)
    for i in instances:
        by_ns[i.namespace].append(i)
    findings = []
    specs: dict[str, dict[str, str]] = {}
    for ns, members in sorted(by_ns.items()):
        engines: dict[str, list[InstanceInfo]] = defaultdict(list)
        for i in members:
            engines[i.engine or i.instance].append(i)
        parts = []
        for engine, ranks in sorted(engines.items()):
            sl = ranks[0].slice
            width = f"{sl.heads} of {sl.num_heads} KV heads per rank" if sl else "whole model"
            parts.append(f"{engine} ({len(ranks)} registered rank(s), {width})")
        shapes = {(i.slice.heads if i.slice else 0) for i in members}
        tail = "; compatible at different tensor parallelism" if len(shapes) > 1 else ""
        findings.append(Finding("OK", "namespace", f"namespace {ns}",
                                f"{', '.join(parts)}{tail}"))
        spec = next((i.spec for i in members if i.spec), "")
        if spec:
            specs[ns] = _fields(spec)
    by_model: dict[str, list[str]] = defaultdict(list)
    for ns, fields in specs.items():
        by_model[fields.get("model", "?")].append(ns)
    for model, namespaces in sorted(by_model.items()):
        for a, b in zip(namespaces, namespaces[1:]):
            fa, fb = specs[a], specs[b]
            diff = ", ".join(f"{k} {fa.get(k)} vs {fb.get(k)}" for k in sorted(set(fa) | set(fb))
                             if fa.get(k) != fb.get(k))
            findings.append(Finding(
                "ERROR", "namespace", f"model {model}",
                f"namespaces {a} and {b} serve the same model but can never share KV "
                f"({diff}): start them alike, or give them different model_id on purpose"))
    return findings


def address_findings(directory: str, instances: Sequence[InstanceInfo]) -> list[Finding]:
    """A loopback data-plane address in a cluster reached over the network is reachable only
    from its own host: a common misconfiguration (``bind_host`` left at 127.0.0.1)."""
    if is_loopback_endpoint(directory):
        return []
    return [Finding("WARN", "address", f"{i.instance} {i.address}",
                    "advertises a loopback address: peers on other hosts cannot pull from it "
                    "(set bind_host / advertise_host to this host's cluster address)")
            for i in instances if is_loopback_endpoint(f"tcp://{i.address}")]


def server_findings(instances: Sequence[InstanceInfo]) -> list[Finding]:
    """What each instance's worker reported about its own data-plane server (the
    ``server_*`` counters, ``ServerHealth.counters``): dead is an error, having turned
    connections away recently (a flood, or more peers than its caps) a warning, and so are
    requests it refused: failed MACs (bytes changed on the path, replays) and requests for
    another namespace or instance epoch (pullers sent to a reused address). Pure."""
    findings = []
    for i in instances:
        c = i.counters
        subject = f"{i.instance} {i.address}"
        if c.get("server_alive") == 0:
            findings.append(Finding("ERROR", "data-plane server", subject,
                                    "its data-plane server stopped accepting connections: "
                                    "nobody can pull from it (restart the instance)"))
        elif c.get("server_saturated"):
            findings.append(Finding("WARN", "data-plane server", subject,
                                    f"saturated: turned away {c.get('server_refused', 0)} "
                                    "connections at its caps (a connection flood, or more "
                                    "peers than it admits)"))
        if c.get("server_thread_failures") or c.get("server_loop_errors"):
            findings.append(Finding("WARN", "data-plane server", subject,
                                    f"{c.get('server_thread_failures', 0)} connection(s) "
                                    "closed because no thread could be started, "
                                    f"{c.get('server_loop_errors', 0)} error(s) survived by "
                                    "its accept loop (see its log)"))
        if c.get("server_bad_macs"):
            findings.append(Finding("WARN", "data-plane server", subject,
                                    f"dropped {c['server_bad_macs']} connection(s) whose "
                                    "request failed its MAC: changed on the way, replayed, or "
                                    "not from that session (an attacker or a broken middlebox "
                                    "on the path; see its log for the peers)"))
        wrong = [f"{c[k]} for another {what}" for k, what in
                 (("server_wrong_namespace", "namespace"), ("server_wrong_epoch", "epoch"))
                 if c.get(k)]
        if wrong:
            findings.append(Finding("WARN", "data-plane server", subject,
                                    f"refused requests: {', '.join(wrong)} (pullers that "
                                    "reached it at an address the directory had listed for "
                                    "another instance or an earlier run of it)"))
    return findings


def tier_findings(instances: Sequence[InstanceInfo]) -> list[Finding]:
    """Per instance: which tier serves its chunks (issue 14): leased paged blocks (until the
    earliest lease ends) or the host store. Pure (tests feed it structs)."""
    findings = []
    for i in instances:
        subject = f"{i.instance} ({i.address})"
        if i.leased_chunks:
            detail = (f"{i.leased_chunks} of {i.chunks} chunk(s) served from leased paged "
                      f"blocks (earliest lease ends in {i.lease_ends_ms / 1000:.1f} s, then "
                      f"from the store if copied there), the rest from the host store")
        else:
            detail = f"{i.chunks} chunk(s) served from the host store (no leases out)"
        findings.append(Finding("OK", "tier", subject, detail))
    return findings


def _peer_finding(peer: PeerCheck) -> Finding:
    subject = f"{peer.instance} {peer.address}"
    if not peer.reachable:
        return Finding("ERROR", "data-plane", subject, peer.error)
    return Finding("OK", "data-plane", subject,
                   f"connect + auth {peer.handshake_ms:.1f} ms; pulls from here: "
                   f"{peer.transport} ({peer.transport_reason})")
