"""``P2PKVConnector``: the vLLM KV connector (V1 API), a thin facade over the two sides.

vLLM builds one instance with role SCHEDULER in the EngineCore process and one with role
WORKER in each worker process. Add to ``vllm serve``::

    --kv-transfer-config '{"kv_connector":"P2PKVConnector","kv_role":"kv_both",
      "kv_load_failure_policy":"recompute",
      "kv_connector_extra_config":{"directory":"tcp://HOST:PORT"}}'

(the name resolves through p2pkv's vLLM plugin, ``p2pkv.vllm.plugin``; the long form with
``"kv_connector_module_path":"p2pkv.vllm.connector"`` works too).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from p2pkv.affinity import widen_cpu_affinity
from p2pkv.credential import InstanceCredential, credential_for, load_credential
from p2pkv.directory.shards import connect as connect_directory
from p2pkv.errors import ConfigError
from p2pkv.keys import InstanceId, NamespaceSpec, probe_of
from p2pkv.secret import load_secret
from p2pkv.slices import KVSlice, is_lowest_replica, tp_slices
from p2pkv.transport.choose import make_transport
from p2pkv.transport.identity import Identity
from p2pkv.vllm.config import ConnectorConfig
from p2pkv.vllm.groups import KVGroup, describe, has_window, kv_groups
from p2pkv.vllm.idlewait import IdleWait
from p2pkv.vllm.layout import KVLayout
from p2pkv.vllm.metadata import P2PKVMetadata, P2PKVWorkerMeta
from p2pkv.vllm.planning import ConnectorPlanner, connector_profile
from p2pkv.vllm.prom import P2PKVPromMetrics, P2PKVStats
from p2pkv.vllm.relay import RelayEndpoint, RelaySetup, has_replicas
from p2pkv.vllm.scheduler import SchedulerSide
from p2pkv.vllm.worker import WorkerSide

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


def namespace_of(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig,
                 config: ConnectorConfig) -> tuple[NamespaceSpec, int]:
    """The namespace and chunk size (in blocks) of this instance (the same for every rank,
    and for instances of the model at any tensor parallelism)."""
    groups = kv_groups(kv_cache_config, str(vllm_config.device_config.device_type))
    spec = kv_cache_config.kv_cache_groups[groups[0].index].kv_cache_spec
    block_size = spec.block_size
    chunk_blocks = max(1, config.chunk_tokens // block_size)
    model = vllm_config.model_config
    ns = NamespaceSpec(
        model=config.model_id or str(model.model),
        revision=str(model.revision or ""),
        kv_dtype=str(spec.dtype),
        device_type=str(vllm_config.device_config.device_type),
        block_size=block_size,
        chunk_blocks=chunk_blocks,
        num_layers=(_num_layers(groups) if vllm_config.parallel_config.pipeline_parallel_size
                    == 1 else _stage_layers(vllm_config)[0]),
        num_kv_heads=_total_kv_heads(vllm_config),
        head_size=int(spec.head_size),
        hash_algorithm=str(vllm_config.cache_config.prefix_caching_hash_algo),
    )
    return ns, chunk_blocks


def uses_layerwise(load_mode: str, device_type: str, groups: tuple[KVGroup, ...]) -> bool:
    """Whether remote hits load layer-wise (``p2pkv.vllm.layerwise``): ``load_mode``
    layerwise on a CPU cache (GPU caches stay async, with a warning). ConfigError at start-up
    for a model with several KV-cache groups (hybrid attention, sliding windows): a layer-wise
    load pulls one group's blocks, and a silent fallback would hide that the mode asked for
    is not the one running."""
    if load_mode != "layerwise":
        return False
    if len(groups) > 1:
        raise ConfigError(
            f"p2pkv: load_mode layerwise supports one KV-cache group; this model has "
            f"{len(groups)} ({describe(groups)}): set load_mode to async (remote hits then "
            f"load before the step, every group)")
    return device_type == "cpu"


def rank_kv_bytes_per_token(kv_cache_config: KVCacheConfig, groups: tuple[KVGroup, ...]) -> int:
    """KV bytes of one token on one worker rank (what a rank pulls per token): each group's
    page per layer and block, over its layers, per block token."""
    total = 0.0
    for g in groups:
        spec = kv_cache_config.kv_cache_groups[g.index].kv_cache_spec
        total += spec.page_size_bytes * len(g.layer_names) / spec.block_size
    return int(total)


def _num_layers(groups: tuple[KVGroup, ...]) -> int:
    return sum(len(g.layer_names) for g in groups)


def _total_kv_heads(vllm_config: VllmConfig) -> int:
    """The model's KV heads over all TP ranks (1 for MLA: its latent KV has no heads)."""
    model = vllm_config.model_config
    return 1 if model.use_mla else int(model.get_total_num_kv_heads())


def _stage_layers(vllm_config: VllmConfig) -> tuple[int, tuple[tuple[int, int], ...]]:
    """The model's layers and each pipeline stage's ``[l0, l1)`` (vLLM's split,
    ``distributed/utils.py``, ``get_pp_indices``, which honours ``VLLM_PP_LAYER_PARTITION``)."""
    from vllm.distributed.utils import get_pp_indices

    pp = vllm_config.parallel_config.pipeline_parallel_size
    total = int(vllm_config.model_config.hf_text_config.num_hidden_layers)
    return total, tuple(get_pp_indices(total, p, pp) for p in range(pp))


def rank_slices(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig
                ) -> tuple[KVSlice, ...]:
    """What each worker rank of this instance holds of a chunk, by rank (pipeline stage
    ``p``, TP rank ``t``: rank ``p * tp + t``, vLLM's order); refuses what p2pkv cannot do
    yet, naming why."""
    parallel = vllm_config.parallel_config
    groups = kv_groups(kv_cache_config, str(vllm_config.device_config.device_type))
    pp = parallel.pipeline_parallel_size
    tp = parallel.tensor_parallel_size
    mla = vllm_config.model_config.use_mla
    if pp == 1:
        num_layers, stages = _num_layers(groups), ((0, _num_layers(groups)),)
    else:
        if len(groups) > 1 or has_window(groups):
            raise ConfigError("p2pkv: pipeline parallelism with several KV cache groups or "
                              "sliding windows is not built (a stage's share of each group)")
        num_layers, stages = _stage_layers(vllm_config)
        # NOTE: with PP the scheduler's KVCacheConfig is stage 0's (v1/core/kv_cache_utils.py,
        # generate_scheduler_kv_cache_config): its layers must be what vLLM's split gives
        # stage 0, or the split is not one attention layer per hidden layer.
        if _num_layers(groups) != stages[0][1] - stages[0][0]:
            raise ConfigError(f"p2pkv: stage 0 has {_num_layers(groups)} KV cache layers, not "
                              f"the {stages[0][1] - stages[0][0]} of its hidden layers "
                              "(layers without KV cache): pipeline parallelism not built")
    slices = tuple(s for layers in stages
                   for s in tp_slices(num_kv_heads=_total_kv_heads(vllm_config),
                                      num_layers=num_layers, tp_size=tp, mla=mla,
                                      layers=layers))
    spec = kv_cache_config.kv_cache_groups[groups[0].index].kv_cache_spec
    per_rank = int(spec.num_kv_heads)
    if any(s.heads != per_rank for s in slices):
        raise ConfigError(f"p2pkv: vLLM gives each rank {per_rank} KV heads, p2pkv expected "
                          f"{slices[0].heads}: unknown head split")
    return slices


def worker_rank(vllm_config: VllmConfig) -> int:
    """This worker's index among the instance's ranks: ``pp_rank * tp + tp_rank``."""
    from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

    parallel = vllm_config.parallel_config
    pp_rank = get_pp_group().rank_in_group if parallel.pipeline_parallel_size > 1 else 0
    return pp_rank * parallel.tensor_parallel_size + get_tensor_model_parallel_rank()


def gather_endpoints(me: RelayEndpoint) -> list[RelayEndpoint]:
    """Every worker rank's relay endpoint (``p2pkv.vllm.relay``): a gather over vLLM's world
    group (its CPU group), called by every rank in ``register_kv_caches``."""
    import torch.distributed as dist
    from vllm.distributed.parallel_state import get_world_group

    group = get_world_group()
    out: list[object] = [None] * group.world_size
    dist.all_gather_object(out, me, group=group.cpu_group)
    return [e for e in out if isinstance(e, RelayEndpoint)]


def probe_hash(vllm_config: VllmConfig) -> str:
    """A fingerprint of this process's NONE_HASH: the seed every vLLM block-hash chain starts
    from. Two instances with different PYTHONHASHSEED (or a random per-process seed, which
    vLLM uses for non-cryptographic algorithms without PYTHONHASHSEED) produce different block
    hashes for the same prompt; the directory refuses an instance whose probe differs from its
    namespace's, instead of letting it sit at a silent 0 % hit rate.

    NOTE: NONE_HASH is set by ``init_none_hash`` in EngineCore; where it is not set yet in this
    process it is computed the same way vLLM does (same algorithm, same seed resolution).
    """
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    none_hash = getattr(kv_cache_utils, "NONE_HASH", None)
    if none_hash is None:
        hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
        none_hash = hash_fn(kv_cache_utils.resolve_none_hash_seed(hash_fn))
    return probe_of(none_hash)


def instance_credential(config: ConnectorConfig, engine: InstanceId
                        ) -> InstanceCredential | None:
    """This engine's credential: from ``credential_file`` (which must name the engine), or
    derived from ``secret_file``; None without either (no authentication)."""
    if config.credential_file:
        credential = load_credential(config.credential_file)
        if credential.instance != engine:
            raise ConfigError(f"the credential file {config.credential_file!r} is instance "
                              f"{credential.instance}'s, but this engine_id is {engine}")
        return credential
    if config.secret_file:
        return credential_for(load_secret(config.secret_file), engine)
    return None


def _log_like_vllm(level: str) -> None:
    """Inside vLLM's processes, send p2pkv's log records to vLLM's handlers (once)."""
    ours, theirs = logging.getLogger("p2pkv"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.propagate = False
    ours.setLevel(level.upper() if level else (theirs.level or logging.INFO))


class P2PKVConnector(KVConnectorBase_V1, SupportsHMA):
    """SupportsHMA: vLLM keeps its hybrid KV-cache allocator on (several KV-cache groups,
    sliding-window groups holding their window only); p2pkv saves and pulls every group
    (``p2pkv.vllm.groups``) and refuses at start-up the groups it cannot."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        self._config = ConnectorConfig.from_extra_config(ktc.kv_connector_extra_config)
        _log_like_vllm(self._config.log_level)
        engine = str(ktc.engine_id)
        slices = rank_slices(vllm_config, kv_cache_config)
        self._groups = kv_groups(kv_cache_config, str(vllm_config.device_config.device_type))
        # NOTE: with several groups a block id is unique only within its group, so vLLM takes
        # no block-level load errors (v1/core/sched/scheduler.py, _handle_invalid_blocks:
        # "Connectors must report failed requests via KVConnectorTransferResults.failed_
        # recving"): a failed load then recomputes the whole request.
        self._per_request_errors = len(self._groups) > 1
        spec, chunk_blocks = namespace_of(vllm_config, kv_cache_config, self._config)
        namespace = spec.fingerprint()
        on_cpu = vllm_config.device_config.device_type == "cpu"
        layerwise = uses_layerwise(self._config.load_mode,
                                   str(vllm_config.device_config.device_type), self._groups)
        rank = 0
        if role != KVConnectorRole.SCHEDULER and len(slices) > 1:
            rank = worker_rank(vllm_config)
        # NOTE: rank 0 registers under the engine id itself (what a router knows an instance
        # by, and what a TP 1 instance always was), the others as "<engine_id>/<rank>".
        self._instance = InstanceId(engine if rank == 0 else f"{engine}/{rank}")
        credential = instance_credential(self._config, InstanceId(engine))
        if credential is None:
            logger.warning("p2pkv: no secret_file or credential_file: directory traffic is "
                           "unauthenticated")
        directory = connect_directory(
            self._config.shards, credential=credential.directory if credential else None,
            thread_init=widen_cpu_affinity)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._idle: IdleWait | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(
                self._config, namespace=namespace,
                block_size=vllm_config.cache_config.block_size, chunk_blocks=chunk_blocks,
                can_load=ktc.kv_role != "kv_producer", can_save=ktc.kv_role != "kv_consumer",
                save_partial=ktc.kv_role == "kv_producer",
                load_partial=ktc.kv_role == "kv_consumer", directory=directory,
                slices=slices, exact_slices_only=not on_cpu,
                groups=tuple(g.index for g in self._groups),
                hit_below_prompt=has_window(self._groups),
                layerwise=layerwise, planner=self._make_planner(kv_cache_config),
                free_blocks=self._free_blocks if on_cpu else None)
            if self._config.lease_s > 0 and on_cpu and ktc.kv_role != "kv_consumer":
                self._idle = IdleWait()
            if self._config.lease_s > 0 and not on_cpu:
                logger.warning("p2pkv: lease_s is built for CPU caches (tier 1 from host "
                               "blocks); on %s chunks are saved as before",
                               vllm_config.device_config.device_type)
            if self._config.load_mode == "layerwise" and not layerwise:
                logger.warning("p2pkv: load_mode layerwise is built for CPU caches; loads on "
                               "%s stay async", vllm_config.device_config.device_type)
            if not on_cpu:
                logger.info("p2pkv: on %s, pulls only from instances at the same tensor "
                            "parallelism (a head range is not one byte range in GPU KV "
                            "layouts; heterogeneous TP runs on CPU only)",
                            vllm_config.device_config.device_type)
        else:
            cuda_device = None
            if vllm_config.device_config.device_type == "cuda":
                import torch

                cuda_device = torch.cuda.current_device()
            transport = make_transport(self._config.transport, bind_host=self._config.bind_host,
                                       advertise_host=self._config.advertise_host or None,
                                       secret=credential.data_plane if credential else None,
                                       store_bytes=self._config.store_bytes,
                                       cuda_device=cuda_device,
                                       insecure_any_address=self._config.insecure_any_address,
                                       namespace=namespace,
                                       chunk_digest=self._config.digest,
                                       identity=Identity.from_curve_secret(
                                           credential.directory.keys.secret)
                                       if credential else None)
            self._worker = WorkerSide(self._config, instance=self._instance,
                                      namespace=namespace, chunk_blocks=chunk_blocks,
                                      transport=transport, directory=directory,
                                      probe=probe_hash(vllm_config), rank=rank,
                                      slice=slices[rank],
                                      saves=is_lowest_replica(slices, rank), engine=engine,
                                      spec=spec.describe(), relay=RelaySetup(
                                          slices, gather_endpoints, self._config.relay_bytes,
                                          bind_host="127.0.0.1")
                                      if has_replicas(slices) else None)
        logger.info("p2pkv connector (%s) for instance %s (%s), namespace %s, directory %s",
                    role.name, self._instance,
                    slices[rank] if self._worker else f"TP {len(slices)}", namespace,
                    self._config.directory)

    def _make_planner(self, kv_cache_config: KVCacheConfig) -> ConnectorPlanner | None:
        if not self._config.planner:
            return None
        profile = connector_profile(self._config.planner_profile,
                                    rank_kv_bytes_per_token(kv_cache_config, self._groups))
        logger.info("p2pkv planner on: priors %s (%d KV bytes per token and rank)",
                    profile.name, profile.kv_bytes_per_token)
        return ConnectorPlanner(profile, link_max_age_s=self._config.planner_link_max_age_s)

    # -- worker side ------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(
            KVLayout.from_kv_caches(kv_caches).with_groups(self._groups))

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # vLLM's first connector call in every execute_model, before the step zeroes or
        # writes any block: saves still copying out of reused blocks must finish first.
        assert self._worker is not None
        assert isinstance(kv_connector_metadata, P2PKVMetadata)
        self._worker.fence(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, P2PKVMetadata)
        self._worker.start_loads(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Layer-wise loads (load_mode "layerwise"): wait for this layer's group only; the
        # others are whole-request and asynchronous (WAITING_FOR_REMOTE_KVS).
        assert self._worker is not None
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return  # saved whole in wait_for_save, after the forward pass

    def wait_for_save(self) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, P2PKVMetadata)
        self._worker.save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        recving = self._worker.take_finished_recving()
        return self._worker.take_finished_sending() or None, recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        # NOTE: finished first: a load's failure is recorded before it is finished, so every
        # request taken here has its failure taken with it (or earlier; vLLM keeps a failure
        # until its request finishes, distributed/kv_transfer/kv_connector/utils.py).
        finished = self._worker.take_finished_recving()
        failed = self._worker.take_failed_requests()
        # NOTE: leased requests whose leases ended with no read left (vLLM frees their blocks)
        sending = self._worker.take_finished_sending()
        return KVConnectorTransferResults(
            finished_sending=sending, finished_recving=finished,
            failed_recving=failed if self._per_request_errors else set())

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        blocks = self._worker.take_failed_blocks()
        return set() if self._per_request_errors else blocks

    def build_connector_worker_meta(self) -> P2PKVWorkerMeta | None:
        return self._worker.take_worker_meta() if self._worker is not None else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._idle is not None:
            self._idle.close()

    # -- metrics (both roles; vLLM merges them into its own /metrics, see p2pkv.vllm.prom) --

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        side = self._worker if self._worker is not None else self._scheduler
        delta = side.take_stats() if side is not None else None
        return None if delta is None or delta.is_empty() else P2PKVStats.of(delta)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KVConnectorStats | None:
        return P2PKVStats(data=data or {})

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict,
                           labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]
                           ) -> KVConnectorPromMetrics | None:
        return P2PKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # -- scheduler side ---------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        assert self._scheduler is not None
        if num_external_tokens > 0:
            # NOTE: a sliding-window group holds the null block before its window
            # (SlidingWindowManager): None, never written
            self._scheduler.update_state_after_alloc(
                request, [[None if b.is_null else b.block_id for b in group]
                          for group in blocks.blocks], num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        manager = self._kv_cache_manager
        assert manager is not None
        meta = self._scheduler.build_meta(scheduler_output, manager.get_block_ids)
        meta.idle_step = scheduler_output.total_num_scheduled_tokens == 0
        idle = self._idle
        if idle is not None and idle.active():
            meta.idle_wait, meta.wake_port = True, idle.port
            # NOTE: only a step that tells the workers nothing waits (a grant, an early end,
            # a finished request must reach them now), and only while a lease holds vLLM
            if (meta.idle_step and self._scheduler.leases_out() and not meta.loads
                    and not meta.saves and not meta.grants and not meta.end_leases
                    and not scheduler_output.finished_req_ids):
                idle.wait(lease_end=self._scheduler.next_lease_end())
        return meta

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(self, request: Request, block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        # SupportsHMA: vLLM calls this one instead of request_finished. Saves never hold a
        # request's blocks (HostSaver's fence covers blocks handed out again); a lease
        # (lease_s) does: delay_free until the workers report it in finished_sending.
        assert self._scheduler is not None
        delay = self._scheduler.request_finished(
            request.request_id, status=request.status.name, block_ids=block_ids)
        return delay, None

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        # NOTE (issue 15): one method for both uses. The merge of the planner and the leases
        # left two definitions; the later (leases only) replaced the planner's, which then
        # never saw a step come back: no prefill speed, no links, no gauges.
        assert self._scheduler is not None
        self._scheduler.update_connector_output(connector_output.kv_connector_worker_meta)
        self._scheduler.leases_done(connector_output.finished_sending or ())

    def _free_blocks(self) -> tuple[int, int]:
        """vLLM's free and total KV blocks (the lease caps and watermark)."""
        manager = self._kv_cache_manager
        if manager is None:
            return 0, 0
        pool = manager.block_pool
        return pool.get_num_free_blocks(), pool.num_gpu_blocks - 1  # less the null block
