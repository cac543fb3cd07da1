"""The doctor's result: typed findings, one per check, rendered as a table or as JSON.

Built by :func:`p2pkv.doctor.checks.diagnose`; printed by ``p2pkv doctor``; read by tests and by
scripts through ``--json`` (the same structs, encoded by msgspec).
"""

from __future__ import annotations

from typing import Literal

import msgspec

Level = Literal["OK", "WARN", "ERROR"]


class Finding(msgspec.Struct, frozen=True):
    """One check's verdict about one subject (the directory, a namespace, an instance)."""

    level: Level
    check: str
    """``directory``, ``hash-probe``, ``namespace``, ``address``, ``data-plane``,
    ``data-plane server`` or ``tier``."""
    subject: str
    detail: str


class PeerCheck(msgspec.Struct, frozen=True, kw_only=True):
    """One registered instance's data plane as seen from this host."""

    instance: str
    namespace: str
    address: str
    reachable: bool
    """Connected and passed the HMAC challenge-response both ways within the deadline."""
    handshake_ms: float = 0.0
    transport: str = ""
    """What a pull from here would use (``choose.PullPath``): ``cuda_ipc``, ``ucx-device``,
    ``ucx-host``, ``shm`` or ``tcp`` ("" when unreachable)."""
    transport_reason: str = ""
    error: str = ""


class TransportInfo(msgspec.Struct, frozen=True):
    """What the configured transport kind resolves to on this host."""

    configured: str
    resolved: str
    reason: str
    kv_memory: str = "host"
    """Where the pulls the peers' paths describe land (``host`` or ``gpu``)."""


class DoctorReport(msgspec.Struct, frozen=True, kw_only=True):
    directory: str
    secret: bool
    transport: TransportInfo
    findings: list[Finding]
    peers: list[PeerCheck]

    @property
    def errors(self) -> int:
        return sum(f.level == "ERROR" for f in self.findings)

    @property
    def warnings(self) -> int:
        return sum(f.level == "WARN" for f in self.findings)

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0


def to_json(report: DoctorReport) -> bytes:
    """The report plus its verdict (``ok``, counts), one JSON object."""
    extra = {"ok": report.errors == 0, "errors": report.errors, "warnings": report.warnings}
    return msgspec.json.encode({**msgspec.structs.asdict(report), **extra})


def to_table(report: DoctorReport) -> str:
    """A header line, one row per finding, and the verdict."""
    t = report.transport
    lines = [f"p2pkv doctor: directory {report.directory}, "
             f"{'with' if report.secret else 'without'} a cluster secret, "
             f"transport {t.configured} -> {t.resolved} here ({t.reason}), "
             f"pulls into {t.kv_memory} memory"]
    header = ("LEVEL", "CHECK", "SUBJECT", "DETAIL")
    rows = [(f.level, f.check, f.subject, f.detail) for f in report.findings]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(3)]
    for row in [header, *rows]:
        lines.append("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[3]]))
    verdict = "FAIL" if report.errors else "OK"
    lines.append(f"{verdict}: {report.errors} error(s), {report.warnings} warning(s)")
    return "\n".join(lines) + "\n"
