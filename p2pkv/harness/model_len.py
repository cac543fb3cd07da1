"""How long the instances' context must be for a bench's prompts (``--max-model-len``)."""

from __future__ import annotations

import json
from pathlib import Path


def max_model_len(longest: int, model_positions: int) -> int:
    """The instances' ``--max-model-len`` for prompts of up to ``longest`` tokens (plus a
    question and one output token): at least vLLM's usual 4,096, at most what the model's
    positions allow (ValueError, a caller error, when the prompts do not fit)."""
    need = longest + 128
    if need > model_positions:
        raise ValueError(f"prompts of {longest} tokens (plus a question) do not fit the "
                         f"model's {model_positions} positions")
    return min(model_positions, max(4096, need))


def model_positions(model: Path) -> int:
    """The model's ``max_position_embeddings`` (its config.json)."""
    return int(json.loads((model / "config.json").read_text())["max_position_embeddings"])
