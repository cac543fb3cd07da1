"""The OpenAI API as the tests, the benches and the demo call it: greedy requests to a
``vllm serve`` instance or to ``p2pkv router``, streamed (to time the first token) or not.

The one HTTP client of the harness: every request body is built here, and every answer comes
back as a :class:`Completion`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

MODEL = "model"
"""The ``--served-model-name`` every harness instance runs under."""

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@dataclass(frozen=True, slots=True)
class Completion:
    """One answer as a client sees it."""

    text: str
    ttft_s: float
    """Streamed: until the first non-empty text. Not streamed: the whole request."""
    total_s: float
    prompt_tokens: int
    completion_tokens: int
    headers: dict[str, str] = field(default_factory=dict)
    """The response's headers, names in lower case (the router's ``x-p2pkv-*`` among them)."""

    @property
    def itl_s(self) -> float:
        """Mean inter-token latency after the first token."""
        return (self.total_s - self.ttft_s) / max(1, self.completion_tokens - 1)


def chat_body(messages: list[dict[str, str]], *, max_tokens: int, stream: bool = False
              ) -> dict:
    """A greedy chat request; streamed ones ask for the usage chunk at the end."""
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0.0, **_streaming(stream)}


def completion_body(prompt: Sequence[int] | str, *, max_tokens: int, stream: bool = False,
                    cache_salt: str | None = None) -> dict:
    """A greedy completion of a prompt (text or token ids), in ``cache_salt``'s tenant."""
    body: dict = {"model": MODEL, "prompt": prompt if isinstance(prompt, str) else list(prompt),
                  "max_tokens": max_tokens, "temperature": 0.0, **_streaming(stream)}
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    return body


def _streaming(stream: bool) -> dict:
    return {"stream": True, "stream_options": {"include_usage": True}} if stream else {}


def chat(url: str, messages: list[dict[str, str]], *, max_tokens: int = 32, stream: bool = True,
         timeout_s: float = 600.0) -> Completion:
    """Greedy chat completion; streamed by default, so that the first token can be timed."""
    return request(url, CHAT, chat_body(messages, max_tokens=max_tokens, stream=stream),
                   timeout_s)


def complete(url: str, prompt: Sequence[int] | str, *, max_tokens: int = 16,
             stream: bool = True, cache_salt: str | None = None, timeout_s: float = 600.0,
             extra_body: dict | None = None) -> Completion:
    """Greedy completion of a prompt (text or token ids); streamed by default.
    ``extra_body``: more request fields (e.g. vLLM's ``kv_transfer_params``)."""
    body = completion_body(prompt, max_tokens=max_tokens, stream=stream, cache_salt=cache_salt)
    body.update(extra_body or {})
    return request(url, COMPLETIONS, body, timeout_s)


def post(url: str, path: str, body: dict, timeout_s: float = 600.0) -> httpx.Response:
    """POST ``body`` to ``url + path`` and read the whole answer (raises on an HTTP error)."""
    r = httpx.post(url + path, json=body, timeout=timeout_s)
    r.raise_for_status()
    return r


def request(url: str, path: str, body: dict, timeout_s: float = 600.0) -> Completion:
    """Send one request built by :func:`chat_body` or :func:`completion_body`."""
    if body.get("stream"):
        return _stream(url + path, body, timeout_s)
    t0 = time.monotonic()
    r = post(url, path, body, timeout_s)
    total = time.monotonic() - t0
    answer = r.json()
    usage = answer.get("usage") or {}
    return Completion(_text(answer["choices"][0]), total, total,
                      usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                      dict(r.headers))


def _text(choice: dict) -> str:
    """A choice's text in any of the API's shapes: completion text, chat message or delta."""
    if "text" in choice:
        return choice["text"] or ""
    return (choice.get("message") or choice.get("delta") or {}).get("content") or ""


def _stream(url: str, body: dict, timeout_s: float) -> Completion:
    """POST a streaming request and read its server-sent events; the time to the first
    non-empty text is the TTFT."""
    t0 = time.monotonic()
    ttft = None
    parts: list[str] = []
    usage: dict = {}
    with httpx.stream("POST", url, json=body, timeout=timeout_s) as r:
        r.raise_for_status()
        headers = dict(r.headers)
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            text = _text((chunk.get("choices") or [{}])[0])
            if ttft is None and text:
                ttft = time.monotonic() - t0
            parts.append(text)
    total = time.monotonic() - t0
    return Completion("".join(parts), ttft if ttft is not None else total, total,
                      usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                      headers)
