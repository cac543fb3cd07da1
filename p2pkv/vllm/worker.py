"""Worker side of the connector (runs in each vLLM worker process, one per TP rank).

Each rank holds one :class:`~p2pkv.slices.KVSlice` of every chunk (its KV heads). The lowest
rank of each distinct slice (every rank, unless KV heads are replicated or the model uses
MLA) owns a chunk store and data-plane server, and a directory client that keeps the rank
registered by itself (leases, re-registration, republishing: see ``p2pkv.directory.client``);
the worker only tells it what the store gained and lost. Pulls run on a small thread pool,
straight into the blocks vLLM allocated: a rank pulls its slice from the holder ranks the
scheduler side chose for it (``LoadPlan.sources[rank]``), from several in parallel, each
part written at its heads' offset in the blocks; ranks holding equal slices pull them once
per instance (``p2pkv.vllm.relaying.RankRelay``). Their outcomes are handed back to vLLM
through ``get_finished`` / ``get_block_ids_with_load_errors``; vLLM waits for every rank to
report a request and unions the ranks' failed blocks, so every rank recomputes the same
blocks. Saves copy completed chunks out of the paged cache after the step's forward pass,
never on the step's critical path: from a CPU cache on a save thread
(``p2pkv.vllm.saver.HostSaver``), from a GPU cache as asynchronous copies
(``p2pkv.vllm.gpu.AsyncSaver``); :meth:`WorkerSide.fence`, called before the next step
touches the cache, waits for the copies.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from p2pkv.affinity import widen_cpu_affinity
from p2pkv.directory.client import DirectoryClient, Registration
from p2pkv.errors import ConfigError
from p2pkv.keys import InstanceId, Namespace
from p2pkv.slices import KVSlice
from p2pkv.store import ChunkStore
from p2pkv.transport.base import Outcome, PullItem, PullResult, Transport
from p2pkv.vllm.config import ConnectorConfig
from p2pkv.vllm.idlewait import send_wake
from p2pkv.vllm.layerwise import LayerwiseLoads, LoadOutcome
from p2pkv.vllm.layout import KVLayout, pull_batches, pull_selection
from p2pkv.vllm.leases import LeasedBlocks
from p2pkv.vllm.metadata import LoadPlan, P2PKVMetadata, P2PKVWorkerMeta
from p2pkv.vllm.planning import PullSample
from p2pkv.vllm.relay import RelaySetup
from p2pkv.vllm.relaying import RankRelay, Relaying, TakenLoad
from p2pkv.vllm.sources import Source
from p2pkv.vllm.saver import HostSaver
from p2pkv.vllm.stats import DeltaTracker, StatsDelta

if TYPE_CHECKING:
    from p2pkv.vllm.gpu import AsyncSaver

logger = logging.getLogger(__name__)

IDLE_STEP_WAIT_S = 0.02
"""How long ``get_finished`` may wait for a load in flight on a step without a forward pass.

NOTE: while a request waits for remote KV, vLLM's engine steps about every millisecond
(``EngineCoreProc._process_engine_step`` sleeps 1 ms between steps that run no model), and
every step wakes each worker process, which then spins on vLLM's shared-memory queue. At
TP 2 on a 2-CPU host that is three busy processes: measured, a waiting puller took ~85 % of
both CPUs and the holder's serve threads (another process) did not run for 5 s, until the
pull deadline. Waiting here (woken as soon as a load ends) turns that loop into ~50 steps a
second while loads run; a step with a forward pass never waits."""


@dataclass(slots=True)
class WorkerCounters:
    loads: int = 0
    chunks_pulled: int = 0
    bytes_pulled: int = 0
    chunks_missing: int = 0
    chunks_failed: int = 0
    pull_ms: int = 0
    chunks_saved: int = 0
    chunks_served: int = 0
    save_copy_ms: int = 0  # CPU caches: time the save thread spent copying out of the cache
    save_fence_waits: int = 0  # steps that had to wait for a save's copy (issue 17)
    save_fence_wait_ms: int = 0  # how long those steps waited, in all
    save_copy_in_forward_ms: int = 0  # copying that overlapped a forward pass (saver's gate)
    save_prefaulted: int = 0  # store slots faulted in ahead of their first write, while idle
    save_prefault_ms: int = 0  # time the save thread spent doing it
    loads_layerwise: int = 0  # loads pulled layer group by layer group (issue 14)
    chunk_bytes: int = 0  # bytes of one chunk in this rank's store (0: no store)
    chunks_relayed: int = 0  # a relay leader: chunk parts its followers took (issue 11)
    bytes_relayed: int = 0  # ... and their bytes (they moved over no network)
    chunks_taken_from_relay: int = 0  # a follower: chunks taken from its leader's pulls
    bytes_taken_from_relay: int = 0


class WorkerSide:
    def __init__(self, config: ConnectorConfig, *, instance: InstanceId, namespace: Namespace,
                 chunk_blocks: int, transport: Transport, directory: DirectoryClient,
                 probe: str = "", rank: int = 0, slice: KVSlice | None = None,
                 saves: bool = True, engine: str = "", spec: str = "",
                 relay: RelaySetup | None = None) -> None:
        """``rank``: this worker's TP rank (its entry in ``LoadPlan.sources``); ``slice``: what
        it holds (None: the whole model, TP 1); ``saves``: it is the lowest rank holding its
        slice, so it saves, serves and registers (the others only pull); ``relay``: ranks
        hold equal slices, so the lowest pulls them for all (``p2pkv.vllm.relay``)."""
        self._config = config
        self._rank = rank
        self._slice = slice
        self._saves = saves
        self._engine = engine
        self._spec = spec
        self._instance = instance
        self._namespace = namespace
        self._chunk_blocks = chunk_blocks
        self._transport = transport
        self._directory = directory
        self._layout: KVLayout | None = None
        self._layerwise: LayerwiseLoads | None = None  # CPU caches, made at registration
        self._store: ChunkStore | None = None
        self._saver: AsyncSaver | None = None  # GPU caches: saves are async copies
        self._host_saver: HostSaver | None = None  # CPU caches: saves on a save thread
        self._leases: LeasedBlocks | None = None  # CPU caches with lease_s: tier 1
        self._release_now: set[str] = set()  # granted leases this rank cannot serve
        self._engine_waits = False  # the EngineCore waits out idle steps (meta.idle_wait)
        self._wake_port = 0  # ... and is woken there by a datagram (meta.wake_port)
        self._wake_sock: socket.socket | None = None
        self._pool = ThreadPoolExecutor(config.pull_threads, thread_name_prefix="p2pkv-pull",
                                        initializer=widen_cpu_affinity)
        # NOTE: a load's parts from several holder ranks run here, never on _pool, whose
        # threads wait for them (a shared pool could deadlock).
        self._parts = ThreadPoolExecutor(config.pull_threads, thread_name_prefix="p2pkv-part",
                                         initializer=widen_cpu_affinity)
        self._lock = threading.Lock()  # guards the fields below (pull threads write)
        self._load_ended = threading.Condition(self._lock)
        self._loads_in_flight = 0
        self._idle_step = False
        self._finished_recving: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._failed_reqs: set[str] = set()  # loads with a failed chunk (hybrid: see connector)
        self._pulled_bytes: dict[tuple[str, str], int] = {}  # (req, holder) -> bytes received
        self._pull_samples: list[PullSample] = []  # for the scheduler side's planner
        self._planner_status: dict[str, int] = {}  # the scheduler side's, for Report
        self.counters = WorkerCounters()
        self._stats = DeltaTracker()
        self._reported: dict[str, int] = {}
        self._relay = RankRelay(relay, rank, pull_timeout_s=config.pull_timeout_s)
        self._probe = probe
        self._epoch = time.time_ns()  # a restarted process registers a higher epoch

    def register_kv_caches(self, layout: KVLayout) -> None:
        self._layout = layout
        if self._slice is None:
            self._slice = KVSlice.whole(layout.heads, layout.num_layers)
        if (self._slice.heads, self._slice.layers) != (layout.heads, layout.num_layers):
            raise ConfigError(f"p2pkv: rank {self._rank} should hold {self._slice}, but vLLM "
                              f"gave it {layout.heads} KV heads in {layout.num_layers} layers")
        slot = layout.chunk_bytes(self._chunk_blocks)
        self._relay.join(layout, self._slice, slot)
        if not layout.on_gpu and layout.head_bytes:
            self._layerwise = LayerwiseLoads(
                layout, self._slice, self._transport, groups=self._config.layer_groups,
                timeout_s=self._config.pull_timeout_s, threads=self._config.pull_threads)
        if not self._saves:
            logger.info("p2pkv worker rank %d: %s, the same as a lower rank's: pulls only "
                        "(that rank saves and serves)", self._rank, self._slice)
            return
        capacity = max(1, self._config.store_bytes // slot)
        self._store = self._transport.create_store(slot, capacity)
        self.counters.chunk_bytes = slot
        if layout.on_gpu:
            from p2pkv.vllm.gpu import AsyncSaver

            self._saver = AsyncSaver(layout, self._store)
        else:
            self._host_saver = HostSaver(layout, self._store, self._publish)
            if self._config.lease_s > 0:
                self._wake_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._leases = LeasedBlocks(layout, self._store, self._directory.publish,
                                            self._host_saver.save, on_ready=self._wake_engine)
        address = self._transport.serve(self._store, self._epoch, self._leases)
        # NOTE: the physical block layout joins the hash probe as "<seed probe>.<layout>":
        # instances whose bytes would not copy exactly (another attention backend's layout)
        # are refused by the directory like a hash-seed mismatch; the router compares the
        # part before the dot (keys.seed_part) with the probe it computes itself.
        probe = f"{self._probe}.{hashlib.sha256(layout.signature.encode()).hexdigest()[:8]}"
        self._directory.register(Registration(
            instance=self._instance, epoch=self._epoch, namespace=self._namespace,
            address=address, probe=probe, capabilities=(self._transport.name,),
            engine=self._engine, slice=self._slice, spec=self._spec), wait_connected_s=1.0)
        logger.info("p2pkv worker rank %d: %s, %d layers on %s (%s), %d B per block, chunk "
                    "%d B, store %d chunks, serving on %s, namespace %s", self._rank,
                    self._slice, layout.num_layers, layout.device, layout.signature,
                    layout.block_bytes, slot, capacity, address, self._namespace)

    def fence(self, meta: P2PKVMetadata) -> None:
        """Before a step touches the cache: wait until no save still reads a block the step
        may write (``meta.new_blocks``: freed blocks vLLM handed out again); then the step's
        forward pass begins, and the save thread holds its copies back until it ends."""
        if self._host_saver is not None:
            self._host_saver.forward_ends()  # the last step is over, whether or not it said so
            self._host_saver.fence(meta.new_blocks)
            self._host_saver.forward_begins()
        if self._saver is not None:
            self._saver.fence()

    def wait_saved(self, timeout_s: float) -> bool:
        """Wait until the saves handed over so far are stored and published (CPU caches)."""
        return self._host_saver is None or self._host_saver.wait_saved(timeout_s)

    # -- loads ----------------------------------------------------------------------------

    def start_loads(self, meta: P2PKVMetadata) -> None:
        if self._saver is not None:
            self._saver.fence()  # this step's kernels wait for last step's copies out
            self._publish(self._saver.collect())
        if meta.planner_status is not None:
            self._planner_status = dict(meta.planner_status)
        self._engine_waits, self._wake_port = meta.idle_wait, meta.wake_port
        if self._leases is not None:
            self._leases.apply(meta)
        else:
            # NOTE: a rank that does not serve (a replica, a GPU cache) hands every grant
            # back at once: vLLM frees the blocks once every rank has reported the request.
            self._release_now.update(g.req_id for g in meta.grants)
        with self._lock:
            self._idle_step = meta.idle_step
            # NOTE: layer-wise loads end within this step, never through finished_recving
            self._loads_in_flight += sum(not plan.layerwise for plan in meta.loads)
        for plan in meta.loads:
            if plan.layerwise:
                self._start_layerwise(plan)
            else:
                self._pool.submit(self._run_load, plan)

    # -- layer-wise loads (p2pkv.vllm.layerwise) ------------------------------------------

    def _start_layerwise(self, plan: LoadPlan) -> None:
        sources = plan.sources[self._rank] if self._rank < len(plan.sources) else ()
        if self._layerwise is None or not sources:
            # NOTE: the scheduler side plans layer-wise loads only for CPU caches; a load
            # that cannot run is a failed one (recomputed), never one reported as finished.
            logger.error("p2pkv: rank %d cannot load %s layer-wise (%s); recomputing",
                         self._rank, plan.req_id,
                         "no sources" if self._layerwise is not None else "not a CPU cache")
            self._record(LoadOutcome(plan.req_id, len(plan.chunks), 0, 0, frozenset(
                b for c in plan.chunks for b in c.block_ids if b is not None), 0, 0.0, ()))
            return
        self._layerwise.start(plan, sources)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Before attention layer ``layer_name`` reads the cache: its group has landed."""
        if self._layerwise is not None and self._layerwise.pending():
            self._layerwise.wait_layer(layer_name)

    def finish_layerwise(self) -> None:
        """Wait for this step's layer-wise loads and record their failed blocks (before the
        step's saves and its ``get_block_ids_with_load_errors``)."""
        if self._layerwise is None or not self._layerwise.pending():
            return
        for outcome in self._layerwise.finish():
            self._record(outcome)

    def _record(self, o: LoadOutcome) -> None:
        """Count a layer-wise load's outcome. NOTE: never in ``finished_recving``: the request
        of a synchronous load is running, not waiting (vLLM asserts on it)."""
        logger.info("p2pkv: rank %d pulled %d/%d chunks (%.1f MB) for %s layer-wise from %s "
                    "in %.1f ms; layers waited %.1f ms; groups landed at %s ms", self._rank,
                    o.ok, o.chunks, o.nbytes / 1e6, o.req_id, ", ".join(o.addresses),
                    o.elapsed_s * 1000, o.waited_s * 1000,
                    "/".join(f"{t * 1000:.0f}" for t in o.landed_s))
        with self._lock:
            self._failed_blocks |= o.failed_blocks
            self.counters.loads_layerwise += 1
            self._count_load(o.chunks, o.ok, o.missing, o.nbytes, o.elapsed_s)

    def _count_load(self, chunks: int, ok: int, missing: int, nbytes: int,
                    elapsed_s: float) -> None:
        """Count a finished load (the caller holds ``_lock``)."""
        c = self.counters
        c.loads += 1
        c.chunks_pulled += ok
        c.bytes_pulled += nbytes
        c.chunks_missing += missing
        c.chunks_failed += chunks - ok - missing
        c.pull_ms += int(elapsed_s * 1000)
        self._stats.observe("pull_seconds", elapsed_s)

    def _run_load(self, plan: LoadPlan) -> None:
        assert self._layout is not None
        failed: set[int] = set()
        t0 = time.monotonic()
        sources = plan.sources[self._rank] if self._rank < len(plan.sources) else ()
        via = ", ".join(s.address for s in sources)
        relay: Relaying | None = None
        taken: TakenLoad | None = None
        try:
            if not sources:
                raise ValueError(f"the plan names no sources for rank {self._rank}")
            taken = self._relay.take(plan, sources)
            if taken is not None:
                per_source = taken.per_source
                via = f"rank {self._relay.leader_rank()}'s pulls (relay)"
            else:
                relay = self._relay.start(plan, sources)
                if len(sources) == 1:
                    per_source = [self._pull_part(plan, sources[0], 0, relay)]
                else:
                    per_source = [f.result() for f in [
                        self._parts.submit(self._pull_part, plan, s, p, relay)
                        for p, s in enumerate(sources)]]
        except Exception:  # noqa: BLE001 - a bug here must still release the request
            logger.exception("p2pkv: pull for %s crashed; recomputing", plan.req_id)
            per_source = [[]]
            if relay is not None:  # the followers fail the same chunks, at once
                relay.fail("the relay rank's pull crashed")
        ok = 0
        missing = 0
        for i, chunk in enumerate(plan.chunks):
            # NOTE: a chunk is good only when every part of it arrived
            results = [r[i] if i < len(r) else None for r in per_source]
            if all(r is not None and r.outcome is Outcome.OK for r in results):
                ok += 1
                continue
            failed.update(b for b in chunk.block_ids if b is not None)
            bad = next(r for r in results if r is None or r.outcome is not Outcome.OK)
            if bad is not None:
                missing += bad.outcome is Outcome.MISSING
                logger.info("p2pkv: chunk of %s not pulled (%s: %s); recomputing from there",
                            plan.req_id, bad.outcome.value, bad.reason)
        assert self._slice is not None
        nbytes = sum(self._pulled_bytes.pop((plan.req_id, s.address), 0) for s in sources)
        elapsed = time.monotonic() - t0
        logger.info("p2pkv: rank %d pulled %d/%d chunks (%.1f MB over the network) for %s "
                    "from %s in %.1f ms", self._rank, ok, len(plan.chunks), nbytes / 1e6,
                    plan.req_id, via, elapsed * 1000)
        with self._lock:
            # NOTE: errors are recorded before the request is marked finished, so vLLM sees
            # them no later than the pass that reports the request (base.py contract).
            self._failed_blocks |= failed
            if failed:
                self._failed_reqs.add(plan.req_id)
            self._finished_recving.add(plan.req_id)
            self._loads_in_flight -= 1
            self._load_ended.notify_all()
            self._count_load(len(plan.chunks), ok, missing, nbytes, elapsed)
            if taken is not None:
                self.counters.chunks_taken_from_relay += taken.chunks
                self.counters.bytes_taken_from_relay += taken.nbytes
            # NOTE: only whole pulls teach the planner a link's speed: a failed one ended
            # early (missing chunk) or at its deadline (a dead peer is not a slow link).
            if ok == len(plan.chunks) and nbytes > 0 and plan.peer:
                self._pull_samples.append(PullSample(plan.peer, nbytes, elapsed))

    def take_worker_meta(self) -> P2PKVWorkerMeta:
        """The pulls that ended since the last call (every step, even when none did)."""
        with self._lock:
            out, self._pull_samples = self._pull_samples, []
        return P2PKVWorkerMeta(out)

    def _pull_part(self, plan: LoadPlan, source: Source, part: int = 0,
                   relay: Relaying | None = None) -> list[PullResult]:
        """Pull ``source.part`` of every chunk of ``plan`` from one holder rank, into the part's
        byte ranges of this rank's blocks; with ``relay`` (this rank leads a relay) into its
        slots first, announced to the followers, then copied into the blocks."""
        assert self._layout is not None and self._slice is not None
        layout = self._layout
        # NOTE: when the part is only some of the holder rank's heads (a puller at a higher
        # TP), the selection makes the holder send just those bytes, under their own digest;
        # chunks that sliding windows have left behind are pulled without those groups
        # (layout.pull_batches: one pull per selection).
        results: list[PullResult | None] = [None] * len(plan.chunks)
        received = 0  # bytes of the chunks that arrived (what the holder sent)
        for k, idx in pull_batches(layout, [c.block_ids for c in plan.chunks]):
            select = pull_selection(source.holder, source.part, layout.head_bytes,
                                    layout.group_sizes, k, self._chunk_blocks)
            dests = [layout.pull_dest(plan.chunks[i].block_ids, self._slice, source.part, k)
                     for i in idx]
            if relay is None:
                items = [PullItem(plan.chunks[i].key, d, select) for i, d in zip(idx, dests)]
            else:
                items = relay.items(part, idx, dests, select)
            got = self._transport.pull(source.address, items, self._config.pull_timeout_s,
                                       source.epoch, source.key)
            if relay is not None:
                relay.landed(part, idx, items, got, dests)
            for i, item, r in zip(idx, items, got):
                results[i] = r
                if r.outcome is Outcome.OK:
                    received += item.nbytes  # the destination is sized to the selection
        with self._lock:
            self._pulled_bytes[(plan.req_id, source.address)] = received
        return results  # type: ignore[return-value]

    def take_finished_recving(self) -> set[str]:
        """The requests whose loads ended since the last call. On a step without a forward
        pass, with loads in flight and none ended yet, waits up to IDLE_STEP_WAIT_S for one
        (see its note)."""
        with self._lock:
            if self._idle_step and self._loads_in_flight and not self._finished_recving:
                self._load_ended.wait(IDLE_STEP_WAIT_S)
            out, self._finished_recving = self._finished_recving, set()
        self._report_if_changed()
        return out

    def take_finished_sending(self) -> set[str]:
        """Leased requests whose blocks vLLM may free (``finished_sending``). On a step
        without a forward pass with leases out (vLLM keeps stepping while it holds a finished
        request's blocks), waits up to IDLE_STEP_WAIT_S for one to end instead of letting the
        engine spin, unless the EngineCore waits out such steps itself (``meta.idle_wait``:
        then the wait there is woken by ``_wake_engine``)."""
        out, self._release_now = self._release_now, set()
        if self._leases is not None:
            with self._lock:
                idle = self._idle_step and not self._loads_in_flight and not self._engine_waits
            out |= self._leases.take_released(IDLE_STEP_WAIT_S if idle and not out else 0.0)
            if out:
                # NOTE: vLLM may take no further step once it has freed these blocks (an
                # idle instance): report the lease counters now, not at a next step
                self._report_if_changed()
        return out

    def _wake_engine(self) -> None:
        """A lease can be handed back (a server thread): end the EngineCore's idle wait so
        that vLLM steps and takes it (``p2pkv.vllm.idlewait``)."""
        if self._wake_sock is not None and self._wake_port:
            send_wake(self._wake_sock, self._wake_port)

    def take_failed_blocks(self) -> set[int]:
        self.finish_layerwise()  # vLLM may ask before wait_for_save (defer_finalize)
        with self._lock:
            out, self._failed_blocks = self._failed_blocks, set()
            return out

    def take_failed_requests(self) -> set[str]:
        """Requests whose load had a failed chunk (recorded before they are finished)."""
        with self._lock:
            out, self._failed_reqs = self._failed_reqs, set()
            return out

    # -- saves ----------------------------------------------------------------------------

    def save(self, meta: P2PKVMetadata) -> None:
        """After the step's forward pass (``wait_for_save``): queue its chunks' copies."""
        if self._host_saver is not None:
            self._host_saver.forward_ends()
        self.finish_layerwise()
        if not meta.saves or self._store is None or self._layout is None:
            return
        if self._saver is not None:
            for plan in meta.saves:
                self._saver.save(plan.key, plan.block_ids)
            self._publish(self._saver.collect())
            return
        assert self._host_saver is not None
        self._host_saver.save([(plan.key, plan.block_ids) for plan in meta.saves])

    def _publish(self, added: list) -> None:
        """Tell the directory what the store gained and lost (the main thread and the save
        thread both call it; the directory client is thread-safe)."""
        assert self._store is not None
        removed = self._store.take_evicted()
        if added or removed:
            with self._lock:
                self.counters.chunks_saved += len(added)
            self._directory.publish(added, removed)

    # -- reporting ------------------------------------------------------------------------

    def _report_if_changed(self) -> None:
        with self._lock:
            if self._store is not None:
                self.counters.chunks_served = self._store.counters.served
            if (leader := self._relay.leader) is not None:
                self.counters.chunks_relayed = leader.chunks_relayed
                self.counters.bytes_relayed = leader.bytes_relayed
            if self._host_saver is not None:
                self.counters.save_copy_ms = int(self._host_saver.copy_s * 1000)
                self.counters.save_fence_waits = self._host_saver.fence_waits
                self.counters.save_fence_wait_ms = int(self._host_saver.fence_wait_s * 1000)
                self.counters.save_copy_in_forward_ms = int(
                    self._host_saver.copy_in_forward_s * 1000)
                self.counters.save_prefaulted = self._host_saver.prefaulted
                self.counters.save_prefault_ms = int(self._host_saver.prefault_s * 1000)
            now = asdict(self.counters)
        now.update(self._planner_status)
        if self._leases is not None:
            now.update(asdict(self._leases.counters))
        health = self._transport.health()
        if health is not None:
            now.update(health.counters())  # p2pkv status / doctor show a dead or busy server
            if not health.alive and self._reported.get("server_alive", 1):
                logger.error("p2pkv worker: the data-plane server stopped accepting "
                             "connections: peers can no longer pull from this instance")
        if now != self._reported:
            self._directory.report(now)
            self._reported = now

    def take_stats(self) -> StatsDelta:
        """What the counters gained, and the pull durations seen, since the last call."""
        with self._lock:
            if self._store is not None:
                self.counters.chunks_served = self._store.counters.served
            return self._stats.take(asdict(self.counters))

    def shutdown(self) -> None:
        self.wait_saved(5.0)
        self._directory.unregister()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._parts.shutdown(wait=True, cancel_futures=True)
        if self._layerwise is not None:
            self._layerwise.close()
        self._relay.close()
        if self._host_saver is not None:
            self._host_saver.close()
        if self._saver is not None:
            self._saver.close()
        self._transport.close()
        self._directory.close()
        if self._wake_sock is not None:
            self._wake_sock.close()
