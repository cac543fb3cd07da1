"""Tests for p2pkv.harness.demo_model: the prepared SmolLM2 directory (default cache; slow only
the first time, ~1 min with the download) and the tiny random-weight model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

from p2pkv.harness import demo_model as m  # noqa: E402


@pytest.fixture(scope="module")
def smollm2() -> Path:
    pytest.importorskip("gguf")
    return m.prepare()


def test_prepare_returns_complete_dir(smollm2: Path) -> None:
    assert smollm2 == m.model_dir(None)
    assert smollm2.is_dir() and m.is_prepared(smollm2)
    assert (smollm2 / "config.json").is_file()
    weights = list(smollm2.glob("*.safetensors"))
    assert weights and sum(w.stat().st_size for w in weights) > 200e6  # fp32, ~270 MB
    assert (smollm2 / "tokenizer.json").is_file()
    assert (smollm2 / "tokenizer_config.json").is_file()


def test_config_is_plain_fp32_llama(smollm2: Path) -> None:
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"


def test_chat_template_applies(smollm2: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.chat_template is not None
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "What is the capital of France?" in text
    assert text.rstrip().endswith("assistant")
    ids = tok(text)["input_ids"]
    assert 5 < len(ids) < 200


def test_prepare_is_cached(smollm2: Path) -> None:
    t0 = time.monotonic()
    assert m.prepare() == smollm2
    assert time.monotonic() - t0 < 1.0


def test_prepare_returns_marked_dir_without_building(tmp_path: Path, monkeypatch) -> None:
    d = m.model_dir(tmp_path)
    d.mkdir(parents=True)
    (d / m.MARKER).write_text("x")
    monkeypatch.setattr(m, "_build_smollm2", lambda work: pytest.fail("should not build"))
    assert m.prepare(tmp_path) == d


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def boom(work: Path) -> None:
        (work / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(m, "_build_smollm2", boom)
    with pytest.raises(RuntimeError, match="boom"):
        m.prepare(tmp_path)
    models = tmp_path / "models"
    assert not m.model_dir(tmp_path).exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_tiny_model(smollm2: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = m.tiny_model(tmp_path / "tiny", smollm2)
    assert m.is_prepared(d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["head_dim"] == 64
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.chat_template is not None
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ids = torch.tensor([tok("hello world")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg["vocab_size"])
    assert m.tiny_model(tmp_path / "tiny", smollm2) == d  # cached
