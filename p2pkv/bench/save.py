"""Save-path micro-bench: where a CPU save's time goes, piece by piece, side by side in one run.

``p2pkv bench save [--layers 30 --kv-heads 3 --head-size 64 --block-size 16 --chunk-tokens 128
--dtype float32 --chunks 23 --reps 3]`` (defaults: SmolLM2-135M fp32, the connector's default
chunk, a 2.9k-token prompt's chunks). In one process, without vLLM: a CPU KV cache shaped like
vLLM's (per layer ``[blocks, kv_heads, block_size, 2 * head_size]``), and for each chunk of each
rep, interleaved, every row below on the same chunk. Block ids are consecutive (fresh blocks, as
vLLM hands them out) or, with ``--scattered``, a random permutation. Reported per row: p50 over
all chunks and reps of the wall time and of the thread's CPU time per chunk, the rate, and the
total for ``--chunks`` chunks (what one prompt's saves cost the save thread).

Rows: ``gather, per (block, layer)`` is the copy before issue 17's change (one numpy copy per
block and layer); ``gather (KVLayout.copy_out)`` the current one, per run of consecutive ids and
layer; both into a slot written before (warm). Then the same copy into a never-touched slot of
the store's shm slab (what every cold miss paid while the store fills) and of a private slab,
``ChunkStore.prefault`` of a shm slot (what the save thread now does while idle) and the copy
into a prefaulted slot; the digest ``commit`` computes; and the references: a torch
``index_select`` + ``copy_`` per layer of the same bytes, and one ``memcpy`` of the chunk's size.
A never-touched slot is made again between reps by returning its pages to the kernel (a hole
punched in the shm file, ``MADV_DONTNEED`` for private memory).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from p2pkv.keys import ChunkKey
from p2pkv.store import ChunkStore, digest

_libc = ctypes.CDLL(None, use_errno=True)
_FALLOC_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_MADV_DONTNEED = 4


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--chunks", type=int, default=23, help="chunks per rep (one prompt's)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scattered", action="store_true",
                        help="block ids in random order instead of consecutive runs")
    parser.add_argument("--seed", type=int, default=0)


def legacy_copy_out(layout, block_ids: Sequence[int], slot: memoryview) -> None:
    """KVLayout.copy_out before issue 17's change: one copy per (block, layer)."""
    dst = np.frombuffer(slot, dtype=np.uint8)
    off = 0
    for b in block_ids:
        for piece in [r[b] for r in layout.rows]:
            dst[off:off + piece.nbytes] = piece
            off += piece.nbytes


def untouch(store: ChunkStore, index: int) -> None:
    """Give slot ``index``'s pages back to the kernel: its next write faults them in again."""
    n = store.slot_bytes
    if store.shm_path:
        fd = os.open(store.shm_path, os.O_RDWR)
        try:
            if _libc.fallocate(fd, _FALLOC_PUNCH_HOLE, ctypes.c_long(index * n),
                               ctypes.c_long(n)) != 0:
                raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE)")
        finally:
            os.close(fd)
        return
    page = os.sysconf("SC_PAGE_SIZE")
    addr = store.slab_array()[index].ctypes.data
    start, end = -(-addr // page) * page, (addr + n) // page * page
    if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED):
        raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED)")


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    c0, t0 = time.thread_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.thread_time() - c0


def run(args: argparse.Namespace) -> dict[str, tuple[list[float], list[float]]]:
    """Every row's (wall, cpu) seconds per chunk, rows interleaved chunk by chunk."""
    import torch

    from p2pkv.vllm.layout import KVLayout

    rng = np.random.default_rng(args.seed)
    chunk_blocks = max(1, args.chunk_tokens // args.block_size)
    num_blocks = args.chunks * chunk_blocks + 8
    dtype = getattr(torch, args.dtype)
    caches = {f"model.layers.{i}.self_attn.attn":
              torch.randn(num_blocks, args.kv_heads, args.block_size, 2 * args.head_size)
              .to(dtype) for i in range(args.layers)}
    layout = KVLayout.from_kv_caches(caches)
    order = rng.permutation(num_blocks) if args.scattered else np.arange(num_blocks)
    chunks = [[int(b) for b in order[i * chunk_blocks:(i + 1) * chunk_blocks]]
              for i in range(args.chunks)]
    slot_bytes = layout.chunk_bytes(chunk_blocks)
    warm = ChunkStore(slot_bytes, 1)
    shm = ChunkStore(slot_bytes, 2, shared=True)  # 0: never touched, 1: prefaulted
    private = ChunkStore(slot_bytes, 1)
    warm_view = warm.slot_view(0)
    np.frombuffer(warm_view, np.uint8).fill(1)
    src = np.ones(slot_bytes, np.uint8)
    torch_rows = [torch.from_numpy(r) for r in layout.rows]  # the same bytes, as torch
    warm_t = torch.from_numpy(np.frombuffer(warm_view, np.uint8)).view(
        chunk_blocks, layout.num_layers, layout.block_bytes)

    def torch_gather(ids: Sequence[int]) -> None:
        idx = torch.tensor(ids, dtype=torch.long)
        for layer, r in enumerate(torch_rows):
            warm_t[:, layer].copy_(r.index_select(0, idx))

    def prefault_fresh() -> None:
        untouch(shm, 1)
        t = _timed(lambda: shm.prefault(1))
        times["prefault a shm slot (idle)"][0].append(t[0])
        times["prefault a shm slot (idle)"][1].append(t[1])

    times: dict[str, tuple[list[float], list[float]]] = {}
    names = ["gather, per (block, layer), warm slot", "gather (KVLayout.copy_out), warm slot",
             "copy_out, never-touched shm slot", "copy_out, never-touched private slot",
             "prefault a shm slot (idle)", "copy_out, prefaulted shm slot",
             "digest (xxh3-64, commit)", "torch index_select+copy_ per layer",
             "memcpy of the chunk's bytes"]
    for n in names:
        times[n] = ([], [])
    for _ in range(args.reps):
        for ids in chunks:
            steps: list[tuple[str, Callable[[], object], Callable[[], object] | None]] = [
                (names[0], lambda: legacy_copy_out(layout, ids, warm_view), None),
                (names[1], lambda: layout.copy_out(ids, warm_view), None),
                (names[2], lambda: layout.copy_out(ids, shm.slot_view(0)),
                 lambda: untouch(shm, 0)),
                (names[3], lambda: layout.copy_out(ids, private.slot_view(0)),
                 lambda: untouch(private, 0)),
                (names[5], lambda: layout.copy_out(ids, shm.slot_view(1)), prefault_fresh),
                (names[6], lambda: digest(warm_view), None),
                (names[7], lambda: torch_gather(ids), None),
                (names[8], lambda: np.copyto(np.frombuffer(warm_view, np.uint8), src), None),
            ]
            for name, fn, before in steps:
                if before is not None:
                    before()
                wall, cpu = _timed(fn)
                times[name][0].append(wall)
                times[name][1].append(cpu)
    for s in (warm, shm, private):
        s.close()
    # the bytes are what the old copy wrote
    ref = bytearray(slot_bytes)
    legacy_copy_out(layout, chunks[0], memoryview(ref))
    layout.copy_out(chunks[0], warm_view)
    assert bytes(warm_view) == bytes(ref), "copy_out changed the bytes"
    times["_slot_bytes"] = ([float(slot_bytes)], [])
    return times


def render(times: dict[str, tuple[list[float], list[float]]], chunks: int) -> list[str]:
    slot_bytes = times["_slot_bytes"][0][0]
    lines = [f"{'per chunk (' + format(slot_bytes / 1e6, '.2f') + ' MB), p50':40s} "
             f"{'wall ms':>8s} {'cpu ms':>8s} {'GB/s':>6s} {f'x{chunks} chunks ms':>15s}  n"]
    for name, (wall, cpu) in times.items():
        if name.startswith("_"):
            continue
        w, c = statistics.median(wall), statistics.median(cpu)
        lines.append(f"{name:40s} {w * 1e3:8.2f} {c * 1e3:8.2f} {slot_bytes / w / 1e9:6.2f} "
                     f"{w * 1e3 * chunks:15.1f}  {len(wall)}")
    return lines


def main(args: argparse.Namespace) -> int:
    load = os.getloadavg()
    times = run(args)
    print(f"save path, {args.layers} layers x {args.kv_heads} KV heads x head {args.head_size} "
          f"{args.dtype}, block {args.block_size}, chunk {args.chunk_tokens} tokens, "
          f"{'scattered' if args.scattered else 'consecutive'} block ids; load average "
          f"{load[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print("\n".join(render(times, args.chunks)))
    return 0
