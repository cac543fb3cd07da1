"""Connector configuration: ``kv_connector_extra_config`` decoded once, at the edge, into a
frozen dataclass. Every field but ``directory`` has a default that works on a laptop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

from p2pkv.directory.shards import ShardSpec, parse_directory
from p2pkv.errors import ConfigError
from p2pkv.transport.choose import TRANSPORT_KINDS
from p2pkv.transport.conn import CHUNK_DIGESTS, ChunkDigest

LOAD_MODES = ("async", "layerwise")


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    directory: str
    """Directory endpoint, e.g. ``tcp://10.0.0.5:7420``; or a sharded directory: a list (or a
    comma-separated string) of shards, each ``PRIMARY[|REPLICA]``, in the same order on every
    instance and the router (``directory/shards.py``: ``parse_directory``)."""
    transport: str = "auto"
    bind_host: str = "127.0.0.1"
    """Where this instance's data-plane server listens (use the host's cluster address)."""
    advertise_host: str = ""
    """Address peers use to reach the data plane; defaults to ``bind_host``."""
    chunk_tokens: int = 128
    """Tokens per chunk, rounded down to whole blocks (at least one block)."""
    store_gib: float = 2.0
    """Host memory for saved chunks (the slab is touched lazily)."""
    lookup_timeout_s: float = 0.25
    """Longest a request waits for the directory before it is treated as a miss."""
    consumer_lookup_timeout_s: float = 1.0
    """``lookup_timeout_s`` of a decode (``kv_consumer``) instance: its prompts were prefilled
    elsewhere just before, so a miss recomputes the whole prompt; a loaded host's directory may
    answer later than 250 ms (seen in CI), and waiting longer costs less than the recompute."""
    lookup_inline_wait_s: float = 0.002
    """How long a lookup may block the scheduler before it answers "ask again next step"."""
    directory_backoff_s: float = 5.0
    """After a lookup times out, skip lookups for this long (a dead directory costs nothing)."""
    pull_timeout_s: float = 5.0
    """Deadline for one pull from one peer; on expiry the chunks are recomputed."""
    pull_threads: int = 4
    model_id: str = ""
    """Overrides the model identity in the namespace (default: the model name vLLM was given)."""
    secret_file: str = ""
    """File holding the cluster secret; without one (and without ``credential_file``),
    directory and data plane are unauthenticated and must stay on loopback or a private
    network. With it the instance derives its own credential (``p2pkv.credential``)."""
    credential_file: str = ""
    """This instance's credential file (``p2pkv.credential``, written by the launcher for
    the ``engine_id`` it names), instead of ``secret_file``: the instance then cannot act as
    any other instance at the directory."""
    insecure_any_address: bool = False
    """Serve the data plane on a non-loopback ``bind_host`` without a secret (refused
    otherwise): only on a trusted private network."""
    chunk_digest: str = "auto"
    """How chunk bytes pulled over TCP are checked (``transport.conn.ChunkDigest``): ``auto``
    keys them (a tag under the connection's session key) when the holder is on another
    host, ``keyed`` always, ``xxh3`` never (a trusted network: the holder's stored digest
    only catches corruption), ``sealed`` every TCP pull's bytes encrypted (AES-256-GCM: a
    network not trusted with the contents). Without ``secret_file`` or ``credential_file``
    there is no key: always xxh3."""
    log_level: str = ""
    """p2pkv's log level inside vLLM (e.g. DEBUG); default: the same as vLLM's."""
    load_mode: str = "async"
    """How a remote hit is loaded (CPU caches; GPU instances always use ``async``):
    ``async`` parks the request in vLLM's WAITING_FOR_REMOTE_KVS until every chunk has
    landed; ``layerwise`` loads within the step that computes the rest of the prompt, layer
    group by layer group, each attention layer waiting only for its own group
    (``p2pkv.vllm.layerwise``)."""
    layer_groups: int = 4
    """``layerwise``: how many groups of consecutive layers a load is split into."""
    save_pulled: bool = True
    """A ``kv_both`` instance also saves the chunks it pulled, once they have landed in its
    blocks, and publishes them (it becomes a holder too), through the same save thread as the
    chunks it computed. Measured in the trace simulation (docs/benchmarks.md): 99.4 % of a
    global pool's prefill savings instead of 86 %. Never on ``kv_consumer`` (a decode
    instance only loads) nor ``kv_producer`` (it never pulls); not for layer-wise loads nor
    models with sliding windows (their pulled chunks are not whole in the puller's blocks)."""
    planner: bool = True
    """Skip a remote hit's pull when recomputing it is expected to be faster, from this
    instance's measured prefill speed and the peer's measured pulls (``p2pkv.vllm.planning``;
    it skips only on measurements of both, so a fresh instance pulls as without it)."""
    planner_profile: str = ""
    """The planner's priors: a name in ``p2pkv.planner.profiles.PROFILES``, or "" for priors
    under which every pull wins until measured (``planning.optimistic_profile``)."""
    planner_link_max_age_s: float = 60.0
    """A peer's measured link is forgotten this long after its last pull (then pulled
    again: a peer skipped as slow is no longer measured)."""
    relay_gib: float = 0.25
    """Where worker ranks hold equal slices (MLA; KV heads replicated over ranks): shared
    memory in which the lowest of them lands its pulls for its siblings on the same host, so
    a chunk crosses the network once per instance (``p2pkv.vllm.relay``); 0: every rank
    pulls for itself. Touched lazily."""
    lease_s: float = 0.0
    """Serve a finished request's chunks straight from vLLM's paged blocks for this long
    (tier 1, CPU caches: ``p2pkv.vllm.leases``); 0: off (chunks are saved into the store as
    they complete). With a lease a request's chunks are published when it finishes, held
    (``delay_free``) while the lease lasts and copied into the store when it ends."""
    lease_pulls: int = 0
    """Pulls (data-plane requests reading a leased chunk) after which a lease ends early;
    0: none (it lasts ``lease_s``). A P/D prefill instance whose decode pulls once: 1."""
    lease_max_fraction: float = 0.25
    """Most of vLLM's KV blocks leases may hold at once; a request past it is not leased (its
    chunks go to the store at once)."""
    lease_min_free_fraction: float = 0.1
    """Memory pressure: when vLLM's free blocks fall below this fraction of all blocks, the
    oldest leases end early (and no new ones are granted)."""

    def __post_init__(self) -> None:
        if not isinstance(self.directory, str):
            raise ConfigError("directory must be a tcp:// or ipc:// endpoint (or shards), not "
                              f"{self.directory!r}")
        parse_directory(self.directory)
        if self.transport not in TRANSPORT_KINDS:
            raise ConfigError(f"transport must be one of {TRANSPORT_KINDS}")
        if self.chunk_digest not in CHUNK_DIGESTS:
            raise ConfigError(f"chunk_digest must be one of {CHUNK_DIGESTS}, not "
                              f"{self.chunk_digest!r}")
        if self.chunk_digest in ("keyed", "sealed") and not (self.secret_file
                                                              or self.credential_file):
            raise ConfigError(f"chunk_digest {self.chunk_digest!r} needs a secret_file or a "
                              "credential_file (the key)")
        if self.load_mode not in LOAD_MODES:
            raise ConfigError(f"load_mode must be one of {LOAD_MODES}, not {self.load_mode!r}")
        for name in ("chunk_tokens", "pull_threads", "layer_groups"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("store_gib", "lookup_timeout_s", "consumer_lookup_timeout_s",
                     "pull_timeout_s", "planner_link_max_age_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.secret_file and self.credential_file:
            raise ConfigError("give secret_file or credential_file, not both")
        if self.planner_profile:
            from p2pkv.planner.profiles import PROFILES

            if self.planner_profile not in PROFILES:
                raise ConfigError(f"planner_profile {self.planner_profile!r} is not one of "
                                  f"{sorted(PROFILES)}")
        if self.log_level and self.log_level.upper() not in logging.getLevelNamesMapping():
            raise ConfigError(f"log_level {self.log_level!r} is not a logging level")
        for name in ("lease_max_fraction", "lease_min_free_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be between 0 and 1")
        for name in ("lookup_inline_wait_s", "directory_backoff_s", "relay_gib", "lease_s",
                     "lease_pulls"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> ConnectorConfig:
        extra = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ConfigError(f"unknown kv_connector_extra_config keys {unknown}; "
                              f"known: {sorted(known)}")
        if "directory" not in extra:
            raise ConfigError('kv_connector_extra_config needs "directory": "tcp://HOST:PORT"')
        values: dict[str, Any] = {}
        for name, value in extra.items():
            default = known[name].default
            if name == "directory" and isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)  # shards
            want = type(default) if name != "directory" else str
            if want is bool and not isinstance(value, bool):  # bool("false") is True
                raise ConfigError(f"{name}={value!r} is not true or false")
            try:
                values[name] = want(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name}={value!r} is not a valid {want.__name__}") from None
        return cls(**values)

    @property
    def shards(self) -> list[ShardSpec]:
        """The directory's processes (one, or shards with replicas)."""
        return parse_directory(self.directory)

    @property
    def digest(self) -> ChunkDigest:
        """``chunk_digest``, typed for ``make_transport`` (checked in ``__post_init__``)."""
        assert self.chunk_digest in CHUNK_DIGESTS
        return self.chunk_digest  # type: ignore[return-value]

    @property
    def store_bytes(self) -> int:
        return int(self.store_gib * (1 << 30))

    @property
    def relay_bytes(self) -> int:
        return int(self.relay_gib * (1 << 30))
