"""Scheduler side of the connector (runs in vLLM's EngineCore process).

Per request it (1) asks the directory which peers hold the chunks beyond vLLM's local prefix
hit, without stalling the engine: a lookup that has not answered within
``lookup_inline_wait_s`` makes vLLM ask again next step, and one that has not answered within
``lookup_timeout_s`` counts as a miss; (2) plans the pull into the blocks vLLM allocated;
(3) plans, every step, the saving of chunks that became complete. A prefill instance
(``save_partial``, the ``kv_producer`` role) also saves each prompt's last, shorter chunk once
the prompt is computed, and a decode instance (``load_partial``, ``kv_consumer``) looks that
partial chunk up after the full ones, so it recomputes at most the prompt's last token (keys:
``keys.py``). ``kv_both`` instances neither save nor look up partial chunks: only producers
hold them.

NOTE (issue 17): a request whose local hit leaves nothing worth loading (no chunk beyond it, or
one block or less to gain) never contacts the directory and is answered at once, so it never
waits an engine step; the chunks of a local hit are not planned for saving again (whoever
computed or pulled them saved them).

NOTE (issue 15, ``save_pulled``): the chunks an asynchronous load pulled are planned for saving
like computed ones, in the first step that schedules the request after the load: vLLM has by
then cut ``num_computed_tokens`` back to the first block the load failed to fill
(``_handle_invalid_blocks``; to 0 for a whole-request failure), so only chunks that landed
whole count as computed, and the failed rest is recomputed (and saved as computed).

It knows vLLM only through duck-typed ``request`` / ``scheduler_output`` fields and is driven
by :class:`p2pkv.vllm.connector.P2PKVConnector`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from p2pkv.directory.client import PENDING, DirectoryClient
from p2pkv.keys import ChunkKey, Namespace, chunk_keys, partial_chunk_key, prompt_keys
from p2pkv.slices import KVSlice
from p2pkv.vllm.config import ConnectorConfig
from p2pkv.vllm.groups import NULL_BLOCK
from p2pkv.vllm.leasebook import LeaseBook
from p2pkv.vllm.metadata import (
    ChunkLoad,
    LeaseGrant,
    LoadPlan,
    P2PKVMetadata,
    P2PKVWorkerMeta,
    SavePlan,
)
from p2pkv.vllm.planning import ConnectorPlanner
from p2pkv.vllm.sources import Source, plan_sources
from p2pkv.vllm.stats import DeltaTracker, StatsDelta

logger = logging.getLogger(__name__)


DIRECTORY_FAILURES_BEFORE_BACKOFF = 3
"""Lookups that must fail in a row before the scheduler stops asking for a while."""

LAYERWISE_SAVE_HOLD_STEPS = 2
"""Steps (the load step and the next) whose newly computed chunks a layer-wise loaded request
does not save: they were computed from pulled bytes whose failure vLLM learns only from the
step's output, which with async scheduling arrives after the next step was planned."""


@dataclass(slots=True)
class _Lookup:
    rid: int
    first_chunk: int  # index of keys[0] among the request's chunks
    keys: list[ChunkKey]
    full_chunks: int  # the request's full chunks; a key at this index is the partial chunk
    prompt_tokens: int
    started: float  # clock() when it was sent


@dataclass(slots=True)
class _PlannedLoad:
    sources: tuple[tuple[Source, ...], ...]  # per worker rank
    first_chunk: int
    keys: list[ChunkKey]
    num_local_tokens: int
    end_tokens: int  # tokens present once the load is done
    layerwise: bool = False  # vLLM's synchronous load, pulled layer group by layer group
    peer: str = ""  # the holder engine


@dataclass(slots=True)
class SchedulerCounters:
    lookups: int = 0
    lookup_timeouts: int = 0
    remote_hit_tokens: int = 0
    loads_planned: int = 0
    chunks_planned_for_save: int = 0
    pulls_skipped: int = 0  # remote hits the planner expected recomputing to beat
    leases_granted: int = 0  # leases sent to the workers (ttl > 0)
    leases_refused: int = 0  # finished requests past the lease caps: straight to the store
    leases_ended_early: int = 0  # ended for memory pressure


NORMAL_FINISH = ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED")
"""vLLM's ``RequestStatus`` names of a request that finished normally: only these are leased
(an aborted or errored request's blocks are freed at once, as NIXL does)."""


def new_blocks(scheduler_output: Any) -> frozenset[int]:
    """The blocks handed to requests in this step (new requests' blocks, running and resumed
    requests' new blocks, blocks to zero): the ones this step may write, maybe freed blocks
    that a save is still copying out of."""
    out: set[int] = set(getattr(scheduler_output, "new_block_ids_to_zero", None) or ())
    for r in scheduler_output.scheduled_new_reqs:
        for group in r.block_ids:
            out.update(group)
    for groups in getattr(scheduler_output.scheduled_cached_reqs, "new_block_ids", ()):
        for group in groups or ():
            out.update(group)
    for copy in getattr(scheduler_output, "kv_cache_block_copies", None) or ():
        out.add(copy.dst_block_id)
    out.discard(NULL_BLOCK)  # sliding-window groups list it; no step writes it
    return frozenset(out)


class SchedulerSide:
    def __init__(self, config: ConnectorConfig, *, namespace: Namespace, block_size: int,
                 chunk_blocks: int, can_load: bool, can_save: bool,
                 directory: DirectoryClient, clock: Callable[[], float] = time.monotonic,
                 save_partial: bool = False, load_partial: bool = False,
                 slices: tuple[KVSlice, ...] = (KVSlice.whole(1, 1),),
                 exact_slices_only: bool = False, groups: tuple[int, ...] = (0,),
                 hit_below_prompt: bool = False, layerwise: bool = False,
                 planner: ConnectorPlanner | None = None,
                 free_blocks: Callable[[], tuple[int, int]] | None = None) -> None:
        """``slices``: what each of this instance's worker ranks holds (by TP rank; the
        default is one rank holding everything). ``exact_slices_only``: pull only from
        holder ranks with the same slices (layouts where a head range is not contiguous).
        ``groups``: vLLM's KV-cache group indices in slot order (``p2pkv.vllm.groups``); block
        ids come per vLLM group and go into plans flattened in this order.
        ``hit_below_prompt``: a load must end before the prompt's last token (sliding
        windows: vLLM recomputes that token, whose window reaches one token further back than
        the blocks it keeps for the hit).
        ``layerwise``: load remote hits layer-wise within the step that computes the rest
        (``p2pkv.vllm.layerwise``) where the load ends on a block boundary before the
        request's last token, else asynchronously (one KV-cache group only).
        ``planner``: decides each remote hit's pull against recomputing it (None: always
        pull), learning from this side's steps and the workers' pulls.
        ``free_blocks``: vLLM's (free, total) KV blocks; with it and ``config.lease_s`` > 0 on
        an instance that saves, finished requests' chunks are leased (``request_finished``)
        instead of saved as they complete."""
        self._planner = planner
        self._planner_status_at = -1e300
        self._planner_status: dict[str, int] = {}
        self._gauges: dict[str, float] = {}
        self._book: LeaseBook | None = None
        if config.lease_s > 0 and can_save and free_blocks is not None:
            self._book = LeaseBook(config.lease_s, max_fraction=config.lease_max_fraction,
                                   min_free_fraction=config.lease_min_free_fraction,
                                   clock=clock)
        self._free_blocks = free_blocks
        self._pending_grants: list[LeaseGrant] = []
        self._layerwise = layerwise and len(groups) == 1
        self._hold_saves: dict[str, int] = {}  # req_id -> build_meta calls left to skip
        self._config = config
        self._slices = slices
        self._exact_slices_only = exact_slices_only
        self._groups = groups
        self._hit_below_prompt = hit_below_prompt
        self._namespace = namespace
        self._block_size = block_size
        self._chunk_blocks = chunk_blocks
        self._chunk_tokens = block_size * chunk_blocks
        self._can_load = can_load
        self._can_save = can_save
        self._save_partial = save_partial and can_save
        # NOTE: a sliding-window group's pulled blocks cover only the window of the load's end,
        # so a chunk saved from them would lack bytes a shorter pull of it needs.
        self._save_pulled = config.save_pulled and can_save and not hit_below_prompt
        self._load_partial = load_partial and can_load
        self._partial_saved: set[str] = set()
        self._directory = directory
        self._clock = clock
        self._requests: dict[str, Any] = {}  # req_id -> vLLM Request (for block_hashes)
        self._lookups: dict[str, _Lookup] = {}
        self._planned: dict[str, _PlannedLoad] = {}
        self._saved_chunks: dict[str, int] = {}  # req_id -> chunks already planned for saving
        # NOTE: a request gets one pull at most. vLLM asks again after a failed load (and after
        # preemption); pulling again from a peer that just failed would loop.
        self._loaded: set[str] = set()
        self._pending_loads: list[LoadPlan] = []
        self._directory_down_until = 0.0
        self._failures_in_a_row = 0
        self.counters = SchedulerCounters()
        self._stats = DeltaTracker()

    # -- lookup ---------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        req_id = request.request_id
        self._requests[req_id] = request
        # Chunks of the local hit were saved by whoever computed them: never copied again.
        local_chunks = num_computed_tokens // self._chunk_tokens
        if local_chunks > self._saved_chunks.get(req_id, 0):
            self._saved_chunks[req_id] = local_chunks
        if not self._can_load or req_id in self._loaded:
            return 0, False
        lookup = self._lookups.get(req_id)
        if lookup is None:
            lookup = self._start_lookup(request, num_computed_tokens)
            if lookup is None:
                return 0, False
            reply = self._directory.wait_lookup(lookup.rid, self._config.lookup_inline_wait_s)
        else:
            reply = self._directory.poll_lookup(lookup.rid)
        if reply is PENDING:
            self._lookups[req_id] = lookup
            return None, False
        self._lookups.pop(req_id, None)
        self._stats.observe("lookup_seconds", self._clock() - lookup.started)
        if reply is None:
            self.counters.lookup_timeouts += 1
            self._failures_in_a_row += 1
            # NOTE: one slow reply on a loaded host is not a dead directory (seen in CI: one
            # 250 ms timeout, then 5 s without lookups cost a remote hit); back off only after
            # DIRECTORY_FAILURES_BEFORE_BACKOFF timeouts in a row.
            if self._failures_in_a_row >= DIRECTORY_FAILURES_BEFORE_BACKOFF:
                self._directory_down_until = self._clock() + self._config.directory_backoff_s
                logger.warning("p2pkv: %d directory lookups in a row failed or timed out; "
                               "skipping lookups for %.1f s", self._failures_in_a_row,
                               self._config.directory_backoff_s)
            else:
                logger.info("p2pkv: a directory lookup timed out; treating it as a miss")
            return 0, False
        self._failures_in_a_row = 0
        if not reply.holders:
            return 0, False
        best = plan_sources(reply.holders, self._slices, exact_only=self._exact_slices_only)
        if best is None:
            logger.debug("p2pkv: %s: no engine holds every slice this instance needs "
                         "(holders: %s)", req_id, reply.holders)
            return 0, False
        run = best.run
        if self._hit_below_prompt:
            # NOTE: vLLM recomputes the last token of a whole-prompt hit
            # (scheduler.py, _update_waiting_for_remote_kv), but a sliding-window group keeps
            # only the blocks the window of the hit's *end* needs (SlidingWindowManager.
            # get_num_skipped_tokens), one token short for that recompute; the offloading
            # connector stops one token short too (offloading/scheduler.py,
            # _lookup_complete_chunks).
            run = min(run, (lookup.prompt_tokens - 1) // self._chunk_tokens - lookup.first_chunk)
            if run <= 0:
                return 0, False
        covered = lookup.first_chunk + run
        end_tokens = (lookup.prompt_tokens if covered > lookup.full_chunks
                      else covered * self._chunk_tokens)
        external = end_tokens - num_computed_tokens
        if external <= 0:
            return 0, False
        if self._planner is not None:
            plan = self._planner.decide(best.engine, lookup.prompt_tokens, num_computed_tokens,
                                        external)
            if not plan.pull:
                self.counters.pulls_skipped += 1
                logger.info("p2pkv: %s: not pulling %d tokens from %s: expected %.1f ms, "
                            "recomputing them %.1f ms", req_id, external, best.engine,
                            plan.pull_s * 1e3, plan.recompute_s * 1e3)
                return 0, False
        # NOTE: a synchronous load must leave vLLM at least one token to compute (it asserts
        # on it), and vLLM writes that step's new tokens into the cache before each layer
        # waits for its load (``unified_kv_cache_update``): a load ending inside a block the
        # step writes would race that write. Such loads (the whole prompt is held) stay
        # asynchronous: vLLM recomputes the last token after they have landed.
        layerwise = (self._layerwise and end_tokens % self._block_size == 0
                     and end_tokens < request.num_tokens)
        self._planned[req_id] = _PlannedLoad(best.per_rank, lookup.first_chunk,
                                             lookup.keys[:run], num_computed_tokens,
                                             end_tokens, layerwise, best.engine)
        self.counters.remote_hit_tokens += external
        logger.debug("p2pkv: %s remote hit of %d tokens at %s (%s)%s", req_id, external,
                     best.engine, ", ".join(best.addresses), ", layer-wise" if layerwise else "")
        return external, not layerwise

    def _start_lookup(self, request: Any, num_computed_tokens: int) -> _Lookup | None:
        if self._clock() < self._directory_down_until:
            return None
        prompt = request.prompt_token_ids
        if prompt is None:  # prompt embeddings: full chunks only, named by block hashes
            keys = chunk_keys(request.block_hashes, self._chunk_blocks)
            prompt_tokens = len(keys) * self._chunk_tokens
        else:
            keys = prompt_keys(request.block_hashes, prompt, self._block_size,
                               self._chunk_blocks, with_partial=self._load_partial)
            prompt_tokens = len(prompt)
        first = num_computed_tokens // self._chunk_tokens
        reachable = min(prompt_tokens, len(keys) * self._chunk_tokens)
        # NOTE: vLLM computes a prompt's last token itself, so a local hit ends at most one
        # block short of the prompt; a load that gains one block or less is not worth a
        # directory round trip (and maybe an engine step) plus a whole chunk's pull.
        if first >= len(keys) or reachable - num_computed_tokens <= self._block_size:
            return None
        self.counters.lookups += 1
        wanted = keys[first:]
        timeout = (self._config.consumer_lookup_timeout_s if self._load_partial
                   else self._config.lookup_timeout_s)
        rid = self._directory.start_lookup(self._namespace, wanted, timeout)
        return _Lookup(rid, first, wanted, prompt_tokens // self._chunk_tokens, prompt_tokens,
                       self._clock())

    # -- allocation -> load plan ----------------------------------------------------------

    def update_state_after_alloc(self, request: Any,
                                 block_ids: Sequence[Sequence[int | None]],
                                 num_external_tokens: int) -> None:
        """``block_ids``: per vLLM KV-cache group, ``None`` for a null block (before a
        sliding window: never written)."""
        planned = self._planned.pop(request.request_id, None)
        if planned is None or num_external_tokens <= 0:
            return
        local_blocks = planned.num_local_tokens // self._block_size
        end_blocks = -(-planned.end_tokens // self._block_size)
        per_group = [block_ids[g] for g in self._groups]
        chunks = []
        for i, key in enumerate(planned.keys):
            start = (planned.first_chunk + i) * self._chunk_blocks
            # NOTE: a partial chunk's blocks past the prompt are None: the holder stored its
            # chunk padded to full size, and those bytes are received and dropped.
            ids = tuple(ids_g[b] if local_blocks <= b < min(end_blocks, len(ids_g)) else None
                        for ids_g in per_group
                        for b in range(start, start + self._chunk_blocks))
            chunks.append(ChunkLoad(key, ids))
        self._pending_loads.append(LoadPlan(request.request_id, tuple(chunks), planned.sources,
                                            layerwise=planned.layerwise, peer=planned.peer))
        if planned.layerwise:
            self._hold_saves[request.request_id] = LAYERWISE_SAVE_HOLD_STEPS
        self._loaded.add(request.request_id)
        self.counters.loads_planned += 1
        if self._save_pulled and not planned.layerwise:
            # Saved once landed (build_meta, from the request's num_computed_tokens), off the
            # critical path on the save thread (issue 17; a synchronous copy cost the pulling
            # request 0.2-0.4 s for 27 chunks on this CPU).
            return
        # Without save_pulled (or for a layer-wise load) the holder keeps serving them.
        end = planned.first_chunk + len(planned.keys)
        self._saved_chunks[request.request_id] = max(
            self._saved_chunks.get(request.request_id, 0), end)

    # -- per step -------------------------------------------------------------------------

    def build_meta(self, scheduler_output: Any,
                   block_ids_of: Callable[[str], Sequence[Sequence[int]]]) -> P2PKVMetadata:
        """``block_ids_of(req_id)``: the request's block ids per vLLM KV-cache group."""
        meta = P2PKVMetadata(loads=self._pending_loads)
        self._pending_loads = []
        if self._planner is not None:
            self._planner.step_scheduled(self._step_work(scheduler_output))
            meta.planner_status = self._status_if_changed()
        if self._can_save:
            meta.new_blocks = new_blocks(scheduler_output)
            progress = [(r.req_id, r.num_computed_tokens)
                        for r in scheduler_output.scheduled_new_reqs]
            cached = scheduler_output.scheduled_cached_reqs
            progress += list(zip(cached.req_ids, cached.num_computed_tokens))
            for req_id, computed in progress:
                done = computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
                if req_id in self._hold_saves:
                    self._skip_saves(req_id, done)
                    continue
                if self._book is not None:
                    continue  # leased when it finishes (request_finished)
                meta.saves.extend(self._newly_complete(req_id, done, block_ids_of))
                if self._save_partial:
                    meta.saves.extend(self._partial_if_complete(req_id, done, block_ids_of))
        if self._book is not None:
            meta.grants, self._pending_grants = self._pending_grants, []
            assert self._free_blocks is not None
            ended = self._book.pressure(*self._free_blocks())
            if ended:
                logger.info("p2pkv: vLLM is short of free KV blocks: ending %d leases early",
                            len(ended))
                self.counters.leases_ended_early += len(ended)
            meta.end_leases = ended
        for req_id in list(self._hold_saves):
            self._hold_saves[req_id] -= 1
            if self._hold_saves[req_id] <= 0:
                del self._hold_saves[req_id]
        return meta

    def _step_work(self, scheduler_output: Any) -> list[tuple[int, int, int]]:
        """Per scheduled request: (prompt tokens, tokens computed before, tokens this step)."""
        scheduled = scheduler_output.num_scheduled_tokens
        out = []
        for r in scheduler_output.scheduled_new_reqs:
            prompt = r.prompt_token_ids
            request = self._requests.get(r.req_id)
            tokens = (len(prompt) if prompt is not None
                      else getattr(request, "num_prompt_tokens", 0) or 0)
            out.append((tokens, r.num_computed_tokens, scheduled.get(r.req_id, 0)))
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens):
            request = self._requests.get(req_id)
            prompt = getattr(request, "prompt_token_ids", None)
            tokens = len(prompt) if prompt is not None else 0
            out.append((tokens, computed, scheduled.get(req_id, 0)))
        return out

    def _status_if_changed(self) -> dict[str, int] | None:
        assert self._planner is not None
        now = self._clock()
        if now - self._planner_status_at < 1.0:
            return None
        self._planner_status_at = now
        status = self._planner.status_counters()
        if status == self._planner_status:
            return None
        self._planner_status = status
        return status

    def update_connector_output(self, worker_meta: Any) -> None:
        """A step's output came back (``worker_meta``: the ranks' ``P2PKVWorkerMeta``)."""
        if self._planner is None:
            return
        self._planner.step_done()
        if isinstance(worker_meta, P2PKVWorkerMeta) and worker_meta.pulls:
            self._planner.observe_pulls(worker_meta.pulls)

    def _skip_saves(self, req_id: str, computed_tokens: int) -> None:
        """A layer-wise loaded request's chunks completed while its load may yet fail are
        never saved (see LAYERWISE_SAVE_HOLD_STEPS)."""
        request = self._requests.get(req_id)
        if request is None:
            return
        full = min(computed_tokens // self._chunk_tokens,
                   len(request.block_hashes) // self._chunk_blocks)
        self._saved_chunks[req_id] = max(self._saved_chunks.get(req_id, 0), full)

    def _partial_if_complete(self, req_id: str, computed_tokens: int,
                             block_ids_of: Callable[[str], Sequence[Sequence[int]]]
                             ) -> list[SavePlan]:
        """The prompt's partial chunk, once the whole prompt is computed (prefill role)."""
        request = self._requests.get(req_id)
        if request is None or req_id in self._partial_saved:
            return []
        prompt = request.prompt_token_ids
        if prompt is None or computed_tokens < len(prompt):
            return []
        self._partial_saved.add(req_id)
        return self._partial_plan(request, block_ids_of(req_id))

    def _partial_plan(self, request: Any, groups: Sequence[Sequence[int]]) -> list[SavePlan]:
        prompt = request.prompt_token_ids
        key = partial_chunk_key(request.block_hashes, prompt, self._block_size,
                                self._chunk_blocks)
        if key is None:
            return []
        first = len(prompt) // self._chunk_tokens * self._chunk_blocks
        end = -(-len(prompt) // self._block_size)
        flat: list[int] = []
        for g in self._groups:
            ids = list(groups[g][first:end])
            if len(ids) != end - first:
                return []
            # Padded to a whole chunk with its last block, so every stored chunk has one size.
            flat += ids + [ids[-1]] * (self._chunk_blocks - len(ids))
        if not flat:
            return []
        self.counters.chunks_planned_for_save += 1
        return [SavePlan(key, tuple(flat))]

    def _newly_complete(self, req_id: str, computed_tokens: int,
                        block_ids_of: Callable[[str], Sequence[Sequence[int]]]
                        ) -> list[SavePlan]:
        request = self._requests.get(req_id)
        if request is None:
            return []
        hashes = request.block_hashes
        full = min(computed_tokens // self._chunk_tokens, len(hashes) // self._chunk_blocks)
        start = self._saved_chunks.get(req_id, 0)
        if full <= start:
            return []
        groups = block_ids_of(req_id)
        per_group = [groups[g] for g in self._groups]
        cb = self._chunk_blocks
        full = min([full] + [len(ids) // cb for ids in per_group])
        if full <= start:
            return []
        # NOTE: a sliding-window group's blocks that left the window by now are the null
        # block (id 0): its bytes are saved and never read, since a puller's window never
        # reaches back further than the holder's did when it computed the chunk.
        plans = [SavePlan(ChunkKey(bytes(hashes[(c + 1) * cb - 1])),
                          tuple(b for ids in per_group for b in ids[c * cb:(c + 1) * cb]))
                 for c in range(start, full)]
        self._saved_chunks[req_id] = full
        self.counters.chunks_planned_for_save += len(plans)
        return plans

    def take_stats(self) -> StatsDelta:
        """What the counters gained, and the lookup latencies seen, since the last call
        (with the planner's gauges)."""
        delta = self._stats.take(asdict(self.counters))
        if self._planner is not None:
            gauges = self._planner.gauges()
            if gauges != self._gauges:  # changes only with a new measurement
                self._gauges = delta.gauges = gauges
        return delta

    def request_finished(self, req_id: str, *, status: str = "",
                         block_ids: Sequence[Sequence[int]] = ()) -> bool:
        """vLLM is done with ``req_id`` (``status``: its ``RequestStatus`` name; ``block_ids``:
        its blocks per KV-cache group). True: hold its blocks (``delay_free``) for a lease,
        sent to the workers in the next step's metadata; they are freed when every rank
        reports the request in ``finished_sending``."""
        grant = self._lease(req_id, status, block_ids) if self._book is not None else None
        self._forget(req_id)
        if grant is None:
            return False
        self._pending_grants.append(grant)
        return True

    def _lease(self, req_id: str, status: str, block_ids: Sequence[Sequence[int]]
               ) -> LeaseGrant | None:
        """A lease on the chunks ``req_id`` computed itself (not its local hit or pulled
        chunks: whoever computed those holds them), if it finished normally and has any."""
        assert self._book is not None and self._free_blocks is not None
        request = self._requests.get(req_id)
        if request is None or status not in NORMAL_FINISH or not block_ids:
            logger.debug("p2pkv: %s finished (%s): no lease", req_id, status)
            return None
        cb = self._chunk_blocks
        per_group = [block_ids[g] for g in self._groups]
        full = min([request.num_computed_tokens // self._chunk_tokens,
                    len(request.block_hashes) // cb] + [len(ids) // cb for ids in per_group])
        hashes = request.block_hashes
        chunks = [SavePlan(ChunkKey(bytes(hashes[(c + 1) * cb - 1])),
                           tuple(b for ids in per_group for b in ids[c * cb:(c + 1) * cb]))
                  for c in range(self._saved_chunks.get(req_id, 0), full)]
        self.counters.chunks_planned_for_save += len(chunks)  # the partial one counts itself
        prompt = request.prompt_token_ids
        if (self._save_partial and prompt is not None
                and request.num_computed_tokens >= len(prompt)):
            chunks += self._partial_plan(request, block_ids)
        if not chunks:
            return None
        blocks = len({b for c in chunks for b in c.block_ids})
        ttl = self._book.ttl(req_id, blocks, *self._free_blocks())
        if ttl > 0:
            self.counters.leases_granted += 1
        else:
            self.counters.leases_refused += 1
        logger.info("p2pkv: %s finished (%s): lease of %d chunks (%d blocks) for %.1f s",
                    req_id, status, len(chunks), blocks, ttl)
        return LeaseGrant(req_id, tuple(chunks), ttl, self._config.lease_pulls)

    def leases_done(self, req_ids: Sequence[str] | set[str]) -> None:
        """vLLM freed these requests' blocks (``finished_sending`` from every rank)."""
        if self._book is not None:
            self._book.done(req_ids)

    def leases_out(self) -> bool:
        """Whether vLLM still holds blocks for a lease (granted, not yet handed back)."""
        return self._book is not None and len(self._book) > 0

    def next_lease_end(self) -> float | None:
        """When the first open lease runs out (this side's clock; None: none is open)."""
        return self._book.next_end() if self._book is not None else None

    def _forget(self, req_id: str) -> None:
        self._requests.pop(req_id, None)
        self._lookups.pop(req_id, None)
        self._planned.pop(req_id, None)
        self._saved_chunks.pop(req_id, None)
        self._loaded.discard(req_id)
        self._partial_saved.discard(req_id)
        self._hold_saves.pop(req_id, None)
