"""The fault suite's cases on real vLLM (``p2pkv bench faults --vllm``): a directory, two
``vllm serve`` instances with the connector (A and B) and ``p2pkv router`` in front of them
(``harness.cluster.LocalCluster``), loaded by concurrent clients, each sending greedy chat
requests about one of the case's documents through the router and checking every answer
against the reference answer to that prompt (the same request, sent to B alone and
unloaded right before the case). Each case has documents of its own, so B holds them when
it starts and A pulls them from B as the router spreads their requests over both
instances under this load; the fault comes ``fault_after_s`` in, while those pulls run.
The cases, in order, on the same cluster:

    load         no fault
    SIGSTOP      B's whole process group stopped for ``STOP_S`` mid-load, then continued:
                 pulls from it hit their deadline and are recomputed; its own requests wait
    directory    the directory SIGKILLed mid-load and restarted on the same endpoints
                 ``DIRECTORY_DOWN_S`` later: lookups miss meanwhile, instances re-register
    SIGKILL      B's process group SIGKILLed mid-load (last: it is not restarted): the
                 router retries what B never answered, A recomputes what it pulled from B

Per case: requests sent, answers equal to the reference ("correct"), error answers
("failed"), answers that differ ("wrong"), the slowest request, the time from the fault
until the first request sent after it was answered correctly (with 64 clients on a small
CPU host mostly the queue's length), and A's memory (its process group) before and after.
The fault column adds the chunks pulled and failed meanwhile (from
the instances' ``/metrics``).

Used by :mod:`p2pkv.bench.faults` (which prints the table); starts vLLM, so run it under the
machine's vLLM lock.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from p2pkv.bench.faults.row import Row
from p2pkv.harness import documents
from p2pkv.harness.cluster import Instance, LocalCluster, Proc, wait_healthy
from p2pkv.harness.groupcpu import group_rss_mib
from p2pkv.harness.openai_client import CHAT, chat_body

CLIENTS = 64
DOCS_PER_CASE = 3
PARTS = 12  # the document in this many parts (~300 tokens each): the cases' documents
MAX_TOKENS = 8
REQUEST_TIMEOUT_S = 120.0
STOP_S = 6.0
DIRECTORY_DOWN_S = 3.0
Prompt = tuple[int, str]
CASES = ("load", "SIGSTOP", "directory", "SIGKILL")  # the order they run in, on one cluster


def select_cases(spec: str | None) -> tuple[str, ...]:
    """The cases named in ``spec`` (comma-separated, any case; None or "all": every case), in
    :data:`CASES`' order whatever order they are named in (SIGKILL, which does not restart B,
    stays last). Splits a long run in two (``--cases load,SIGSTOP`` then
    ``--cases directory,SIGKILL``): each case keeps its own documents."""
    if spec is None or spec.strip().lower() == "all":
        return CASES
    by_name = {c.lower(): c for c in CASES}
    named = [n.strip().lower() for n in spec.split(",") if n.strip()]
    unknown = [n for n in named if n not in by_name]
    if unknown or not named:
        raise ValueError(f"unknown vLLM fault case(s) {unknown or spec!r}: "
                         f"choose from {', '.join(CASES)}")
    return tuple(c for c in CASES if c.lower() in named)


def _prompts(case: int) -> list[Prompt]:
    return [(d, q) for d in range(case * DOCS_PER_CASE, (case + 1) * DOCS_PER_CASE)
            for q in documents.QUESTIONS[:4]]


def _body(prompt: Prompt) -> dict:
    d, q = prompt
    return chat_body(documents.document_messages(documents.document_part(d, PARTS), q),
                     max_tokens=MAX_TOKENS)


def _answer(client: httpx.Client, url: str, prompt: tuple[int, str]) -> str:
    r = client.post(url + CHAT, json=_body(prompt), timeout=REQUEST_TIMEOUT_S)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


@dataclass
class _Load:
    """Clients sending requests through the router until ``stop``; what came back."""

    url: str
    refs: dict[Prompt, str]
    clients: int
    row: Row
    stop: threading.Event = field(default_factory=threading.Event)
    fault_at: float | None = None
    recovered_at: float | None = None
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, seconds: float, fault=None, fault_after_s: float = 0.0) -> None:
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                   for i in range(self.clients)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        if fault is not None:
            time.sleep(fault_after_s)
            self.fault_at = time.monotonic()
            fault()
        time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
        self.stop.set()
        for t in threads:
            t.join(REQUEST_TIMEOUT_S + 10)
            if t.is_alive():
                with self.lock:
                    self.row.failed += 1
                    self.errors.append("a client never returned")

    def _client(self, i: int) -> None:
        rng = random.Random(i)
        prompts = sorted(self.refs)
        with httpx.Client() as client:
            while not self.stop.is_set():
                prompt = rng.choice(prompts)
                t_sent = time.monotonic()
                try:
                    text = _answer(client, self.url, prompt)
                    error = ""
                except (httpx.HTTPError, KeyError, ValueError) as e:
                    text, error = "", f"{type(e).__name__}: {e}"[:200]
                took = time.monotonic() - t_sent
                with self.lock:
                    row = self.row
                    row.sent += 1
                    row.slowest_ms = max(row.slowest_ms, took * 1000)
                    if error:
                        row.failed += 1
                        self.errors.append(error)
                    elif text == self.refs[prompt]:
                        row.correct += 1
                        if self.fault_at is not None and self.recovered_at is None and \
                                t_sent > self.fault_at:
                            self.recovered_at = time.monotonic()
                    else:
                        row.wrong += 1
                        self.errors.append(f"wrong answer to {prompt}: {text!r} "
                                           f"(reference {self.refs[prompt]!r})")


_METRIC = re.compile(r"^p2pkv_connector_(chunks_pulled|chunks_failed)_total(?:\{[^}]*\})? "
                     r"([0-9.e+]+)$", re.M)


def _pulls(instances: list[Instance]) -> dict[str, dict[str, float]]:
    """Chunks pulled and failed so far, per instance that answers."""
    got: dict[str, dict[str, float]] = {}
    for inst in instances:
        if not inst.proc.alive():
            continue
        try:
            text = httpx.get(inst.url + "/metrics", timeout=5).text
        except httpx.HTTPError:
            continue
        mine = got.setdefault(inst.name, {"chunks_pulled": 0.0, "chunks_failed": 0.0})
        for name, value in _METRIC.findall(text):
            mine[name] += float(value)
    return got


def _delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
           name: str) -> float:
    """What the instances that answered both times added to counter ``name``."""
    return sum(after[i][name] - before[i][name] for i in after if i in before)


def _restart_directory(cluster: LocalCluster, endpoint: str, feed: str) -> Proc:
    ready = cluster.workdir / "directory-2.endpoint"
    proc = cluster.start_process("directory-2", [
        sys.executable, "-m", "p2pkv", "directory", "--bind", endpoint, "--feed-bind", feed,
        "--ready-file", str(ready)])
    deadline = time.monotonic() + 30
    while not (ready.exists() and ready.read_text().strip()):
        if not proc.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the directory did not restart:\n{proc.tail()}")
        time.sleep(0.05)
    return proc


def run(load_s: float = 60.0, fault_s: float = 20.0, clients: int = CLIENTS,
        fault_after_s: float = 0.3, workdir: Path | None = None, log=print,
        cases: tuple[str, ...] = CASES) -> tuple[list[Row], list[str]]:
    """The cases (those of ``cases``, see :func:`select_cases`); the rows and the first error
    lines (for the report)."""
    from p2pkv.harness.demo_model import prepare

    model = prepare()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="p2pkv-faults-vllm-"))
    rows: list[Row] = []
    notes: list[str] = []
    with LocalCluster(workdir, model) as cluster:
        directory = cluster.start_directory()
        a, b = cluster.start_vllm("A"), cluster.start_vllm("B")
        t0 = time.monotonic()
        wait_healthy([a, b], timeout_s=600)
        log(f"instances healthy after {time.monotonic() - t0:.0f} s")
        router = cluster.start_router(model, instances=[a, b],
                                      extra_args=["--health-interval-s", "0.5"])
        stats = cluster.stats()
        assert stats is not None, "the directory does not answer"
        endpoint, feed = cluster.directory, stats.feed_endpoint

        def case(name: str, seconds: float, fault=None, what: str = "") -> None:
            with httpx.Client() as client:
                refs = {p: _answer(client, b.url, p) for p in _prompts(CASES.index(name))}
            time.sleep(0.5)  # B's saves published
            row = Row(name)
            row.rss_before = group_rss_mib(a.proc.popen.pid)
            before = _pulls([a, b])
            load = _Load(router.url, refs, clients, row)
            load.run(seconds, fault, fault_after_s)
            after = _pulls([a, b])
            row.rss_after = group_rss_mib(a.proc.popen.pid)
            row.recover_s = 0.0  # no fault: nothing to recover from
            if load.fault_at is not None:
                row.recover_s = (load.recovered_at - load.fault_at
                                 if load.recovered_at is not None else None)
            pulled = _delta(before, after, "chunks_pulled")
            failed = _delta(before, after, "chunks_failed")
            row.fault = f"{what}{'; ' if what else ''}{pulled:.0f} chunks pulled, " \
                        f"{failed:.0f} failed (recomputed)"
            rows.append(row)
            notes.extend(f"{name}: {e}" for e in load.errors[:5])
            recover = f"{row.recover_s:.1f} s" if row.recover_s is not None else "never"
            log(f"{name}: {row.sent} sent, {row.correct} correct, {row.failed} failed, "
                f"{row.wrong} wrong, slowest {row.slowest_ms:.0f} ms, recovered {recover}, "
                f"A's RSS {row.rss_before:.0f} -> {row.rss_after:.0f} MiB; {row.fault}")

        def stop_b() -> None:
            os.killpg(b.proc.popen.pid, signal.SIGSTOP)
            time.sleep(STOP_S)
            os.killpg(b.proc.popen.pid, signal.SIGCONT)

        def restart_directory() -> None:
            directory.kill()
            time.sleep(DIRECTORY_DOWN_S)
            _restart_directory(cluster, endpoint, feed)

        faults = {"load": (load_s, None, ""),
                  "SIGSTOP": (fault_s, stop_b, f"B stopped {STOP_S:g} s"),
                  "directory": (fault_s, restart_directory,
                                f"directory down {DIRECTORY_DOWN_S:g} s, restarted"),
                  "SIGKILL": (fault_s, b.proc.kill, "B killed")}
        for name in cases:
            case(name, *faults[name])
        if not a.proc.alive():
            rows[-1].failed += 1
            notes.append(f"instance A died:\n{a.proc.tail()}")
        if not router.proc.alive():
            rows[-1].failed += 1
            notes.append(f"the router died:\n{router.proc.tail()}")
    return rows, notes
