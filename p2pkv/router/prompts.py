"""The router's view of a request's prompt: its token ids and its chunk keys.

The keys must equal the ones the instances publish, so this module does what vLLM does:
the model's tokenizer (``add_special_tokens`` as vLLM's completions and chat endpoints
default), the model's chat template applied to the conversation as vLLM's renderer applies
it (``add_generation_prompt``, ``continue_final_message``, ``chat_template_kwargs``),
vLLM's own block hasher (so ``cache_salt`` and the ``NONE_HASH`` seed are folded in exactly
as an engine folds them), then :func:`p2pkv.keys.prompt_keys` as the connector calls it.
A request whose prompt cannot be named this way (batched prompts, images, LoRA) gets no
keys and is routed by load alone. tests/test_router_vllm.py checks the token ids against an
instance's own ``/tokenize``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pkv.keys import ChunkKey, prompt_keys, probe_of


@dataclass(frozen=True, slots=True)
class PromptKeys:
    num_tokens: int
    keys: tuple[ChunkKey, ...]
    full_chunks: int
    """Keys past this index are the partial chunk's (at most one)."""
    chunk_tokens: int

    def tokens_in_run(self, run: int) -> int:
        """Prompt tokens covered by the first ``run`` keys."""
        return self.num_tokens if run > self.full_chunks else run * self.chunk_tokens


@dataclass(slots=True)
class _HashView:
    """The fields of a vLLM ``Request`` that its block hasher reads, for a text prompt."""

    all_token_ids: list[int]
    cache_salt: str | None
    block_hashes: list[Any] = field(default_factory=list)
    mm_features: list[Any] = field(default_factory=list)
    lora_request: None = None
    prompt_embeds: None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


class PromptKeyer:
    def __init__(self, model: Path | str, *, block_size: int, chunk_tokens: int,
                 hash_algorithm: str = "sha256") -> None:
        from transformers import AutoTokenizer
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core import kv_cache_utils

        if block_size <= 0 or chunk_tokens <= 0:
            raise ValueError("block_size and chunk_tokens must be positive")
        self._tokenizer = AutoTokenizer.from_pretrained(str(model))
        # NOTE: a fast tokenizer used from two threads at once can fail ("Already borrowed");
        # the router tokenizes on a thread pool.
        self._lock = threading.Lock()
        self.block_size = block_size
        self.chunk_blocks = max(1, chunk_tokens // block_size)
        hash_fn = get_hash_fn_by_name(hash_algorithm)
        # The same seed resolution as an engine (PYTHONHASHSEED, else vLLM's default seed).
        kv_cache_utils.init_none_hash(hash_fn)
        self.probe = probe_of(kv_cache_utils.NONE_HASH)
        self._hasher = kv_cache_utils.get_request_block_hasher(block_size, hash_fn)

    # -- token ids ------------------------------------------------------------------------

    def completion_tokens(self, body: dict[str, Any]) -> list[int] | None:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            with self._lock:
                return list(self._tokenizer(prompt, add_special_tokens=bool(
                    body.get("add_special_tokens", True)))["input_ids"])
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        return None

    def chat_tokens(self, body: dict[str, Any]) -> list[int] | None:
        messages = body.get("messages")
        if not isinstance(messages, list) or body.get("tools") or body.get("documents"):
            return None
        conversation = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return None
            content = _text_content(m.get("content"))
            if content is None:
                return None
            conversation.append({**m, "content": content})
        kwargs = dict(body.get("chat_template_kwargs") or {})
        kwargs.setdefault("add_generation_prompt", body.get("add_generation_prompt", True))
        kwargs.setdefault("continue_final_message", body.get("continue_final_message", False))
        if body.get("chat_template"):
            kwargs["chat_template"] = body["chat_template"]
        if body.get("add_special_tokens"):
            return None  # vLLM then re-tokenizes the rendered text; not worth mirroring
        with self._lock:
            return list(self._tokenizer.apply_chat_template(conversation, tokenize=True,
                                                            return_dict=False, **kwargs))

    # -- keys -----------------------------------------------------------------------------

    def keys(self, tokens: list[int], cache_salt: str | None = None) -> PromptKeys:
        hashes = self._hasher(_HashView(tokens, cache_salt or None))
        keys = prompt_keys(hashes, tokens, self.block_size, self.chunk_blocks, with_partial=True)
        chunk_tokens = self.block_size * self.chunk_blocks
        return PromptKeys(len(tokens), tuple(keys), len(tokens) // chunk_tokens, chunk_tokens)


def _text_content(content: Any) -> str | None:
    """A message's text as vLLM's "string" content format gives it to the template: text
    parts joined by newlines; None for anything but text."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                return None
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    return None
