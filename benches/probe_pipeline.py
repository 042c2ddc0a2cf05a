"""Diagnostics for the load pipeline on a GPU machine: the host-to-device ceiling, then
``load_quantized`` under several settings with its phase breakdown. Prints a table and
writes JSON (``--out``). Not a benchmark against peers: see bench_load.py for that."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import fastfp8
import torch


def h2d_ceiling(total=4 << 30, chunk=64 << 20) -> float:
    src = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    src.random_()
    dst = torch.empty(total, dtype=torch.uint8, device="cuda")
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for off in range(0, total, chunk):
            dst[off:off + chunk].copy_(src[off:off + chunk], non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, total / (time.perf_counter() - t0) / 1e9)
    del src, dst
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--out", default="probe.json")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--variants", default="")
    ap.add_argument("--empty-cache", action="store_true", help="free cached GPU memory before each load")
    args = ap.parse_args()
    rows = [{"variant": "h2d pinned 64MiB chunks", "gbps": h2d_ceiling()}]
    print(f"h2d ceiling {rows[0]['gbps']:.1f} GB/s", flush=True)
    ckpt = fastfp8.open_checkpoint(args.ckpt)
    base = dict(device="cuda", progress=False)
    variants = {
        "default": {},
        "mmap": dict(method="mmap"),
        "threads=8": dict(threads=8),
        "threads=12": dict(threads=12),
        "threads=14": dict(threads=14),
        "mmap threads=12": dict(method="mmap", threads=12),
        "chunk=16MiB": dict(chunk_bytes="16MiB"),
        "chunk=256MiB": dict(chunk_bytes="256MiB"),
        "budget=512MiB": dict(memory_budget="512MiB"),
        "budget=4GiB": dict(memory_budget="4GiB"),
        "piece=1MiB": dict(piece_bytes="1MiB"),
        "piece=16MiB": dict(piece_bytes="16MiB"),
        "no quant (copy only)": dict(ignore=["re:.*"]),
        "mmap no quant": dict(method="mmap", ignore=["re:.*"]),
        "threads=20": dict(threads=20),
        "threads=24": dict(threads=24),
        "mmap threads=20": dict(method="mmap", threads=20),
        "budget=64MiB chunk=4MiB": dict(memory_budget="64MiB", chunk_bytes="4MiB", piece_bytes="1MiB"),
        "budget=128MiB chunk=8MiB": dict(memory_budget="128MiB", chunk_bytes="8MiB", piece_bytes="1MiB"),
        "mmap budget=128MiB chunk=8MiB": dict(method="mmap", memory_budget="128MiB", chunk_bytes="8MiB",
                                              piece_bytes="1MiB"),
        "budget=256MiB chunk=16MiB": dict(memory_budget="256MiB", chunk_bytes="16MiB", piece_bytes="2MiB"),
    }
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    fastfp8.load_quantized(ckpt, **base)  # warm: kernels, pinned pool, page cache
    for name, kw in variants.items():
        times, phases = [], []
        for _ in range(args.repeat):
            torch.cuda.synchronize()
            if args.empty_cache:
                torch.cuda.empty_cache()
            out = fastfp8.load_quantized(ckpt, **base, **kw)
            times.append(out.stats.seconds)
            phases.append(out.stats.phases)
            del out
        i = times.index(statistics.median(times))
        row = {"variant": name, "seconds": times[i], "gbps": ckpt.nbytes / times[i] / 1e9,
               "phases": phases[i], "times": times}
        rows.append(row)
        ph = " ".join(f"{k}={v * 1000:.0f}ms" for k, v in phases[i].items())
        print(f"{name:24s} {times[i]:.3f} s {row['gbps']:6.2f} GB/s  {ph}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(0), "checkpoint_bytes": ckpt.nbytes, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
