"""Named model/device profiles: the cost model's priors, each number with its source.

``PROFILES[name]``; used by ``p2pkv bench trace --profile`` and the planner's tests. Numbers
marked "assumption" are not measured anywhere; they are stated so a reader can change them.
"""

from __future__ import annotations

from p2pkv.planner.cost import Link, PrefillCurve, Profile

# --- Llama-3.1-8B (bf16) on one H100 SXM -------------------------------------------------
# meta-llama/Llama-3.1-8B config.json: 32 layers, hidden 4096, 32 heads, 8 KV heads
# (head_dim 4096/32 = 128), bfloat16; 8.03 B parameters.
_L, _D, _KV_HEADS, _HEAD_DIM, _DTYPE_BYTES, _PARAMS = 32, 4096, 8, 128, 2, 8.03e9
_H100_BF16_FLOPS = 989.4e12  # NVIDIA H100 SXM datasheet: BF16 tensor core, dense
_MFU = 0.4  # assumption: fraction of peak a vLLM prefill sustains (not measured here)
_H100_KV_BYTES = _L * 2 * _KV_HEADS * _HEAD_DIM * _DTYPE_BYTES  # 131,072 B/token
_EFFECTIVE = _H100_BF16_FLOPS * _MFU

LLAMA31_8B_H100 = Profile(
    name="llama3.1-8b-h100",
    description="Llama-3.1-8B bf16 on one H100 SXM 80 GB, 400 Gb/s NIC per GPU",
    kv_bytes_per_token=_H100_KV_BYTES,
    # FLOPs per prompt of x tokens: 2*params*x (weights) + 2*layers*hidden*x^2 (causal QK^T
    # and AV), at _MFU of peak.
    prefill=PrefillCurve(tokens_per_s=_EFFECTIVE / (2 * _PARAMS),
                         quad_s_per_token2=2 * _L * _D / _EFFECTIVE, overhead_s=0.015),
    link=Link(bytes_per_s=0.8 * 400e9 / 8, rtt_s=0.5e-3),
    host_load=Link(bytes_per_s=25e9, rtt_s=0.1e-3),
    device_kv_tokens=int((0.9 * 80e9 - 16.06e9 - 4e9) // _H100_KV_BYTES),
    host_kv_tokens=(64 << 30) // _H100_KV_BYTES,
    decode_s_per_token=0.020,
    sources=(
        ("kv_bytes_per_token", "config.json of meta-llama/Llama-3.1-8B: 32 layers x 2 x 8 KV "
         "heads x 128 head_dim x 2 B (bf16) = 131,072 B"),
        ("prefill", "FLOPs 2*8.03e9*x + 2*32*4096*x^2 at 40 % (assumption) of the H100 SXM "
         "datasheet's 989.4 TFLOPS dense BF16: ~24,600 tokens/s linear, 0.58 s at 12k "
         "tokens; 15 ms step overhead (assumption)"),
        ("link", "one 400 Gb/s ConnectX-7 per GPU (DGX H100), 80 % of line rate "
         "(assumption); 0.5 ms per pull (assumption: p2pkv's request overhead, ~0.1 ms on "
         "loopback in docs/benchmarks.md, plus the fabric)"),
        ("host_load", "PCIe Gen5 x16, 64 GB/s per direction (H100 datasheet), 25 GB/s "
         "effective (assumption)"),
        ("device_kv_tokens", "80 GB x 0.9 (vLLM gpu_memory_utilization) - 16.06 GB weights "
         "- 4 GB activations (assumption), / 131,072 B"),
        ("host_kv_tokens", "64 GiB store per GPU (assumption: a quarter of a 2 TB, 8-GPU "
         "node's RAM)"),
        ("decode_s_per_token", "assumption (20 ms per output token at moderate batch)"),
    ),
)

# --- SmolLM2-135M-Instruct fp32 on vLLM CPU, measured on this machine kind ----------------
# ../shared/design/MEASURED.md: cold prefill 721 tokens 3.1 s, ~2,950 tokens 20-28 s (AVX2
# EPYC, 2 vCPU); 5-10 s for ~2,900 tokens on the AVX-512 Xeon. Fitting
# T(x) = x/r + q*x^2 through (721, 3.1) and (2950, 24): r = 327 tokens/s, q = 1.72e-6.
_SMOL_KV_BYTES = 30 * 2 * 3 * 64 * 4  # 46,080 B/token (MEASURED.md)
_SMOL_AVX2 = PrefillCurve(tokens_per_s=326.9, quad_s_per_token2=1.721e-6, overhead_s=0.0)

SMOLLM2_CPU = Profile(
    name="smollm2-135m-cpu",
    description="SmolLM2-135M fp32 on vLLM CPU (2-vCPU AVX2 EPYC), p2pkv TCP between hosts",
    kv_bytes_per_token=_SMOL_KV_BYTES,
    prefill=_SMOL_AVX2,
    link=Link(bytes_per_s=1.25e9, rtt_s=0.1e-3),
    host_load=Link(bytes_per_s=10e9, rtt_s=0.0),
    device_kv_tokens=(4 << 30) // _SMOL_KV_BYTES,
    host_kv_tokens=(2 << 30) // _SMOL_KV_BYTES,
    decode_s_per_token=0.05,
    sources=(
        ("kv_bytes_per_token", "MEASURED.md: 30 layers x 2 x 3 KV heads x 64 x 4 B = 46,080 B"),
        ("prefill", "MEASURED.md cold prefills: 721 tokens 3.1 s, ~2,950 tokens 20-28 s "
         "(fit through 3.1 s and 24 s)"),
        ("link", "docs/benchmarks.md: p2pkv tcp pulled 136 MB in 85-134 ms (~1.25 GB/s); "
         "~0.1 ms per request (p2pkv bench transport)"),
        ("host_load", "MEASURED.md: memcpy 10-14 GB/s (the CPU cache is host memory)"),
        ("device_kv_tokens", "VLLM_CPU_KVCACHE_SPACE=4 GiB (assumption)"),
        ("host_kv_tokens", "p2pkv's default store_gib 2.0"),
        ("decode_s_per_token", "assumption (not measured)"),
    ),
)

SMOLLM2_CPU_AVX512 = Profile(
    name="smollm2-135m-cpu-avx512",
    description="SmolLM2-135M fp32 on vLLM CPU (AVX-512 Xeon)",
    kv_bytes_per_token=_SMOL_KV_BYTES,
    prefill=_SMOL_AVX2.scaled(7.5 / 24.0),
    link=SMOLLM2_CPU.link,
    host_load=SMOLLM2_CPU.host_load,
    device_kv_tokens=SMOLLM2_CPU.device_kv_tokens,
    host_kv_tokens=SMOLLM2_CPU.host_kv_tokens,
    decode_s_per_token=0.02,
    sources=(("prefill", "MEASURED.md: ~2,900 tokens cold in 4.9-10 s on the AVX-512 Xeon: "
              "the AVX2 curve scaled by 7.5/24"), *SMOLLM2_CPU.sources[:1],
             *SMOLLM2_CPU.sources[2:]),
)

PROFILES: dict[str, Profile] = {p.name: p for p in (LLAMA31_8B_H100, SMOLLM2_CPU,
                                                    SMOLLM2_CPU_AVX512)}
