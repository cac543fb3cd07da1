"""The overhead measurement of ``p2pkv bench ttft``: what a cache connector costs where it
cannot help.

One ``vllm serve`` CPU instance per setup, all started together so the samples can be
interleaved: ``vllm`` (its own prefix cache, no connector), ``p2pkv`` (the connector, with a
directory and no peer), and ``lmcache`` (LMCache's multiprocess server, only where LMCache is
installed). For each sample, a new document is asked about on every setup in turn (a *cold
miss*: nothing anywhere holds it), then a second question about it on every setup in turn (a
*local hit*: the instance's own prefix cache holds the document). The setups' order rotates
from sample to sample (measured: the first request of a round was up to 2x faster than the
second on this 2-core host, so a number of samples that is a multiple of the number of setups
keeps the comparison fair), and each request starts on an idle machine (``settle_s``). Every
instance runs with the same placement of vLLM's threads
(:func:`p2pkv.harness.cluster.reserved_cpus`).

``vllm-control`` (optional) is a second plain vLLM instance, measured like the others: its
ratio over ``vllm`` is what two identical instances differ by on this host (an A/A control).
A p2pkv ratio inside that spread is not an overhead the run can resolve; the table prints
the control's ratios next to p2pkv's.

Called by :mod:`p2pkv.bench.ttft`, which prints :func:`render`'s lines; the prompts come from its
request plan.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from p2pkv.harness import lmcache
from p2pkv.harness.cluster import Instance, LocalCluster, wait_healthy
from p2pkv.harness.openai_client import complete

SETUPS = ("vllm", "p2pkv", "lmcache", "vllm-control")
DEFAULT_SETUPS = ("vllm", "p2pkv", "lmcache")
"""What a run measures unless asked: the control costs one more instance and its samples."""
CONTROL = "vllm-control"
KINDS = ("cold", "hit")
GOAL_RATIO = 1.02
"""Issue 17: p2pkv's p50 at most this many times plain vLLM's, for both kinds."""


@dataclass(frozen=True, slots=True)
class Sample:
    setup: str
    kind: str  # "cold" (a new document) or "hit" (the same document again: a local hit)
    index: int
    ttft_s: float


@dataclass(frozen=True, slots=True)
class DocumentPair:
    """Two prompts about one document: the first is a cold miss, the second a local hit."""

    cold: tuple[int, ...]
    hit: tuple[int, ...]


def setups_available(wanted: Sequence[str] = DEFAULT_SETUPS) -> list[str]:
    """The ``wanted`` setups that can run here (``lmcache`` only where it is installed), in
    :data:`SETUPS` order; plain ``vllm`` always (the ratios are over it)."""
    unknown = sorted(set(wanted) - set(SETUPS))
    if unknown:
        raise ValueError(f"unknown overhead setups {unknown}; known: {list(SETUPS)}")
    return [s for s in SETUPS
            if (s in wanted or s == "vllm") and (s != "lmcache" or lmcache.installed())]


def start_setups(cluster: LocalCluster, setups: Sequence[str], max_model_len: int = 4096
                 ) -> dict[str, Instance]:
    out = {}
    if "p2pkv" in setups:
        cluster.start_directory()
    for name in setups:
        if name == "lmcache":
            server = lmcache.start_server(cluster, "tcp")
            out[name] = cluster.start_vllm("overhead-lmcache", connector=False,
                                           extra_args=server.vllm_args(),
                                           extra_env=lmcache.ENV, max_model_len=max_model_len)
        else:
            out[name] = cluster.start_vllm(f"overhead-{name}", connector=name == "p2pkv",
                                           max_model_len=max_model_len)
    return out


def measure(pairs: Sequence[DocumentPair], instances: dict[str, Instance], settle_s: float,
            progress: Callable[[int], None] = lambda n: None) -> list[Sample]:
    """Interleaved samples: per document, the cold miss on every setup, then the local hit on
    every setup; the order of the setups rotates with the document."""
    names = list(instances)
    for name in names:  # an instance's first request is slower (not what is measured)
        complete(instances[name].url, "Warm-up: say hello.", max_tokens=2)
    samples = []
    for i, pair in enumerate(pairs):
        order = names[i % len(names):] + names[:i % len(names)]
        for kind, prompt in (("cold", pair.cold), ("hit", pair.hit)):
            for name in order:
                time.sleep(settle_s)  # the previous request's spin-wait settles
                c = complete(instances[name].url, list(prompt))
                samples.append(Sample(name, kind, i, c.ttft_s))
                progress(1)
    return samples


def run(pairs: Sequence[DocumentPair], cluster: LocalCluster, settle_s: float,
        progress: Callable[[int], None] = lambda n: None,
        setups: Sequence[str] = DEFAULT_SETUPS, max_model_len: int = 4096) -> list[Sample]:
    instances = start_setups(cluster, setups_available(setups), max_model_len)
    wait_healthy(list(instances.values()), timeout_s=600)
    return measure(pairs, instances, settle_s, progress)


def _p50(xs: list[float]) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def summarize(samples: Sequence[Sample]) -> dict:
    """Per setup and kind: n, p50, min, max, and the p50 over plain vLLM's p50."""
    out: dict = {}
    for s in samples:
        out.setdefault(s.setup, {}).setdefault(s.kind, []).append(s.ttft_s)
    table: dict = {}
    for setup, kinds in out.items():
        table[setup] = {k: {"n": len(v), "p50_s": _p50(v), "min_s": min(v), "max_s": max(v)}
                        for k, v in kinds.items()}
    base = table.get("vllm", {})
    by_key = {(s.setup, s.kind, s.index): s.ttft_s for s in samples}
    for setup, kinds in table.items():
        for k, row in kinds.items():
            if k in base:
                row["over_vllm"] = row["p50_s"] / base[k]["p50_s"]
                # the same document's sample next to vLLM's: less sensitive to load drifts
                pairs = [t / by_key[("vllm", kk, i)] for (st, kk, i), t in by_key.items()
                         if st == setup and kk == k and ("vllm", kk, i) in by_key]
                row["paired_over_vllm_p50"] = _p50(pairs)
    goals = {f"p2pkv_{k}_over_vllm": table["p2pkv"][k]["over_vllm"]
             for k in KINDS if "p2pkv" in table and "over_vllm" in table["p2pkv"].get(k, {})}
    out = {"table": table, "goals": goals, "goal_ratio": GOAL_RATIO}
    control = {k: {"over_vllm": row["over_vllm"],
                   "paired_over_vllm_p50": row["paired_over_vllm_p50"]}
               for k, row in table.get(CONTROL, {}).items() if "over_vllm" in row}
    if control:
        out["control"] = control
    return out


def render(summary: dict, placement: str, load: tuple[float, float] | None = None
           ) -> list[str]:
    """The table; ``load``: the host's 1-minute load average when the measured requests
    began and when they ended."""
    table = summary["table"]
    setups = [s for s in SETUPS if s in table]
    lines = [f"OVERHEAD: TTFT p50 (s) where a connector cannot help, interleaved samples, "
             f"same placement for all ({placement})"
             + (f", load average {load[0]:.1f} -> {load[1]:.1f}" if load else ""),
             f"{'kind':<30}{'n':>4}" + "".join(f"{s:>16}" for s in setups)]
    labels = {"cold": "cold miss (new document)", "hit": "local hit (same document)"}
    for k in KINDS:
        rows = [table[s].get(k) for s in setups]
        if not any(rows):
            continue
        n = min(r["n"] for r in rows if r)
        cells = "".join(f"{r['p50_s']:>8.3f} ({r.get('over_vllm', float('nan')):.2f}x)"
                        if r else f"{'-':>16}" for r in rows)
        lines.append(f"{labels[k]:<30}{n:>4}{cells}")
    for k in KINDS:
        key = f"p2pkv_{k}_over_vllm"
        if key in summary["goals"]:
            ratio = summary["goals"][key]
            met = "met" if ratio <= summary["goal_ratio"] else "NOT met"
            paired = table["p2pkv"][k]["paired_over_vllm_p50"]
            lines.append(f"  goal p2pkv {labels[k].split(' (')[0]} <= "
                         f"{summary['goal_ratio']:.2f}x vLLM (p50s): {ratio:.3f}x ({met}); "
                         f"median of per-document ratios {paired:.3f}x")
            control = summary.get("control", {}).get(k)
            if control:
                lines.append(f"    A/A control (a second plain vLLM instance): "
                             f"{control['over_vllm']:.3f}x (p50s), "
                             f"{control['paired_over_vllm_p50']:.3f}x (per-document): "
                             "two identical instances differ by this much here")
    if "lmcache" not in table:
        lines.append("  lmcache: not installed (scripts/install_lmcache.sh adds the column)"
                     if not lmcache.installed() else "  lmcache: not measured in this run")
    return lines
