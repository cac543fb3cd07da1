"""The vLLM KV connector (``p2pkv.vllm.connector.P2PKVConnector``) and its parts.

Nothing here is imported by the directory or the transport; vLLM is imported only by the
modules of this package that need it.
"""
