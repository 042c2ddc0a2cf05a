"""Diagnostics for the load pipeline on a GPU machine: the host-to-device ceiling, the CPU
cost of each step of the engine's consumer thread (:func:`consumer_costs`), then
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


def consumer_costs(chunk: int = 8 << 20, ring: int = 128 << 20, n: int = 512, calls: int = 200) -> dict:
    """CPU microseconds per call of what the engine's consumer thread does for each chunk and
    each job (``engine._run_cuda``), alone on this machine: a chunk's copy queued (a slice
    of a pinned ring to the device, ``non_blocking``), with and without its event recorded;
    an event created; a 4096 x 4096 bf16 weight's outputs allocated, its quantization
    launched, and the per-weight non-finite flag (``isfinite``, ``~``, ``any``) the engine ran
    until b0c5a3c, which now checks every scale once after the load. The copies' own rate
    comes with them."""
    from fastfp8.quant import quantize_channelwise

    out: dict[str, float] = {}
    src = torch.empty(ring, dtype=torch.uint8, pin_memory=True)
    src.random_()
    dst = torch.empty(ring, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    slots = ring // chunk
    events = [torch.cuda.Event() for _ in range(slots)]

    def copies(with_event: bool) -> tuple[float, float]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(n):
            j = i % slots
            dst[j * chunk:(j + 1) * chunk].copy_(src[j * chunk:(j + 1) * chunk], non_blocking=True)
            if with_event:
                events[j].record(stream)
        issued = time.perf_counter() - t
        torch.cuda.synchronize()
        return issued / n * 1e6, n * chunk / (time.perf_counter() - t) / 1e9

    with torch.cuda.stream(stream):
        copies(True)  # warm
        out["copy_issue_us"], out["copy_gbps"] = copies(False)
        out["copy_and_event_issue_us"], _ = copies(True)

    def per_call(fn) -> float:
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        us = (time.perf_counter() - t) / calls * 1e6
        torch.cuda.synchronize()
        return us

    w = torch.randn(4096, 4096, device="cuda").to(torch.bfloat16)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device="cuda")
    s = torch.empty(4096, 1, dtype=torch.bfloat16, device="cuda")
    out["event_create_us"] = per_call(torch.cuda.Event)
    out["outputs_alloc_us"] = per_call(lambda: (torch.empty(w.shape, dtype=torch.float8_e4m3fn, device="cuda"),
                                                torch.empty(4096, 1, dtype=torch.bfloat16, device="cuda")))
    out["quant_launch_us"] = per_call(lambda: quantize_channelwise(w, out=q, scale_out=s, check_finite=False,
                                                                   rounding="fp32"))
    out["non_finite_flag_us"] = per_call(lambda: (~torch.isfinite(s)).any())
    return out


def parse_variant(name: str) -> dict:
    """A variant not in the table, written as ``load_quantized`` keywords: ``"quantize_on=split
    host_share=0.4 threads=14"`` (numbers parsed, anything else a string)."""
    kw = {}
    for tok in name.split():
        key, sep, val = tok.partition("=")
        if not sep:
            raise SystemExit(f"variant {name!r}: {tok!r} is not key=value")
        for conv in (int, float):
            try:
                kw[key] = conv(val)
                break
            except ValueError:
                pass
        else:
            kw[key] = val
    return kw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--out", default="probe.json")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--variants", default="", help="comma-separated names from the table, or load_quantized "
                    "keywords (\"quantize_on=split host_share=0.4\")")
    ap.add_argument("--empty-cache", action="store_true", help="free cached GPU memory before each load")
    args = ap.parse_args()
    rows = [{"variant": "h2d pinned 64MiB chunks", "gbps": h2d_ceiling()}]
    print(f"h2d ceiling {rows[0]['gbps']:.1f} GB/s", flush=True)
    costs = consumer_costs()
    print("consumer costs: " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()), flush=True)
    ckpt = fastfp8.open_checkpoint(args.ckpt)
    base = dict(device="cuda", progress=False)
    variants = {
        "default": {},
        "mmap": dict(method="mmap"),
        "threads=8": dict(threads=8),
        "threads=12": dict(threads=12),
        "threads=13": dict(threads=13),
        "threads=14": dict(threads=14),
        **{f"split {x}": dict(quantize_on="split", host_share=x) for x in (0.1, 0.2, 0.3, 0.4, 0.5)},
        "split 0.2 threads=14": dict(quantize_on="split", host_share=0.2, threads=14),
        "mmap split 0.2": dict(method="mmap", quantize_on="split", host_share=0.2),
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
        variants = {k: variants[k] if k in variants else parse_variant(k) for k in args.variants.split(",")}
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
        json.dump({"gpu": torch.cuda.get_device_name(0), "checkpoint_bytes": ckpt.nbytes, "consumer_costs": costs,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
