"""Layer-wise loads: a remote hit pulled within the step that computes the rest of its prompt,
layer group by layer group, so that layer 0 computes while later layers are in flight.

The scheduler side answers such a hit with vLLM's *synchronous* load (``load_kv_async =
False``): the request is not parked in WAITING_FOR_REMOTE_KVS but scheduled at once, and vLLM
calls ``start_load_kv`` before the step's forward pass (``has_sync_kv_loads``,
``v1/worker/kv_connector_model_runner_mixin.py``). Every attention layer calls
``wait_for_layer_load(layer)`` before it reads the cache
(``model_executor/layers/attention/kv_transfer_utils.py``, ``maybe_transfer_kv_layer``);
:meth:`LayerwiseLoads.wait_layer` waits only for that layer's group.

A load's layers are split into ``layer_groups`` groups of consecutive layers; per holder rank
one staged pull (``transport/staged.py``) pulls each group's part of every chunk (a
``Selection`` of the holder's rows: ``layout.part_selection``) into that group's byte ranges
of the blocks (``KVLayout.part_dest``), in layer order. So this needs a layout where a slice
is a byte range of each (block, layer) row: CPU caches (the scheduler side plans layer-wise
loads only there).

Failures keep vLLM's semantics for synchronous loads: a chunk is good only when every group
of every part arrived and was verified; the blocks of the others are reported through
``get_block_ids_with_load_errors`` in the same step (:meth:`LayerwiseLoads.finish` waits for
every pull before the step's output is built), and vLLM discards the step's output for the
requests reading them and recomputes from the first bad block, on every rank (the ranks'
errors are unioned). A group that is not there when its layer asks (past the pull deadline)
fails its whole load, even if its bytes arrive later: the layer has already run. The chunks
a layer-wise request computes in its load step are not saved (the scheduler side holds them
back, ``SchedulerSide.build_meta``): they were computed from bytes that may yet fail.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from p2pkv.affinity import widen_cpu_affinity
from p2pkv.slices import KVSlice
from p2pkv.transport.base import Outcome, PullItem, PullResult, Transport
from p2pkv.transport.staged import merge
from p2pkv.vllm.layout import KVLayout, part_selection
from p2pkv.vllm.metadata import LoadPlan
from p2pkv.vllm.sources import Source

logger = logging.getLogger(__name__)


def layer_groups(num_layers: int, groups: int) -> list[range]:
    """``groups`` (at most ``num_layers``) runs of consecutive layers, as even as possible."""
    groups = max(1, min(groups, num_layers))
    bounds = [num_layers * g // groups for g in range(groups + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True, slots=True)
class LoadOutcome:
    """What a finished load did (the worker's counters and log line)."""

    req_id: str
    chunks: int
    ok: int
    missing: int
    failed_blocks: frozenset[int]
    nbytes: int
    elapsed_s: float
    addresses: tuple[str, ...]
    waited_s: float = 0.0
    """How long the step's attention layers were blocked waiting for this load's groups (the
    part of the pull the forward pass did not hide)."""
    landed_s: tuple[float, ...] = ()
    """Per layer group: when its last part landed, from the load's start."""


@dataclass(slots=True)
class _Load:
    plan: LoadPlan
    sources: tuple[Source, ...]
    started: float
    # per source: one event per group, set once that group has landed (or the pull ended)
    landed: list[list[threading.Event]] = field(default_factory=list)
    futures: list[Future] = field(default_factory=list)
    late: str = ""  # why a layer ran before its group was there ("" if never)
    done_at: float = 0.0  # when its last pull returned (the pull's own duration, not the step's)
    waited: float = 0.0  # seconds wait_layer blocked on this load
    landed_at: list[float] = field(default_factory=list)  # per group, latest over the sources


class LayerwiseLoads:
    """The layer-wise loads of the current step on one worker rank."""

    def __init__(self, layout: KVLayout, mine: KVSlice, transport: Transport, *, groups: int,
                 timeout_s: float, threads: int) -> None:
        self._layout = layout
        self._mine = mine
        self._transport = transport
        self._timeout_s = timeout_s
        self._groups = layer_groups(layout.num_layers, groups)
        # layer index (this rank's layers) -> its group
        self._group_of = {layer: g for g, r in enumerate(self._groups) for layer in r}
        self._index = {name: i for i, name in enumerate(layout.layer_names)}
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="p2pkv-layer",
                                        initializer=widen_cpu_affinity)
        self._loads: list[_Load] = []

    @property
    def groups(self) -> list[range]:
        return list(self._groups)

    def start(self, plan: LoadPlan, sources: tuple[Source, ...]) -> None:
        """Start pulling ``plan`` from ``sources`` (this rank's), group by group."""
        load = _Load(plan, sources, time.monotonic())
        load.landed_at = [0.0] * len(self._groups)
        self._loads.append(load)
        for source in sources:
            events = [threading.Event() for _ in self._groups]
            load.landed.append(events)
            try:
                stages = self._stages(plan, source)
            except Exception as e:  # noqa: BLE001 - a bug here must still fail the load only
                logger.exception("p2pkv: layer-wise load for %s cannot be planned", plan.req_id)
                for ev in events:
                    ev.set()
                done: Future = Future()
                done.set_result([[PullResult(c.key, Outcome.FAILED, str(e))
                                  for c in plan.chunks]])
                load.futures.append(done)
                continue
            load.futures.append(self._pool.submit(self._pull, load, source, stages, events))

    def _stages(self, plan: LoadPlan, source: Source) -> list[list[PullItem]]:
        """Per group: the group's part of ``source.part`` of every chunk (empty where the
        source holds none of the group's layers)."""
        mine, layout = self._mine, self._layout
        stages = []
        for layers in self._groups:
            group = KVSlice(mine.head_start, mine.head_end, mine.num_heads,
                            mine.layer_start + layers.start, mine.layer_start + layers.stop,
                            mine.num_layers)
            part = source.part.intersect(group)
            if part is None:
                stages.append([])
                continue
            select = part_selection(source.holder, part, layout.head_bytes)
            stages.append([PullItem(c.key, layout.part_dest(c.block_ids, mine, part), select)
                           for c in plan.chunks])
        return stages

    def _pull(self, load: _Load, source: Source, stages: list[list[PullItem]],
              events: list[threading.Event]) -> list[list[PullResult]]:
        live = [s for s, stage in enumerate(stages) if stage]
        for s, stage in enumerate(stages):
            if not stage:
                events[s].set()
        def landed(i: int) -> None:
            g = live[i]
            load.landed_at[g] = max(load.landed_at[g], time.monotonic() - load.started)
            events[g].set()

        try:
            return self._transport.pull_staged(source.address, [stages[s] for s in live],
                                               self._timeout_s, landed, source.epoch,
                                               source.key)
        finally:
            load.done_at = max(load.done_at, time.monotonic())
            for ev in events:
                ev.set()  # whatever happened, nobody waits for this pull any longer

    def wait_layer(self, layer_name: str) -> None:
        """Block until every load's group holding ``layer_name`` has landed (every group for
        a layer this rank does not know)."""
        layer = self._index.get(layer_name)
        group = self._group_of.get(layer) if layer is not None else None
        for load in self._loads:
            for events in load.landed:
                for g in (range(len(events)) if group is None else (group,)):
                    self._wait(load, events[g], g)

    def _wait(self, load: _Load, event: threading.Event, group: int) -> None:
        if event.is_set():
            return
        # NOTE: the transport returns within the pull's deadline; a margin for a loaded
        # machine, then the layer runs without it and the whole load is failed.
        t0 = time.monotonic()
        limit = max(0.0, load.started + self._timeout_s + 1.0 - t0)
        arrived = event.wait(limit)
        load.waited += time.monotonic() - t0
        if not arrived:
            load.late = f"layers {self._groups[group]} were not there when they were read"
            logger.warning("p2pkv: %s: %s; the load is reported failed", load.plan.req_id,
                           load.late)

    def pending(self) -> bool:
        return bool(self._loads)

    def finish(self) -> list[LoadOutcome]:
        """Wait for every pull of this step (their bytes must not land in blocks after the
        step) and say what each load did; the step's loads are then forgotten."""
        loads, self._loads = self._loads, []
        return [self._outcome(load) for load in loads]

    def _outcome(self, load: _Load) -> LoadOutcome:
        plan = load.plan
        per_source: list[list[PullResult]] = []
        for future in load.futures:
            while True:
                try:
                    stages = future.result(timeout=self._timeout_s + 5.0)
                    break
                except TimeoutError:
                    # NOTE: never return while a pull may still write into the blocks
                    logger.error("p2pkv: a layer-wise pull for %s is still running past its "
                                 "deadline; waiting for it", plan.req_id)
                except Exception as e:  # noqa: BLE001 - a crashed pull fails its chunks
                    logger.exception("p2pkv: layer-wise pull for %s crashed", plan.req_id)
                    stages = [[PullResult(c.key, Outcome.FAILED, str(e)) for c in plan.chunks]]
                    break
            stages = [s for s in stages if s]
            per_source.append(merge(stages) if stages else
                              [PullResult(c.key, Outcome.OK) for c in plan.chunks])
        ok = missing = 0
        failed: set[int] = set()
        for i, chunk in enumerate(plan.chunks):
            results = [r[i] if i < len(r) else None for r in per_source]
            bad = next((r for r in results if r is None or r.outcome is not Outcome.OK), None)
            if not load.late and per_source and bad is None:
                ok += 1
                continue
            failed.update(b for b in chunk.block_ids if b is not None)
            if bad is not None:
                missing += bad.outcome is Outcome.MISSING
            logger.info("p2pkv: chunk of %s not loaded layer-wise (%s); recomputing from "
                        "there", plan.req_id,
                        load.late or (f"{bad.outcome.value}: {bad.reason}" if bad else "?"))
        chunk_bytes = self._layout.chunk_bytes(len(plan.chunks[0].block_ids)) \
            if plan.chunks else 0
        nbytes = sum(ok * chunk_bytes * s.part.area // self._mine.area for s in load.sources)
        return LoadOutcome(plan.req_id, len(plan.chunks), ok, missing, frozenset(failed),
                           nbytes, (load.done_at or time.monotonic()) - load.started,
                           tuple(s.address for s in load.sources), load.waited,
                           tuple(load.landed_at))

    def close(self) -> None:
        self.finish()
        self._pool.shutdown(wait=True, cancel_futures=True)
