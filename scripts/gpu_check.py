"""GPU check: CUDA-memory chunks between two processes on one GPU, bytes verified, GB/s next
to the copies that bound them, in a few minutes, on a host with torch and no network.

    python scripts/gpu_check.py [--out DIR] [--layers 32 --heads 8 --head-size 128 ...]

What it does (each step prints as it goes and lands in DIR/gpu_check.json):
1. The limits, measured here on the same bytes: device-to-device copy, page-locked host-to-device
   and device-to-host copies.
2. The layouts: KVLayout over real CUDA caches of the GPU attention backends' layouts
   (NHD, HND, heads-outside-blocks), block pieces checked against the tensors.
3. A holder process fills a paged "KV cache" on the GPU (bf16, vLLM 0.32's logical
   [blocks, H, N, C] over an NHD layout), saves chunks with the connector's AsyncSaver
   (async device-to-host into the page-locked store) and serves them over every transport it
   has: tcp (page-locked staging + one host-to-device copy), shm (same host: one DMA straight
   from the holder's page-locked slab mapping, digest checked meanwhile) and ucx (if ucxx
   imports: into a device staging buffer, then one gather kernel).
4. This process pulls the chunks into other blocks of its own cache over each transport,
   checks every byte against the holder's (regenerated from the seed, on the GPU), and times
   it. Then the holder is killed and a pull must fail within its deadline.
5. Heterogeneous TP (``tp_parts``), on HND caches (heads outside tokens: a head range of a
   block is one byte range): two holder "ranks", each caching half of the KV heads, serve
   their chunks; one puller block set with every head receives both parts at their heads'
   offsets (``KVLayout.part_dest``, TP2->TP1), and two puller "ranks" with half the heads
   each take their half of one whole-model holder's chunks (``part_selection``, TP1->TP2).
   Every byte is checked, and blocks outside the pull stay untouched.

ucxx travels as wheels (ucxx-cu13, libucxx-cu13, libucx-cu13 1.21, rmm-cu13, librmm-cu13,
rapids-logger; ~53 MB) plus msgspec and pyzmq; see docs/gpu.md for the command.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS: dict = {}


def say(key: str, value) -> None:
    RESULTS[key] = value
    print(f"{key}: {value}", flush=True)


def make_cache(args, seed: int | None, device):
    """Per-layer caches: logical [blocks, H, N, C] views of NHD memory [blocks, N, H, C]."""
    import torch

    g = torch.Generator(device=device)
    caches = {}
    for i in range(args.layers):
        raw = torch.empty(args.blocks, args.block_size, args.heads, 2 * args.head_size,
                          dtype=torch.bfloat16, device=device)
        if seed is None:
            raw.zero_()
        else:
            g.manual_seed(seed * 1000 + i)
            raw.copy_(torch.randn(raw.shape, generator=g, device=device, dtype=torch.float32))
        caches[f"model.layers.{i}.self_attn"] = raw.permute(0, 2, 1, 3)
    return caches


def chunk_key(i: int):
    from p2pkv.keys import ChunkKey

    return ChunkKey(b"gpu-check-chunk-" + i.to_bytes(16, "little"))


def timed(fn, reps: int, sync) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def limits(args) -> None:
    import torch

    dev = torch.device("cuda")
    n = args.chunk_blocks * args.layers * args.block_size * args.heads * 2 * args.head_size * 2
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    sync = torch.cuda.synchronize
    say("chunk_bytes", n)
    say("limit_d2d_GBps", round(n / timed(lambda: b.copy_(a), 20, sync) / 1e9, 1))
    say("limit_h2d_pinned_GBps", round(n / timed(lambda: a.copy_(h, non_blocking=True), 20,
                                                  sync) / 1e9, 1))
    import numpy as np
    import xxhash

    x = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    y = np.empty_like(x)
    say("host_memcpy_GBps", round(n / timed(lambda: np.copyto(y, x), 5, lambda: None) / 1e9, 1))
    say("host_xxh3_GBps", round(n / timed(lambda: xxhash.xxh3_64_intdigest(x), 5,
                                          lambda: None) / 1e9, 1))
    say("limit_d2h_pinned_GBps", round(n / timed(lambda: h.copy_(a, non_blocking=True), 20,
                                                  sync) / 1e9, 1))


def layouts() -> None:
    import torch

    from p2pkv.vllm.layout import KVLayout

    sizes = {"B": 6, "H": 4, "N": 16, "C": 128}
    for order, segs in (("BNHC", 1), ("BHNC", 1), ("HBNC", 4)):
        raw = torch.randn(*(sizes[d] for d in order), device="cuda")
        t = raw.permute(*[order.index(d) for d in "BHNC"])
        lay = KVLayout.from_kv_caches({"l0": t, "l1": t.clone()})
        assert len(lay.segments) == segs and lay.on_gpu
        pieces = lay.block_views(4)
        got = torch.cat([p for p in pieces[:segs]]).cpu()
        want = t[4].contiguous() if order != "BNHC" else raw[4].contiguous()
        if order == "HBNC":
            want = raw[:, 4].contiguous()
        assert torch.equal(got, want.cpu().view(-1).view(torch.uint8)), order
    say("layouts", "NHD, HND, HBNC: block pieces are the tensors' bytes on CUDA")


def shm_phases(args) -> None:
    """Where the time of a same-host pull into the GPU goes: host-to-device from a page-locked
    read-only mapping of a /dev/shm file (how the shm path reads a holder's slab)."""
    import mmap
    import tempfile

    import numpy as np
    import torch
    import xxhash

    from p2pkv.cuda import page_lock, page_unlock
    from p2pkv.transport.land import scatter

    n = 4 * args.chunk_blocks * args.layers * args.block_size * args.heads * 2 \
        * args.head_size * 2 // 4
    with tempfile.TemporaryFile(dir="/dev/shm") as f:
        f.write(np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).tobytes())
        f.flush()
        m = mmap.mmap(f.fileno(), n, mmap.MAP_SHARED, mmap.PROT_READ)
        a = np.frombuffer(m, np.uint8)
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        out = {}
        for mode in ("pageable", "locked"):
            if mode == "locked":
                out["lock_ok"] = page_lock(a.ctypes.data, n, read_only=True)
            host = torch.from_numpy(a)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dev.copy_(host, non_blocking=True)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            out[mode] = {"enqueue_ms": round((t1 - t0) * 1e3, 2),
                         "total_ms": round((t2 - t0) * 1e3, 2),
                         "GBps": round(n / (t2 - t0) / 1e9, 1)}
        t0 = time.perf_counter()
        xxhash.xxh3_64_intdigest(a)
        out["xxh3_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        pieces = [dev[i:i + 65536] for i in range(0, n, 65536)]
        t0 = time.perf_counter()
        scatter(a, pieces, verify=lambda: True)
        out["scatter_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        out["bytes"] = n
        del host, a
        if out.get("lock_ok"):
            page_unlock(np.frombuffer(m, np.uint8).ctypes.data)
        say("shm_phases", out)


def holder(args, pipe) -> None:
    try:
        import torch

        from p2pkv.transport.choose import make_transport
        from p2pkv.vllm.gpu import AsyncSaver
        from p2pkv.vllm.layout import KVLayout

        if args.device == "cuda":
            torch.cuda.set_device(0)
        caches = make_cache(args, seed=7, device=args.device)
        layout = KVLayout.from_kv_caches(caches)
        kinds = ["tcp", "shm"] + (["ucx"] if args.ucx else [])
        out = {}
        keep = []
        for kind in kinds:
            t = make_transport(kind, bind_host="127.0.0.1", cuda_device=args.cuda_device)
            store = t.create_store(layout.chunk_bytes(args.chunk_blocks), args.chunks)
            saver = AsyncSaver(layout, store) if layout.on_gpu else None
            if saver is not None:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            per_save = []
            for i in range(args.chunks):
                blocks = list(range(i * args.chunk_blocks, (i + 1) * args.chunk_blocks))
                if saver is not None:
                    ts = time.perf_counter()
                    assert saver.save(chunk_key(i), blocks)
                    per_save.append(round((time.perf_counter() - ts) * 1e3, 2))
                else:
                    w = store.reserve(chunk_key(i))
                    layout.copy_out(blocks, w.view)
                    store.commit(w)
            queued = time.perf_counter() - t0
            saved = saver.collect(wait=True) if saver is not None else list(range(args.chunks))
            total = time.perf_counter() - t0
            assert len(saved) == args.chunks
            out[kind] = {"address": t.serve(store), "transport": t.name,
                         "save_queue_ms": round(queued * 1000, 2), "per_save_ms": per_save,
                         "save_GBps": round(args.chunks * store.slot_bytes / total / 1e9, 2),
                         "page_locked": bool(saver and saver.page_locked)}
            keep.append((t, store, saver))
        pipe.send(("ok", out, os.getpid()))
        pipe.recv()
    except BaseException:
        pipe.send(("error", traceback.format_exc(), os.getpid()))


def pulls(args) -> None:
    import torch

    from p2pkv.transport.base import Outcome, PullItem
    from p2pkv.transport.choose import make_transport
    from p2pkv.vllm.layout import KVLayout

    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=holder, args=(args, theirs), daemon=True)
    proc.start()
    status, info, pid = mine.recv()
    if status != "ok":
        raise RuntimeError(f"holder failed:\n{info}")
    for kind, d in info.items():
        say(f"holder_{kind}", d)
    expected = make_cache(args, seed=7, device=args.device)
    caches = make_cache(args, seed=None, device=args.device)
    layout = KVLayout.from_kv_caches(caches)
    offset = args.chunks * args.chunk_blocks  # land in other blocks than the holder's
    chunk_bytes = layout.chunk_bytes(args.chunk_blocks)
    try:
        for kind, d in info.items():
            t = make_transport(kind, bind_host="127.0.0.1", cuda_device=args.cuda_device)
            items = []
            for i in range(args.chunks):
                blocks = range(offset + i * args.chunk_blocks, offset + (i + 1) * args.chunk_blocks)
                items.append(PullItem(chunk_key(i), layout.chunk_dest(list(blocks))))
            for c in caches.values():
                c.zero_()
            times = []
            for rep in range(args.reps):
                t0 = time.perf_counter()
                res = t.pull(d["address"], items, 30.0)
                times.append(time.perf_counter() - t0)
                bad = [r for r in res if r.outcome is not Outcome.OK]
                if bad:
                    raise RuntimeError(f"{kind}: {bad[:2]}")
            ok = all(torch.equal(caches[n][offset + b], expected[n][b])
                     for n in caches for b in range(args.chunks * args.chunk_blocks))
            untouched = all(int(torch.count_nonzero(c[:offset])) == 0 for c in caches.values())
            best = min(times)
            extra = {}
            for conn in t.pool.idle():  # diagnostics: how the shm path read the slab
                if conn.slab is not None:
                    extra["slab_dma_mode"] = conn.slab.dma_mode
            say(f"pull_{kind}", {**extra,
                "bytes_verified": ok and untouched, "path": t.name,
                "counters": dict(tcp=t.counters.tcp, shm=t.counters.shm,
                                 ucx=t.counters.ucx),
                "GBps_best": round(args.chunks * chunk_bytes / best / 1e9, 2),
                "GBps_median": round(args.chunks * chunk_bytes / sorted(times)[len(times) // 2]
                                     / 1e9, 2),
                "ms_best": round(best * 1000, 2)})
            if not (ok and untouched):
                raise RuntimeError(f"{kind}: bytes differ")
            t.close()
        # a dead holder: the pull fails within its deadline, no hang
        os.kill(pid, 9)
        proc.join(5)
        t = make_transport(next(reversed(info)), bind_host="127.0.0.1",
                           cuda_device=args.cuda_device)
        t0 = time.perf_counter()
        res = t.pull(info[next(reversed(info))]["address"], items[:1], 2.0)
        say("dead_holder", {"outcome": res[0].outcome.value,
                            "seconds": round(time.perf_counter() - t0, 2)})
        t.close()
    finally:
        if proc.is_alive():
            proc.kill()


def hnd_cache(args, heads: int, seed: int | None, device, head_range=None):
    """Per-layer HND caches [blocks, heads, N, C] (contiguous): ``heads`` KV heads, or heads
    ``head_range`` of a ``heads``-head cache made from ``seed`` (a TP rank's half)."""
    import torch

    caches = {}
    for i in range(args.layers):
        shape = (args.blocks, heads, args.block_size, 2 * args.head_size)
        if seed is None:
            t = torch.zeros(shape, dtype=torch.bfloat16, device=device)
        else:
            g = torch.Generator(device=device)
            g.manual_seed(seed * 1000 + i)
            t = torch.randn(shape, generator=g, device=device).to(torch.bfloat16)
        if head_range is not None:
            t = t[:, head_range[0]:head_range[1]].contiguous()
        caches[f"model.layers.{i}.self_attn"] = t
    return caches


def _save_all(args, layout, store, caches) -> None:
    """Store chunk i = blocks [i*cb, (i+1)*cb) of ``caches`` (GPU: AsyncSaver)."""
    import torch

    from p2pkv.vllm.gpu import AsyncSaver

    saver = AsyncSaver(layout, store) if layout.on_gpu else None
    for i in range(args.chunks):
        blocks = list(range(i * args.chunk_blocks, (i + 1) * args.chunk_blocks))
        if saver is not None:
            assert saver.save(chunk_key(i), blocks)
        else:
            w = store.reserve(chunk_key(i))
            layout.copy_out(blocks, w.view)
            store.commit(w)
    if saver is not None:
        torch.cuda.synchronize()
        assert len(saver.collect(wait=True)) == args.chunks
        saver.close()


def tp_parts(args) -> None:
    """Two holder ranks into one puller (TP2->TP1) and one holder into two puller ranks
    (TP1->TP2), on HND caches, every byte checked (see the module docstring, step 5)."""
    import torch

    from p2pkv.slices import KVSlice, tp_slices
    from p2pkv.transport.base import Outcome, PullItem
    from p2pkv.transport.choose import make_transport
    from p2pkv.vllm.layout import KVLayout, part_selection

    H, L, dev = args.heads, args.layers, args.device
    assert H % 2 == 0, "--heads must be even for the TP 2 cases"
    whole = KVSlice.whole(H, L)
    halves = tp_slices(num_kv_heads=H, num_layers=L, tp_size=2)
    offset = args.chunks * args.chunk_blocks
    out = {}
    for kind in ["tcp", "shm"]:
        holders = []  # (transport, address, layout, slice)
        try:
            for sl in halves:
                caches = hnd_cache(args, H, 11, dev, (sl.head_start, sl.head_end))
                lay = KVLayout.from_kv_caches(caches)
                t = make_transport(kind, bind_host="127.0.0.1", cuda_device=args.cuda_device)
                store = t.create_store(lay.chunk_bytes(args.chunk_blocks), args.chunks)
                _save_all(args, lay, store, caches)
                holders.append((t, t.serve(store), lay, sl, caches))
            full = hnd_cache(args, H, 11, dev)
            lay_full = KVLayout.from_kv_caches(full)
            t = make_transport(kind, bind_host="127.0.0.1", cuda_device=args.cuda_device)
            store = t.create_store(lay_full.chunk_bytes(args.chunk_blocks), args.chunks)
            _save_all(args, lay_full, store, full)
            holders.append((t, t.serve(store), lay_full, whole, full))

            # TP2 -> TP1: one puller with every head, a part from each holder rank
            dst = hnd_cache(args, H, None, dev)
            lay = KVLayout.from_kv_caches(dst)
            puller = make_transport(kind, bind_host="127.0.0.1", cuda_device=args.cuda_device)
            t0 = time.perf_counter()
            for _, address, _, sl, _ in holders[:2]:
                items = [PullItem(chunk_key(i), lay.part_dest(
                    list(range(offset + i * args.chunk_blocks,
                               offset + (i + 1) * args.chunk_blocks)), whole, sl))
                    for i in range(args.chunks)]
                res = puller.pull(address, items, 30.0)
                bad = [r for r in res if r.outcome is not Outcome.OK]
                if bad:
                    raise RuntimeError(f"tp2->tp1 {kind}: {bad[:2]}")
            ms = (time.perf_counter() - t0) * 1000
            n = args.chunks * args.chunk_blocks
            ok = all(torch.equal(dst[k][offset:offset + n], full[k][:n]) for k in dst)
            untouched = all(int(torch.count_nonzero(c[:offset])) == 0 for c in dst.values())
            out[f"tp2_to_tp1_{kind}"] = {"bytes_verified": ok and untouched,
                                         "ms": round(ms, 2)}
            if not (ok and untouched):
                raise RuntimeError(f"tp2->tp1 {kind}: bytes differ")

            # TP1 -> TP2: each puller rank takes its half of the whole holder's chunks
            _, address, lay_h, _, _ = holders[2]
            head_bytes = lay_h.head_bytes
            for sl in halves:
                mine = hnd_cache(args, H, None, dev, (sl.head_start, sl.head_end))
                lay = KVLayout.from_kv_caches(mine)
                assert lay.head_bytes == head_bytes
                select = part_selection(whole, sl, head_bytes)
                items = [PullItem(chunk_key(i), lay.part_dest(
                    list(range(offset + i * args.chunk_blocks,
                               offset + (i + 1) * args.chunk_blocks)), sl, sl), select)
                    for i in range(args.chunks)]
                res = puller.pull(address, items, 30.0)
                bad = [r for r in res if r.outcome is not Outcome.OK]
                if bad:
                    raise RuntimeError(f"tp1->tp2 {kind} {sl}: {bad[:2]}")
                ok = all(torch.equal(mine[k][offset:offset + n],
                                     full[k][:n, sl.head_start:sl.head_end]) for k in mine)
                untouched = all(int(torch.count_nonzero(c[:offset])) == 0
                                for c in mine.values())
                out[f"tp1_to_tp2_{kind}_heads_{sl.head_start}_{sl.head_end}"] = {
                    "bytes_verified": ok and untouched}
                if not (ok and untouched):
                    raise RuntimeError(f"tp1->tp2 {kind} {sl}: bytes differ")
            puller.close()
        finally:
            for t, *_ in holders:
                t.close()
    say("tp_parts", out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--chunk-blocks", type=int, default=16)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", default="", help="comma-separated steps to run (default: all)")
    p.add_argument("--cpu", action="store_true",
                   help="smoke-test the script's flow on a CPU-only host (no GPU numbers)")
    args = p.parse_args()
    args.blocks = 2 * args.chunks * args.chunk_blocks
    args.device = "cpu" if args.cpu else "cuda"
    args.cuda_device = None if args.cpu else 0
    import torch

    say("torch", torch.__version__)
    say("gpu", "none (--cpu)" if args.cpu else torch.cuda.get_device_name(0))
    from p2pkv.transport.ucx import ucx_unavailable_reason

    reason = ucx_unavailable_reason()
    args.ucx = not reason
    if args.ucx:
        from ucxx._lib import libucxx

        say("ucx", f"ucxx ok, UCX {libucxx.get_ucx_version()}")
    else:
        say("ucx", reason)
    failed = False
    steps = [("limits", lambda: limits(args)), ("layouts", layouts),
             ("shm_phases", lambda: shm_phases(args)), ("pulls", lambda: pulls(args)),
             ("tp_parts", lambda: tp_parts(args))]
    if args.cpu:  # the flow only: no GPU limits or CUDA layouts
        steps = [st for st in steps if st[0] in ("pulls", "tp_parts")]
    if args.only:
        steps = [st for st in steps if st[0] in args.only.split(",")]
    for name, step in steps:
        try:
            step()
        except Exception:  # noqa: BLE001 - report every step, go on
            failed = True
            say(f"{name}_error", traceback.format_exc())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1))
    print("RESULT", "FAILED" if failed else "OK", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
