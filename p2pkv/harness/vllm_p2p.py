"""vLLM's own peer-to-peer KV tier as an optional comparison (``p2pkv bench ttft`` config
``vllm-p2p``).

How vLLM 0.32 configures it (from its source):

- ``kv_connector: OffloadingConnector`` with ``kv_connector_extra_config``
  ``{"spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": N, "secondary_tiers":
  [{"type": "p2p", "host": H, "port": P}]}``: a CPU primary tier
  (``vllm/v1/kv_offload/tiering/spec.py``) and the ``p2p`` secondary tier
  (``vllm/v1/kv_offload/tiering/p2p/manager.py``, ``P2PSecondaryTierManager.__init__``: ZMQ
  control socket bound at ``host:port``, data over NIXL, ``backends`` default ``["UCX"]``).
- The router names the source peer per request in ``kv_transfer_params``:
  ``{"remote_kv_source": {"kv_request_id": ID, "remote_host": H, "remote_port": P}}``
  (``manager.py``: ``_remote_kv_source_params``, ``_parse_source``); the puller then probes that
  peer for each block (``LookupMsg``) and fetches the ones it holds into its CPU tier, from
  where they are loaded into the paged cache. (llm-d's router fills these in from its KV-event
  index; here the bench does, knowing which instance computed the prefix.)

On vLLM's CPU backend it cannot start: the OffloadingConnector's worker refuses non-GPU
platforms (``CPUOffloadingSpec.get_worker`` in ``vllm/v1/kv_offload/cpu/spec.py``, which the
tiering spec inherits), and NIXL's Python package is not in the CPU stack.
:func:`start_failure` turns the instance's log into the row's reason: the exception and the
vLLM source line that raised it.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from p2pkv.errors import P2PKVError

CPU_TIER_BYTES = 1 << 30


class NotRunnable(P2PKVError):
    """The configuration cannot run here; the message says why (vLLM's own error)."""


@dataclass(frozen=True, slots=True)
class TierAddress:
    host: str
    port: int


def kv_transfer_config(tier: TierAddress, cpu_bytes: int = CPU_TIER_BYTES,
                       engine_id: str = "") -> str:
    config: dict[str, object] = {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "spec_name": "TieringOffloadingSpec",
            "cpu_bytes_to_use": cpu_bytes,
            "secondary_tiers": [{"type": "p2p", "host": tier.host, "port": tier.port}],
        },
    }
    if engine_id:
        config["engine_id"] = engine_id
    return json.dumps(config)


def source_params(source: TierAddress, kv_request_id: str) -> dict[str, object]:
    """The ``kv_transfer_params`` that name ``source`` as the peer to pull from."""
    return {"remote_kv_source": {"kv_request_id": kv_request_id,
                                 "remote_host": source.host, "remote_port": source.port}}


def nixl_installed() -> bool:
    return importlib.util.find_spec("nixl") is not None


_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception)|Exception): (.+)$")
_FRAME = re.compile(r'File "([^"]*/vllm/[^"]+)", line (\d+), in (\w+)')
# vLLM's log prefix: "(Worker pid=7) ERROR 12-02 02:25:06 [multiproc_executor.py:1063] "
_PREFIX = re.compile(r"^\(\w+ pid=\d+\)\s*(?:[A-Z]+ \S+ \S+ \[[^\]]+\]\s?)?")


def start_failure(log: Path) -> str:
    """Why an instance died at start-up, from its log: the root cause (the first exception
    raised; the wrappers vLLM's processes re-raise come after it) and the innermost vLLM frame
    of its traceback (``vllm/...py:LINE in FUNC``)."""
    lines = [_PREFIX.sub("", line.rstrip()) for line in
             log.read_text(errors="replace").splitlines()]
    for i, text in enumerate(lines):
        m = _EXCEPTION.match(text.strip())
        if not m:
            continue
        where = ""
        for j in range(i - 1, max(-1, i - 60), -1):
            f = _FRAME.search(lines[j])
            if f:
                path = f.group(1)[f.group(1).rindex("/vllm/") + 1:]
                where = f" (raised at {path}:{f.group(2)} in {f.group(3)})"
                break
        return f"{text.strip()}{where}"
    tail = " | ".join(lines[-3:])
    return f"no exception in the log; last lines: {tail}"
