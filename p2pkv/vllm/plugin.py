"""The vLLM plugin: registers ``P2PKVConnector`` with vLLM's connector factory.

pyproject.toml names :func:`register` under the entry-point group ``vllm.general_plugins``
(name ``p2pkv``); vLLM calls every plugin of that group in each of its processes (API server,
EngineCore, workers: ``vllm/plugins/__init__.py``) before it resolves the KV connector, so
``--kv-transfer-config '{"kv_connector":"P2PKVConnector",...}'`` works without
``kv_connector_module_path``. The long form (with the module path) keeps working: vLLM tries
the module path before its registry. Where ``VLLM_PLUGINS`` restricts the plugins vLLM loads,
it must name ``p2pkv``.
"""

from __future__ import annotations

CONNECTOR_NAME = "P2PKVConnector"
CONNECTOR_MODULE = "p2pkv.vllm.connector"


def register() -> None:
    """Register the connector lazily (vLLM imports the module only when it is configured).
    Safe to call more than once in a process."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
    except ValueError:  # "already registered": this process loaded the plugin before
        pass
