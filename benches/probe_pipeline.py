"""Diagnostics for the load pipeline on a GPU machine: the host-to-device ceiling, the CPU
cost of each step of the engine's consumer thread (:func:`consumer_costs`), then
``load_quantized`` under several settings with its phase breakdown. Prints a table and
writes JSON (``--out``). Not a benchmark against peers: see bench_load.py for that."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import fastfp8
import fastfp8.engine
import torch
from peers import SETTLE_S
from timing import per_call_us


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
        return per_call_us(fn, calls, warmup=1)[0]

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
    host_share=0.4 threads=14"`` (numbers parsed, ``None`` is None, anything else a string);
    ``engine.NAME=value`` sets a constant of :mod:`fastfp8.engine` for the variant's loads
    (``engine.RESERVE_OUTPUTS=0``, ``engine.DRIVER_COPY=0``)."""
    kw = {}
    for tok in name.split():
        key, sep, val = tok.partition("=")
        if not sep:
            raise SystemExit(f"variant {name!r}: {tok!r} is not key=value")
        if key.startswith("engine.") and not hasattr(fastfp8.engine, key[len("engine."):]):
            raise SystemExit(f"variant {name!r}: fastfp8.engine has no {key[len('engine.'):]}")
        for conv in (int, float):
            try:
                kw[key] = conv(val)
                break
            except ValueError:
                pass
        else:
            kw[key] = None if val == "None" else val
    return kw


@contextlib.contextmanager
def engine_constants(kw: dict):
    """The ``engine.NAME`` entries of ``kw`` set on :mod:`fastfp8.engine` meanwhile; yields
    the rest (``load_quantized``'s keywords)."""
    consts = {k[len("engine."):]: v for k, v in kw.items() if k.startswith("engine.")}
    saved = {k: getattr(fastfp8.engine, k) for k in consts}
    for k, v in consts.items():
        setattr(fastfp8.engine, k, v)
    try:
        yield {k: v for k, v in kw.items() if not k.startswith("engine.")}
    finally:
        for k, v in saved.items():
            setattr(fastfp8.engine, k, v)


_FIRST_LOAD = """
import json, sys, time, torch, fastfp8
from fastfp8.quant import quantize_channelwise
torch.cuda.init(); torch.empty(1, device="cuda")  # the CUDA context is not the load's
out = []
if sys.argv[2] == "launches":  # the first quantization launch of each Llama-3-8B shape, then the next
    for shape in [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (4096, 4096)]:
        w = torch.randn(shape, device="cuda").to(torch.bfloat16)
        q = torch.empty(shape, dtype=torch.float8_e4m3fn, device="cuda")
        s = torch.empty(shape[0], 1, dtype=torch.bfloat16, device="cuda")
        ms = []
        for _ in range(2):
            torch.cuda.synchronize(); t = time.perf_counter()
            quantize_channelwise(w, out=q, scale_out=s, check_finite=False)
            ms.append((time.perf_counter() - t) * 1e3)
        out.append({"shape": shape, "first_ms": ms[0], "next_ms": ms[1]})
else:
    for _ in range(2):
        s = fastfp8.load_quantized(sys.argv[1], device="cuda", progress=False).stats
        out.append({"seconds": s.seconds, "phases": s.phases})
print(json.dumps(out))
"""


def first_loads(ckpt: str, nbytes: int, envs: list[str]) -> list[dict]:
    """A process's first load and its second, in a fresh process per environment (what a
    server sees: the staging ring pinned, the kernels loaded, all for the first time); and
    in one more fresh process, the first quantization launch of each Llama-3-8B shape."""
    import os
    import subprocess
    import sys

    def fresh(env: str, what: str):
        extra = dict(kv.split("=", 1) for kv in env.split() if "=" in kv)
        run = subprocess.run([sys.executable, "-c", _FIRST_LOAD, ckpt, what], env={**os.environ, **extra},
                             capture_output=True, text=True, timeout=300)
        if run.returncode:
            print(f"first {what} [{env}] failed: {run.stderr[-2000:]}", flush=True)
            return None
        return json.loads(run.stdout.strip().splitlines()[-1])

    launches = fresh(envs[0], "launches")
    rows = [{"variant": "first quantization launches", "launches": launches}] if launches else []
    for r in launches or []:
        print(f"first launch {tuple(r['shape'])}: {r['first_ms']:.1f} ms, then {r['next_ms']:.2f} ms", flush=True)
    for env in envs:
        if (got := fresh(env, "loads")) is None:
            continue
        first, second = got
        for which, r in (("first", first), ("second", second)):
            rows.append({"variant": f"{which} load [{env}]", "seconds": r["seconds"],
                         "gbps": nbytes / r["seconds"] / 1e9, "phases": r["phases"]})
            ph = " ".join(f"{k}={v * 1000:.0f}ms" for k, v in r["phases"].items())
            print(f"{which} load [{env}] {r['seconds']:.3f} s {nbytes / r['seconds'] / 1e9:6.2f} GB/s  {ph}",
                  flush=True)
    return rows


def timeline_summary(timeline) -> dict:
    """A load's chunks through the ring (``LoadStats.timeline``), in ms: how long the threads
    took to read one (allocated -> read), how long a read one waited to be delivered (read ->
    delivered: behind a late chunk at the ring's head, or the consumer busy), how long the
    consumer held one (delivered -> released: its copy queued and done); ``out_of_order``:
    the mean number of later chunks already read when a chunk's own read finished (a chunk
    late at the head while others behind it wait)."""
    import numpy as np

    t = np.array([row[2:] for row in timeline if row[1] and row[5]], dtype=np.float64) / 1e6
    if not len(t):
        return {}
    read, wait, hold = t[:, 1] - t[:, 0], t[:, 2] - t[:, 1], t[:, 3] - t[:, 2]
    done = t[:, 1]
    later_done = [(done[i + 1:] < done[i]).sum() for i in range(len(done))]

    def q(x):
        return [round(float(np.percentile(x, p)), 3) for p in (50, 90, 99)]

    return {"chunks": len(t), "read_ms_p50_90_99": q(read), "wait_ms_p50_90_99": q(wait),
            "hold_ms_p50_90_99": q(hold), "out_of_order": round(float(np.mean(later_done)), 2),
            "wait_ms_sum": round(float(wait.sum()), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--out", default="probe.json")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--variants", default="", help="comma-separated names from the table, or load_quantized "
                    "keywords (\"quantize_on=split host_share=0.4\")")
    ap.add_argument("--empty-cache", action="store_true", help="free cached GPU memory before each load")
    ap.add_argument("--settle-s", type=float, default=SETTLE_S, help="pause after --empty-cache (peers.SETTLE_S, "
                    "bench_load.py's --settle-s: copies right after a free run slow)")
    ap.add_argument("--timeline", action="store_true", help="each load's chunks through the ring "
                    "(engine.TIMELINE): how long they took to read, waited read before delivery, were held")
    ap.add_argument("--first-load", default="", help="comma-separated environments (\"default\", "
                    "\"FASTFP8_PINNED=thp\") to time a process's first and second load in, each in a fresh process")
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
    if args.first_load:
        rows += first_loads(args.ckpt, ckpt.nbytes, args.first_load.split(","))
    fastfp8.load_quantized(ckpt, **base)  # warm: kernels, pinned pool, page cache
    # round robin (each round loads every variant once): drift over the run (the page cache,
    # the clocks, a neighbour) falls on every variant alike
    if args.timeline:
        fastfp8.engine.TIMELINE = True
    timelines: dict[str, list[dict]] = {name: [] for name in variants}
    raw: dict[str, list] = {name: [] for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    phases: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeat):
        for name, kw in variants.items():
            torch.cuda.synchronize()
            if args.empty_cache:
                torch.cuda.empty_cache()
                time.sleep(args.settle_s)
            with engine_constants(kw) as load_kw:
                out = fastfp8.load_quantized(ckpt, **base, **load_kw)
            times[name].append(out.stats.seconds)
            phases[name].append(out.stats.phases)
            if out.stats.timeline:
                timelines[name].append(timeline_summary(out.stats.timeline))
                raw[name].append([list(r) for r in out.stats.timeline])
            del out
    for name in variants:
        ts = times[name]
        i = ts.index(statistics.median(ts))
        row = {"variant": name, "seconds": ts[i], "gbps": ckpt.nbytes / ts[i] / 1e9,
               "phases": phases[name][i], "times": ts}
        if timelines[name]:
            row["timeline"] = timelines[name][i]
            row["timeline_raw"] = raw[name][i]  # the median load's chunks, as LoadStats.timeline
        rows.append(row)
        ph = " ".join(f"{k}={v * 1000:.0f}ms" for k, v in phases[name][i].items())
        print(f"{name:24s} {ts[i]:.3f} s {row['gbps']:6.2f} GB/s  {ph}", flush=True)
        if "timeline" in row:
            print("    timeline: " + " ".join(f"{k}={v}" for k, v in row["timeline"].items()), flush=True)
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(0), "checkpoint_bytes": ckpt.nbytes, "consumer_costs": costs,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
