"""Reader benchmark: page cache -> pinned host memory, fastfp8's native reader against
``safetensors.safe_open(...).get_tensor(k)`` copied into pinned memory, same run.

    python benches/bench_stream.py CKPT_DIR --out benches/results/stream_h100.json

Variants of fastfp8: read method (pread, mmap) x threads. Median of ``--repeat`` warm runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import fastfp8
import torch
from fastfp8.checkpoint import ChunkReader
from fastfp8.pinned import cuda_available


def fastfp8_stream(ckpt, *, method, threads, budget, chunk, piece):
    items = [(t.name, [(t.shard, t.begin, t.nbytes)]) for t in ckpt.file_order()]
    with ChunkReader(ckpt, items, memory_budget=budget, chunk_bytes=chunk, threads=threads,
                     method=method, piece_bytes=piece) as r:
        while (d := r.next()) is not None:
            r.release(d[2], d[3])
        return r.stats()


def safetensors_stream(ckpt, staging):
    """The usual way: get_tensor (a copy out of safetensors' mmap) then a copy into pinned
    staging, one tensor at a time, chunked to the staging size."""
    from safetensors import safe_open

    flat = staging
    for shard in ckpt.shards:
        with safe_open(shard, framework="pt", device="cpu") as f:
            for k in f.keys():  # noqa: SIM118
                t = f.get_tensor(k).reshape(-1).view(torch.uint8)
                for off in range(0, t.numel(), flat.numel()):
                    n = min(flat.numel(), t.numel() - off)
                    flat[:n].copy_(t[off:off + n])


def timed(fn, repeat):
    fn()  # warm: page cache, pools, pinned pages
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--out", default="benches/results/stream.json")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", default="")
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--chunk", type=int, default=64 << 20)
    ap.add_argument("--piece", type=int, default=4 << 20)
    args = ap.parse_args(argv)

    ckpt = fastfp8.open_checkpoint(args.ckpt)
    nbytes = ckpt.nbytes
    cores = os.cpu_count() or 1
    threads = [int(x) for x in args.threads.split(",") if x] or sorted({min(cores, 16), max(1, cores // 2)})
    rows = []

    def add(name, secs, times, **extra):
        rows.append({"path": name, "seconds": secs, "gbps": nbytes / secs / 1e9, "times": times, **extra})
        print(f"{name:40s} {secs:8.3f} s {nbytes / secs / 1e9:7.2f} GB/s", flush=True)

    for method in ("pread", "mmap"):
        for n in threads:
            secs, times = timed(lambda m=method, n=n: fastfp8_stream(
                ckpt, method=m, threads=n, budget=args.budget, chunk=args.chunk, piece=args.piece), args.repeat)
            add(f"fastfp8 {method} threads={n}", secs, times, method=method, threads=n)
    staging = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=cuda_available())
    secs, times = timed(lambda: safetensors_stream(ckpt, staging), args.repeat)
    add("safetensors safe_open + copy to pinned", secs, times)

    best = max((r for r in rows if r["path"].startswith("fastfp8")), key=lambda r: r["gbps"])
    st = next(r for r in rows if r["path"].startswith("safetensors"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    doc = {
        "machine": f"{platform.node()} ({cores} cores)", "gpu": gpu, "pinned": cuda_available(),
        "date": datetime.date.today().isoformat(), "checkpoint": args.ckpt, "checkpoint_bytes": nbytes,
        "repeat": args.repeat, "fastfp8_best_gbps": best["gbps"], "fastfp8_best": best["path"],
        "safetensors_gbps": st["gbps"], "speedup": best["gbps"] / st["gbps"], "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    where = f"{gpu} host, " if gpu else ""
    md = [f"Page cache -> {'pinned' if doc['pinned'] else 'host'} memory, {nbytes / 2**30:.2f} GiB checkpoint, "
          f"{where}{cores} cores, {doc['date']}, median of {args.repeat}:", "",
          "| path | s | GB/s |", "| --- | ---: | ---: |"]
    md += [f"| {r['path']} | {r['seconds']:.3f} | {r['gbps']:.2f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
