"""The cluster-size sweep of ``p2pkv bench trace``: its plot, and merging sweeps run apart.

A whole-hour replay at 1,000 instances takes ~6 minutes here, so the sweep's points can be
run as separate commands (each with its own ``--out``) and merged afterwards with
``p2pkv bench trace --merge A/trace.json,B/trace.json --out DIR``: one report and one plot,
without replaying anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from p2pkv.bench.report import Panel, plot_panels

SAME_SETUP = ("trace", "limit", "profile", "keys_per_block", "max_holders", "slow_fraction",
              "slow_factor", "local_host_tier")
"""Report fields that must agree for points of one sweep (the cluster size may differ)."""


class MergeError(ValueError):
    """The reports cannot form one sweep (a different setup or different policies)."""


def sweep_point(run: dict) -> dict:
    """A replay's entry in ``report["sweep"]``."""
    return {"instances": run["instances"], "wall_s": run["wall_s"],
            "speedup": run.get("speedup"), "load_avg_1m": run.get("load_avg_1m"),
            "results": run["results"]}


def merge(reports: list[dict], sources: list[str]) -> dict:
    """One report from several: the first one's headline run, and a sweep of every size any
    of them ran (a headline run wins over a sweep point of the same size; else the first
    report given)."""
    if not reports:
        raise MergeError("nothing to merge")
    first = reports[0]
    policies = [r["policy"] for r in first["run"]["results"]]
    points: dict[int, tuple[int, dict]] = {}  # instances -> (rank: 0 headline, 1 sweep; point)
    for source, report in zip(sources, reports):
        for key in SAME_SETUP:
            if report.get(key) != first.get(key):
                raise MergeError(f"{source}: {key} is {report.get(key)!r}, "
                                 f"{sources[0]} has {first.get(key)!r}")
        got = [r["policy"] for r in report["run"]["results"]]
        if got != policies:
            raise MergeError(f"{source}: policies {got}, {sources[0]} has {policies}")
        candidates = [(0, sweep_point(report["run"]))] + [(1, p) for p in report["sweep"]]
        for rank, point in candidates:
            have = points.get(point["instances"])
            if have is None or rank < have[0]:
                points[point["instances"]] = (rank, point)
    out = dict(first)
    out["sweep"] = [points[n][1] for n in sorted(points)]
    out["merged_from"] = list(sources)
    out["total_wall_s"] = sum(r.get("total_wall_s", 0.0) for r in reports)
    return out


def load_reports(paths: list[Path]) -> list[dict]:
    return [json.loads(p.read_text()) for p in paths]


def plot(report: dict, path: Path) -> bool:
    """Share of prompt tokens from cache and TTFT p50/p90 against cluster size: one colour
    per policy in both panels (the legend is the first panel's), p90 dashed."""
    sweep = report["sweep"]
    sizes = [p["instances"] for p in sweep]
    hits: dict[str, tuple[list[int], list[float]]] = {}
    ttft: dict[str, tuple[list[int], list[float]]] = {}
    hit_styles: dict[str, str] = {}
    ttft_styles: dict[str, str] = {}
    for i, name in enumerate(r["policy"] for r in sweep[0]["results"]):
        rows = [next(r for r in p["results"] if r["policy"] == name) for p in sweep]
        hits[name] = (sizes, [100 * r["saved_share"] for r in rows])
        hit_styles[name] = f"C{i}-"
        for q, line in (("p50", "-"), ("p90", "--")):
            ttft[f"{name} {q}"] = (sizes, [r["ttft_s"][q] for r in rows])
            ttft_styles[f"{name} {q}"] = f"C{i}{line}"
    return plot_panels(path, [
        Panel(hits, "instances", "prompt tokens served from cache (%)", log_x=True,
              title=f"{Path(report['trace']).name}, {report['profile']}", styles=hit_styles),
        Panel(ttft, "instances", "estimated TTFT (s): p50 solid, p90 dashed", log_x=True,
              log_y=True, styles=ttft_styles, legend=False)], size=(5.5, 4.2))
