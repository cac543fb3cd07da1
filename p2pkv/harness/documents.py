"""The bundled document and the questions about it: the prompts of the demo, the benches and
the end-to-end tests.

``p2pkv/data/document.txt`` is a handbook of an invented lighthouse cooperative (~3,560
tokens for the demo model); ``p2pkv/data/questions.txt`` holds the demo's questions. This is
the one reader of ``p2pkv/data/``.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

QUESTIONS = ("Who founded the cooperative?", "When was the lighthouse first lit?",
             "How many steps does the staircase have?", "Who was the last keeper?",
             "Where was the granite quarried?", "What happened in the storm?")
"""Short questions about the document, for the benches' many requests."""


@cache
def _bundled(name: str) -> str:
    return resources.files("p2pkv").joinpath("data", name).read_text()


def document() -> str:
    return _bundled("document.txt")


def demo_questions() -> list[str]:
    """The demo's questions, one a line in ``questions.txt``."""
    return [q for q in _bundled("questions.txt").splitlines() if q.strip()]


def document_part(i: int, parts: int) -> str:
    """Part ``i`` of ``parts`` equal slices of the document (distinct documents for tests and
    benches)."""
    text = document()
    n = len(text) // parts
    return text[i * n:(i + 1) * n]


def document_parts(parts: int) -> list[str]:
    return [document_part(i, parts) for i in range(parts)]


def document_tokens(model: Path) -> list[int]:
    """The whole document as ``model``'s tokenizer makes it (a token source for prompts of
    exact lengths)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))(document())["input_ids"]


def document_messages(document: str, question: str) -> list[dict[str, str]]:
    """A long-document QA prompt: the document first, so every question shares its prefix."""
    return [{"role": "system", "content": "Answer questions about the document below briefly."},
            {"role": "user", "content": f"{document}\n\nQuestion: {question}"}]
