"""What the router accepts from a client: a bounded JSON object, and, when the router has an
API key, the right ``Authorization``. Every refusal is a 4xx with an OpenAI-style error body,
never a 500 (called by ``router/app.py`` before anything is routed).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response


def error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status)


@dataclass(frozen=True, slots=True)
class Body:
    """A client's request body: the bytes as they came (forwarded unchanged) and parsed."""

    raw: bytes
    value: dict[str, Any]


async def read_body(request: Request, max_bytes: int) -> Body | Response:
    """The body as a JSON object, or the 4xx answer: 413 over ``max_bytes`` (by its declared
    length before reading a byte, else as soon as more has arrived), 400 for anything that
    is not a JSON object (malformed, not UTF-8, nested past the parser's depth, ...)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            return error(400, "bad Content-Length", "BadRequestError")
        if int(declared) > max_bytes:
            return _too_large(max_bytes)
    buf = bytearray()
    async for part in request.stream():
        buf += part
        if len(buf) > max_bytes:
            return _too_large(max_bytes)
    raw = bytes(buf)
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        value = None
    if not isinstance(value, dict):
        return error(400, "the body must be a JSON object", "BadRequestError")
    return Body(raw, value)


def encode(value: dict[str, Any]) -> bytes | None:
    """``value`` as JSON, or None when it cannot be (too deep to encode)."""
    try:
        return json.dumps(value, separators=(",", ":")).encode()
    except (ValueError, TypeError, RecursionError):
        return None


def authorized(request: Request, api_key: str) -> bool:
    """Without a router API key every client is; with one, ``Authorization: Bearer KEY``."""
    if not api_key:
        return True
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())


def unauthorized() -> JSONResponse:
    return error(401, "invalid or missing API key (Authorization: Bearer ...)",
                 "AuthenticationError")


def _too_large(max_bytes: int) -> JSONResponse:
    return error(413, f"request body over the router's limit of {max_bytes} bytes",
                 "RequestTooLarge")
