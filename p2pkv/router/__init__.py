"""``p2pkv router``: an OpenAI-compatible proxy in front of vLLM instances.

KV-aware load balancing (send a request where most of its prefix is cached, unless that
instance is much busier) and prefill/decode disaggregation (prefill on one instance, decode
on another, which pulls the prompt's KV through the directory). See docs/router.md.
"""
