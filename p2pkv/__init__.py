"""p2pkv: peer-to-peer KV-cache sharing between vLLM instances.

A small directory knows which instance holds which prefix chunks; instances pull the KV bytes
straight from each other; a vLLM KV connector (``p2pkv.vllm.connector.P2PKVConnector``) ties
it into vLLM. See docs/architecture.md.
"""

__version__ = "0.1.0"
