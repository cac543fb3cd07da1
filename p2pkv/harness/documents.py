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


def document_tokens(model: Path, at_least: int = 0) -> list[int]:
    """The whole document as ``model``'s tokenizer makes it (a token source for prompts of
    exact lengths). ``at_least``: for prompts longer than the document (~3,560 tokens), the
    document followed by its sections again in other orders (:func:`long_document`) until
    there are that many tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    text = document()
    for copy in range(1, 64):
        ids = tok(text)["input_ids"]
        if len(ids) >= at_least:
            return ids
        text = long_document(copy + 1)
    raise AssertionError("unreachable: 64 copies of the document")


def long_document(copies: int) -> str:
    """The document, then ``copies - 1`` more arrangements of its sections (each copy's
    paragraphs rotated by a different amount), as one text: a long-document source whose
    chunks all differ. NOTE: vLLM's chained block hashes make a repeated paragraph a new chunk
    anyway; rotating keeps the text from being one period repeated."""
    paras = [p for p in document().split("\n\n") if p.strip()]
    out = [document()]
    for c in range(1, copies):
        shift = (c * 7) % len(paras)
        out.append("\n\n".join(paras[shift:] + paras[:shift]))
    return "\n\n".join(out)


def document_messages(document: str, question: str) -> list[dict[str, str]]:
    """A long-document QA prompt: the document first, so every question shares its prefix."""
    return [{"role": "system", "content": "Answer questions about the document below briefly."},
            {"role": "user", "content": f"{document}\n\nQuestion: {question}"}]
