"""Load benchmark: fastfp8 against the peer loaders, same checkpoint, same run.

Every path ends with every quantizable weight as FP8 e4m3 per-output-channel on the GPU
(the peers use fastfp8's own quantization kernel after loading, so only loading differs).
Each (loader, condition) runs in a fresh subprocess, so that peak GPU memory and host RSS
growth are its own. Conditions: ``warm`` (page cache holds the checkpoint; median of
``--repeat`` runs) and ``cold`` (the checkpoint's pages evicted before each run; median of
``--cold-repeat``). ``--round-robin`` runs the repeats one load a process, loader after loader,
round after round: a cold load is bound by the disk, whose rate drifts over a run.

fastfp8 runs with its defaults (``fastfp8``: on one GPU the reader threads decide weight
by weight, ``"adaptive"``), with the device quantizing every weight (``fastfp8_device``;
``fastfp8_mmap_device`` read with ``mmap``), the reader threads quantizing every weight they
can, in place in the page cache (``fastfp8_mmap_host``, what ``quantize_on="host"`` reads
with) or from a copy (``fastfp8_host_pread``), a fixed split at
``host_quant.DEFAULT_HOST_SHARE`` (``fastfp8_split``), the adaptive choice read with
``mmap`` (``fastfp8_mmap_adaptive``), with a 256 MiB ring of 16 MiB chunks
(``fastfp8_ring256``), cold with ``pread`` or ``O_DIRECT`` (``fastfp8_pread``,
``fastfp8_direct``, by ``--loaders``), and, for ``--sweep-threads``, at several thread
counts (``fastfp8_t<n>[_host]``). The same run measures the ceilings: pinned host-to-device copies
(``h2d_pinned_gbps``), the disk's own direct read of the checkpoint's files at several
queue depths (``disk_direct_gbps``: the best; cold runs are compared with it), and one
core's host quantization rate (``host_quant_core_gbps``, and its code path,
``host_quant_isa``), and, after the warm loads, what
fastfp8's reader threads alone deliver with the load's own plan, pread or mmap, with and
without host quantization (``readers_only_gbps``: :func:`readers_gbps`).

    python benches/bench_load.py CKPT_DIR --out benches/results/load_h100.json

writes the JSON (headline keys plus every row) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: warm, round robin: three loads of each (a loader's three cost 20 - 30 s of a 10-minute call:
#: with five, session 21's run passed the stage's 555 s in its disk read; others by --loaders,
#: e.g. fastfp8_torchpin and fastfp8_host_pread, the default list until then)
FASTFP8 = ["fastfp8", "fastfp8_adaptive", "fastfp8_device"]
#: cold: fastfp8's defaults (method "auto": mmap when cold); fastfp8_pread and fastfp8_direct
#: (O_DIRECT) by --loaders: three loads of each of them, round robin, cost a minute of a 10-minute call
COLD_FASTFP8 = ["fastfp8"]
#: fastfp8 variants: loader name -> load_quantized options
VARIANTS = {"fastfp8": {}, "fastfp8_host": {"quantize_on": "host"}, "fastfp8_device": {"quantize_on": "device"},
            # ready chunks of a tensor merged into deliveries of up to a quarter of the ring
            # (fastfp8.engine.MERGE_SHARE = 4), the default until 2026-11-30
            "fastfp8_merge": {"_merge_share": 4},
            # quantize_on="adaptive" by the balance of the threads' work and the bus's
            # (fastfp8.engine.ADAPTIVE_BALANCE = True), not the default
            "fastfp8_adaptive_balance": {"_adaptive_balance": True},
            # a fixed split at host_quant.DEFAULT_HOST_SHARE
            "fastfp8_split": {"quantize_on": "split"}, "fastfp8_adaptive": {"quantize_on": "adaptive"},
            "fastfp8_mmap": {"method": "mmap"},
            "fastfp8_pread": {"method": "pread"}, "fastfp8_direct": {"method": "direct"},
            # host quantization straight from the page cache (no copy into a scratch buffer;
            # what method="auto" reads with for quantize_on="host" on a GPU)
            "fastfp8_mmap_host": {"method": "mmap", "quantize_on": "host"},
            # host quantization from a copy into each thread's scratch buffer
            "fastfp8_host_pread": {"method": "pread", "quantize_on": "host"},
            "fastfp8_mmap_adaptive": {"method": "mmap", "quantize_on": "adaptive"},
            "fastfp8_mmap_device": {"method": "mmap", "quantize_on": "device"},
            # a ring twice the default, chunks of 16 MiB: half the chunks for the consumer thread
            "fastfp8_ring256": {"memory_budget": "256MiB", "chunk_bytes": "16MiB"},
            # warm, the default's ring until session 18 (a 300 MiB L3; now 64 MiB of 4 MiB chunks)
            "fastfp8_ring128": {"memory_budget": "128MiB", "chunk_bytes": "8MiB"},
            # the ring from torch's pinned allocation (FASTFP8_PINNED=cuda), the default until
            # session 19 (now transparent huge pages registered with CUDA: a warm load's setup
            # is mostly its ring's pinning)
            "fastfp8_torchpin": {"_pinned": "cuda"},
            # every job at its place in the plan (fastfp8.engine.BACKGROUND off): the kept
            # tensors not spread between the weights' chunks, the default until session 21
            "fastfp8_inorder": {"_background": False}}


def fastfp8_options(loader: str) -> dict:
    if loader in VARIANTS:
        return dict(VARIANTS[loader])
    if loader.startswith("fastfp8:"):  # fastfp8:key=value:key=value (load_quantized keywords)
        kw = {}
        for tok in loader.split(":")[1:]:
            key, sep, val = tok.partition("=")
            if not sep or not key:
                raise ValueError(f"loader {loader!r}: {tok!r} is not key=value")
            kw[key] = int(val) if val.isdigit() else val
        return kw
    if loader.startswith("fastfp8_t"):  # fastfp8_t<threads>[_host]
        n, _, rest = loader[len("fastfp8_t"):].partition("_")
        return {"threads": int(n), **({"quantize_on": "host"} if rest == "host" else {})}
    raise ValueError(f"unknown fastfp8 variant {loader!r}")
WARM_PEERS = ["safetensors_load_file", "safetensors_safe_open", "runai", "fastsafetensors_buffered",
              "instanttensor_buffered"]
COLD_PEERS = ["safetensors_safe_open", "runai", "fastsafetensors", "instanttensor_direct"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_hwm() -> int | None:
    """The kernel's peak-RSS mark of this process (``VmHWM``), or None where unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class RssPeak:
    """Peak resident set size during a block: the kernel's own mark (``VmHWM``, reset on
    entry through ``/proc/self/clear_refs``), exact and with no thread beside the loader;
    where that cannot be reset, sampled every millisecond in a thread."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._t = None
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
            self._hwm = _rss_hwm() is not None
        except OSError:
            self._hwm = False
        if self._hwm:
            return self
        self._stop = threading.Event()

        def loop():
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_bytes())
                time.sleep(0.001)

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        if self._t is not None:
            self._stop.set()
            self._t.join()
        self.peak = max(self.peak, rss_bytes(), (_rss_hwm() or 0) if self._hwm else 0)


def worker(args) -> dict:
    """One loader, one condition, ``repeat`` runs, in this process."""
    import gc

    import fastfp8.engine  # binds `fastfp8` too; MERGE_SHARE is set per variant
    import peers
    import torch
    from fastfp8.layouts import layout_for
    from fastfp8.quant import quantize_channelwise

    dev = torch.device("cuda", 0)
    torch.cuda.init()
    # Compile and warm the kernel outside the timed region (every path uses it).
    for dt in (torch.bfloat16,):
        quantize_channelwise(torch.randn(256, 4096, device=dev).to(dt), check_finite=False)
    torch.cuda.synchronize()
    ckpt = fastfp8.open_checkpoint(args.ckpt)
    paths = [str(p) for p in ckpt.shards]
    nbytes = ckpt.nbytes
    layout = layout_for(args.ckpt)
    kinds = {t.source.name: t.kind for t in layout.targets(ckpt)}
    in_out = layout.arch is not None and layout.arch.fused == "in_out"

    def should_quantize(name, t):
        return kinds.get(name, "copy") != "copy"

    def quantize(t):
        if t.dim() == 3 and in_out:  # fused experts [E, in, out] -> [E, out, in] on the device
            t = t.transpose(1, 2).contiguous()
        return quantize_channelwise(t, check_finite=False)

    def run_once():
        if args.loader.startswith("fastfp8"):
            kw = {"memory_budget": args.budget, "threads": args.threads, **fastfp8_options(args.loader)}
            if "_merge_share" in kw:
                fastfp8.engine.MERGE_SHARE = kw.pop("_merge_share")
            if "_adaptive_balance" in kw:
                fastfp8.engine.ADAPTIVE_BALANCE = kw.pop("_adaptive_balance")
            if "_background" in kw:
                fastfp8.engine.BACKGROUND = kw.pop("_background")
            if "_pinned" in kw:  # how the ring is page-locked (fastfp8.pinned._pinned)
                os.environ["FASTFP8_PINNED"] = kw.pop("_pinned")
            return fastfp8.load_quantized(ckpt, device=dev, progress=False, **kw)
        return peers.PEERS[args.loader](paths, quantize, should_quantize, str(dev))

    runs = []
    for i in range(args.repeat):
        if args.cond == "cold":
            peers.evict_page_cache(paths)
        gc.collect()
        torch.cuda.empty_cache()
        time.sleep(args.settle_s)  # the driver's own work after the free (see --settle-s)
        torch.cuda.reset_peak_memory_stats(dev)
        base_gpu = torch.cuda.memory_allocated(dev)
        with RssPeak() as rss, peers._PeakSampler(dev, period_s=0.005) as dsamp:
            t0 = time.perf_counter()
            out = run_once()
            torch.cuda.synchronize(dev)
            secs = time.perf_counter() - t0
        final = sum(t.numel() * t.element_size() for t in out.values())
        row = {
            "run": i, "seconds": secs, "gbps": nbytes / secs / 1e9,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(dev) - base_gpu,
            "device_peak_bytes": dsamp.peak - dsamp.base,
            "final_bytes": final, "host_rss_growth_bytes": rss.peak - rss.base,
            "tensors": len(out),
        }
        if args.loader.startswith("fastfp8"):
            row["stats"] = {k: v for k, v in vars(out.stats).items() if k != "non_finite"}
        runs.append(row)
        del out
    return {"loader": args.loader, "cond": args.cond, "checkpoint_bytes": nbytes, "runs": runs,
            "info": {k: str(v) for k, v in peers.LAST_INFO.items()}}


def run_worker(ckpt, loader, cond, repeat, budget, threads, timeout, settle_s) -> dict:
    cmd = [sys.executable, __file__, ckpt, "--worker", "--loader", loader, "--cond", cond,
           "--repeat", str(repeat), "--settle-s", str(settle_s)]
    if budget:
        cmd += ["--budget", budget]
    if threads:
        cmd += ["--threads", str(threads)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"loader": loader, "cond": cond, "error": f"timed out after {timeout} s"}
    last = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not last:
        return {"loader": loader, "cond": cond, "error": (p.stderr or p.stdout)[-1500:]}
    return json.loads(last[-1])


def measure(args, loaders: list[str], cond: str, repeat: int):
    """Yields ``(loader, result)``: each loader's ``repeat`` runs in one worker process, or
    with ``--round-robin`` one run a process, loader after loader, ``repeat`` rounds (a disk
    or host whose speed drifts over the run weighs on every loader alike); the result then
    holds every round's run, and the errors of rounds that failed."""
    def run(loader, n):
        return run_worker(args.ckpt, loader, cond, n, args.budget, args.threads, args.timeout, args.settle_s)

    if not args.round_robin or repeat <= 1:
        for loader in loaders:
            yield loader, run(loader, repeat)
        return
    merged: dict[str, dict] = {}
    skipped, last_round = 0, 0.0
    for i in range(repeat):
        t_round = time.monotonic()
        if i and args.deadline_s and t_round - args.t0 + last_round > args.deadline_s:
            # another round would run past the deadline: keep the rounds done, say so
            skipped = repeat - i
            print(f"{cond}: {skipped} round(s) skipped, another would pass the {args.deadline_s:.0f} s "
                  f"deadline ({t_round - args.t0:.0f} s in, a round {last_round:.0f} s)", flush=True)
            break
        for loader in loaders:
            res = run(loader, 1)
            into = merged.setdefault(loader, {"loader": loader, "cond": cond, "runs": [], "round_robin": True})
            if res.get("runs"):
                into.update({k: v for k, v in res.items() if k != "runs"})
                into["runs"] += [dict(r, run=len(into["runs"])) for r in res["runs"]]
            else:
                into.setdefault("errors", []).append(res.get("error", "no runs"))
        last_round = time.monotonic() - t_round
    for loader in loaders:
        res = merged[loader]
        if skipped:
            res["rounds_skipped"] = skipped
        if not res["runs"]:
            res["error"] = res["errors"][-1]
        yield loader, res


def summarize(res: dict) -> dict:
    runs = res.get("runs") or []
    if not runs:
        return {}
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "gbps": statistics.median(r["gbps"] for r in runs),
        "peak_gpu_bytes": max(r["peak_gpu_bytes"] for r in runs),
        "device_peak_bytes": max(r["device_peak_bytes"] for r in runs),
        "host_rss_growth_bytes": max(r["host_rss_growth_bytes"] for r in runs),
        "final_bytes": runs[0]["final_bytes"],
    }


def largest_tensor(ckpt_dir: str) -> int:
    import fastfp8

    return max(t.nbytes for t in fastfp8.open_checkpoint(ckpt_dir).tensors.values())


def host_cpu() -> str:
    """The CPU model and core count, from /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    models = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    return f"{models[0]} x {len(models)}" if models else "unknown"


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True)
    except FileNotFoundError:  # no NVIDIA driver (a CPU run of the bookkeeping)
        return "unknown"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"


def h2d_pinned_gbps(nbytes: int = 1 << 30, repeat: int = 5) -> float | None:
    """Pinned host -> device copy rate (median of ``repeat`` copies of ``nbytes``); None
    without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeat + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times[1:]) / 1e9


def disk_direct(paths: list[str], depth: int, limit: int, block: int = 4 << 20) -> float:
    """The disk's own rate: ``depth`` threads reading the files' blocks with ``O_DIRECT``
    (each thread one request in flight), at most ``limit`` bytes, page cache evicted first."""
    import mmap

    import peers

    peers.evict_page_cache(paths)
    tasks = []
    for p in paths:
        size = os.path.getsize(p)
        tasks += [(p, off, min(block, size - off)) for off in range(0, size, block)]
    # spread over every file, in file order within each thread's share
    step = max(1, len(tasks) * block // max(limit, 1))
    tasks = tasks[::step]
    lock = threading.Lock()
    it = iter(tasks)
    done = [0]

    def work():
        buf = mmap.mmap(-1, block)
        fds = {}
        try:
            while True:
                with lock:
                    t = next(it, None)
                if t is None:
                    return
                p, off, n = t
                fd = fds.get(p)
                if fd is None:
                    fd = fds[p] = os.open(p, os.O_RDONLY | os.O_DIRECT)
                got = os.preadv(fd, [memoryview(buf)[: (n + 4095) // 4096 * 4096]], off)
                with lock:
                    done[0] += min(got, n)
        finally:
            for fd in fds.values():
                os.close(fd)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(depth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (time.perf_counter() - t0) / 1e9


#: readers-alone ceilings: name -> LoadOptions fields (plus the run's budget and threads)
READER_CEILINGS = {"pread": {"method": "pread", "quantize_on": "device"},
                   "pread_host": {"method": "pread", "quantize_on": "host"},
                   "mmap_host": {"method": "mmap", "quantize_on": "host"}}


def readers_gbps(ckpt_dir: str, repeat: int = 3, **fields) -> float:
    """What fastfp8's reader threads alone deliver: the load's own plan and reader (the same
    items, ring, threads and host quantization as ``load_quantized`` with ``fields``), every
    delivery released as soon as it comes, no copy and no kernel. Warm page cache; GB/s of
    checkpoint bytes, median of ``repeat``. Set beside the loads, it says whether the readers
    or the consumer and the bus set a load's pace."""
    import fastfp8
    import torch
    from fastfp8 import engine
    from fastfp8.host_quant import resolve_quantize_on
    from fastfp8.options import LoadOptions
    from fastfp8.plan import make_plan
    from fastfp8.quant import resolve_rounding

    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    ckpt = fastfp8.open_checkpoint(ckpt_dir)
    options = resolve_quantize_on(LoadOptions.make(**fields), dev)
    options = options.replace(method=engine.resolve_method(ckpt, options, dev))
    plan = make_plan(ckpt, options)
    rounding = resolve_rounding(options.rounding, dev)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        reader, _, _ = engine.open_reader(ckpt, plan, options, dev, rounding)
        try:
            while (d := reader.next()) is not None:
                if d[3]:
                    reader.release(d[2], d[3])
        finally:
            reader.close()
        times.append(time.perf_counter() - t)
    return plan.nbytes / statistics.median(times) / 1e9


def readers_ceilings(ckpt_dir: str, budget: str | None, threads: list[int | None]) -> dict[str, float]:
    """:func:`readers_gbps` of every :data:`READER_CEILINGS` entry at each thread count
    (None: the default), keyed ``name`` or ``name_t<threads>``."""
    out = {}
    for n in threads:
        for name, fields in READER_CEILINGS.items():
            key = name if n is None else f"{name}_t{n}"
            out[key] = readers_gbps(ckpt_dir, memory_budget=budget, threads=n, **fields)
    return out


def host_quant_core_gbps(nbytes: int = 8 << 20, cols: int = 4096) -> float:
    """One core's host quantization rate, in bf16 bytes per second (best of 10 calls on
    ``nbytes``, which stay in the cache as the reader's per-thread pieces do)."""
    import torch
    from fastfp8 import _native

    src = torch.randn(nbytes // 2, dtype=torch.float32).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        _native.quantize_rows(src, "BF16", cols, "fp32")
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def markdown(doc: dict) -> str:
    gib = 2**30
    lines = [
        f"Load + FP8 quantize of `{doc['checkpoint']}` ({doc['checkpoint_bytes'] / gib:.2f} GiB bf16), "
        f"{doc['gpu']}, {doc['date']}; median of {doc['repeat']} warm runs, cold = page cache evicted.",
        "",
    ]
    topo = doc.get("host_topology")
    if topo:
        lines += [f"Host: {doc.get('host_cpu', '?')}; {topo['cpus']} CPUs, {topo['cores']} cores, "
                  f"{topo['sockets']} socket(s), {topo['numa_nodes']} NUMA node(s).", ""]
    lines += [
        "| loader | cond | s | GB/s | peak GPU GiB | host RSS growth GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["rows"]:
        s = r.get("summary")
        if not s:
            lines.append(f"| {r['loader']} | {r['cond']} | failed | | | |")
            continue
        cut = f" ({len(r['runs'])} runs, rounds cut by the deadline)" if r.get("rounds_skipped") else ""
        name = r["loader"] + cut
        lines.append(f"| {name} | {r['cond']} | {s['seconds']:.2f} | {s['gbps']:.2f} | "
                     f"{s['peak_gpu_bytes'] / gib:.2f} | {s['host_rss_growth_bytes'] / gib:.2f} |")
    ceilings = [("pinned host -> device copy", doc.get("h2d_pinned_gbps")),
                ("disk, O_DIRECT, best queue depth", doc.get("disk_direct_gbps")),
                (f"host quantization, one core (bf16 in, {doc.get('host_quant_isa', '?')})",
                 doc.get("host_quant_core_gbps"))]
    readers = doc.get("readers_only_gbps") or {}
    ceilings += [(f"fastfp8's readers alone, {k} (no device work)", v) for k, v in readers.items()
                 if isinstance(v, float)]
    lines += ["", "| ceiling | GB/s |", "| --- | ---: |"]
    lines += [f"| {name} | {v:.2f} |" for name, v in ceilings if v]
    return "\n".join(lines) + "\n"


def targets(doc: dict) -> dict:
    """Issue 15's targets: value, bound, met (None where a figure is missing)."""

    def t(value, bound):
        ok = None if value is None or bound is None else value >= bound
        return {"value": value, "bound": bound, "met": ok}

    def ratio(a, b):
        return a / b if a and b else None

    out = {
        "warm_gbps_ge_55": t(doc.get("fastfp8_warm_gbps"), 55.0),
        "warm_ge_1.25x_best_peer": t(ratio(doc.get("fastfp8_warm_gbps"), doc.get("best_peer_warm_gbps")), 1.25),
        "cold_ge_best_peer": t(ratio(doc.get("fastfp8_cold_gbps"), doc.get("best_peer_cold_gbps")), 1.0),
        "cold_ge_0.95x_disk": t(ratio(doc.get("fastfp8_cold_gbps"), doc.get("disk_direct_gbps")), 0.95),
    }
    if "fastfp8_peak_gpu_bytes" in doc:
        bound = doc["final_bytes"] + 2 * doc["largest_tensor_bytes"]
        out["peak_gpu_le_final_plus_2_largest"] = {"value": doc["fastfp8_peak_gpu_bytes"], "bound": bound,
                                                   "met": doc["fastfp8_peak_gpu_bytes"] <= bound}
        # each condition against the ring it used (warm and cold may resolve to different rings)
        rss = doc.get("host_rss_growth_by_cond") or {"all": doc["host_rss_growth_bytes"]}
        budget = doc.get("memory_budget_by_cond") or {c: doc["memory_budget_bytes"] for c in rss}
        worst = max(rss, key=lambda c: rss[c] - budget[c])
        bound = budget[worst] + (256 << 20)
        out["rss_growth_le_budget_plus_256MiB"] = {"value": rss[worst], "bound": bound, "cond": worst,
                                                   "met": rss[worst] <= bound}
    return out


def measure_ceilings(doc: dict, args, ckpt) -> None:
    """The run's ceilings into ``doc``: the disk's direct read by queue depth (when cold loads
    are asked for; it evicts the page cache), pinned host-to-device and one core's host
    quantization. Measured before the cold loads, so that a run cut short still has them."""
    if "cold" in args.conds.split(","):
        from fastfp8.units import parse_bytes

        paths = [str(p) for p in ckpt.shards]
        depths = {int(d): disk_direct(paths, int(d), parse_bytes(args.disk_bytes))
                  for d in args.disk_depths.split(",") if d}
        doc["disk_direct_by_depth_gbps"] = depths
        doc["disk_direct_gbps"] = max(depths.values()) if depths else None
        print(f"disk O_DIRECT by queue depth: {depths}", flush=True)
    doc["h2d_pinned_gbps"] = h2d_pinned_gbps()
    doc["host_quant_core_gbps"] = host_quant_core_gbps()
    from fastfp8 import _native

    doc["host_quant_isa"] = _native.quant_isa()
    print(f"pinned H2D {doc['h2d_pinned_gbps']} GB/s, host quantization {doc['host_quant_core_gbps']:.2f} "
          f"GB/s per core ({doc['host_quant_isa']})", flush=True)


def write_results(doc: dict, out: str) -> None:
    """The headline figures and issue 15's targets from the rows so far, written to ``out``
    (JSON) and its ``.md``: called after each condition, so a run cut short leaves the
    figures it has."""

    from fastfp8.host import topology

    def best(cond, names):
        vals = [(r["summary"]["gbps"], r["loader"]) for r in doc["rows"]
                if r["cond"] == cond and r["loader"] in names and r.get("summary")]
        return max(vals) if vals else (None, None)

    peer_names = set(WARM_PEERS) | set(COLD_PEERS)
    ff_warm = best("warm", {"fastfp8"})[0]
    doc.update({
        "fastfp8_warm_gbps": ff_warm,
        "fastfp8_mmap_warm_gbps": best("warm", {"fastfp8_mmap"})[0],
        "fastfp8_mmap_cold_gbps": best("cold", {"fastfp8_mmap"})[0],
        "fastfp8_host_warm_gbps": best("warm", {"fastfp8_host"})[0],
        "fastfp8_device_warm_gbps": best("warm", {"fastfp8_device"})[0],
        "fastfp8_split_warm_gbps": best("warm", {"fastfp8_split"})[0],
        "fastfp8_adaptive_warm_gbps": best("warm", {"fastfp8_adaptive"})[0],
        "fastfp8_merge_warm_gbps": best("warm", {"fastfp8_merge"})[0],
        "fastfp8_adaptive_balance_warm_gbps": best("warm", {"fastfp8_adaptive_balance"})[0],
        "fastfp8_mmap_host_warm_gbps": best("warm", {"fastfp8_mmap_host"})[0],
        "fastfp8_host_pread_warm_gbps": best("warm", {"fastfp8_host_pread"})[0],
        "fastfp8_mmap_adaptive_warm_gbps": best("warm", {"fastfp8_mmap_adaptive"})[0],
        "fastfp8_mmap_device_warm_gbps": best("warm", {"fastfp8_mmap_device"})[0],
        "fastfp8_ring256_warm_gbps": best("warm", {"fastfp8_ring256"})[0],
        "fastfp8_direct_cold_gbps": best("cold", {"fastfp8_direct"})[0],
        "best_peer_warm_gbps": best("warm", peer_names)[0],
        "best_peer_warm": best("warm", peer_names)[1],
        "best_peer": best("warm", peer_names)[1],
        "best_peer_cold": best("cold", peer_names)[1],
        "safetensors_warm_gbps": best("warm", {"safetensors_load_file", "safetensors_safe_open"})[0],
        "fastfp8_cold_gbps": best("cold", {"fastfp8"})[0],
        "best_peer_cold_gbps": best("cold", peer_names)[0],
        "host_cpu": host_cpu(),
        "host_topology": topology(),
    })
    ff = [r for r in doc["rows"] if r["loader"] == "fastfp8" and r.get("summary")]
    if ff:
        doc["fastfp8_peak_gpu_bytes"] = max(r["summary"]["peak_gpu_bytes"] for r in ff)
        doc["final_bytes"] = ff[0]["summary"]["final_bytes"]
        doc["host_rss_growth_bytes"] = max(r["summary"]["host_rss_growth_bytes"] for r in ff)
        # the ring each load used (it follows where the load quantizes: LoadOptions.staged)
        staged = [(r["runs"][0]["stats"]["memory_budget"], r["runs"][0]["stats"]["chunk_bytes"]) for r in ff]
        doc["memory_budget_bytes"], doc["chunk_bytes"] = max(staged)
        doc["memory_budget_by_cond"] = {r["cond"]: b for r, (b, _) in zip(ff, staged, strict=True)}
        doc["host_rss_growth_by_cond"] = {r["cond"]: r["summary"]["host_rss_growth_bytes"] for r in ff}
    doc["targets"] = targets(doc)
    path = Path(out)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(doc))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--out", default=str(HERE / "results" / "load_h100.json"))
    ap.add_argument("--conds", default="warm,cold")
    ap.add_argument("--loaders", default="", help="comma list (default: fastfp8 + every available peer)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cold-repeat", type=int, default=1)
    ap.add_argument("--round-robin", action="store_true",
                    help="with repeats: one run a process, loader after loader, round after round (not a "
                    "loader's runs back to back), so that a drifting disk or host weighs on all alike")
    ap.add_argument("--budget", default=None, help="fastfp8's memory_budget (default: its own, from the host)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="with --round-robin: start no round that would end past this many seconds from "
                    "the start (judged by the round before); the rounds skipped are recorded")
    ap.add_argument("--sweep-threads", default="", help="comma list: also run fastfp8 (host and device "
                    "quantization) warm at these thread counts")
    ap.add_argument("--disk-depths", default="8,32,64", help="queue depths of the direct disk read")
    ap.add_argument("--disk-bytes", default="4GiB", help="bytes of the checkpoint read per disk depth")
    ap.add_argument("--no-readers-ceiling", action="store_true",
                    help="skip the readers-alone ceilings (readers_only_gbps) after the warm loads")
    ap.add_argument("--no-warmup-load", action="store_true",
                    help="do not run (and discard) one load of fastfp8's defaults before the warm rows")
    ap.add_argument("--settle-s", type=float, default=None,
                    help="pause after emptying torch's cache before each timed load, every loader alike "
                    "(default: peers.SETTLE_S, 0.5 s): host-to-device copies issued right after device memory "
                    "is freed ran at 22 - 35 GB/s for their first 10 ms on an H200 (54 after a pause; "
                    "benches/NOTES.md, session 17), a cost a process's own load does not pay")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--loader", help=argparse.SUPPRESS)
    ap.add_argument("--cond", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.settle_s is None:
        import peers

        args.settle_s = peers.SETTLE_S
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import peers

    avail = set(peers.available_peers("cuda"))
    doc = {"gpu": gpu_name(), "date": datetime.date.today().isoformat(), "checkpoint": args.ckpt,
           "repeat": args.repeat, "cold_repeat": args.cold_repeat, "round_robin": args.round_robin,
           "memory_budget": args.budget, "settle_s": args.settle_s, "rows": []}
    import fastfp8

    args.t0 = time.monotonic()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    ckpt = fastfp8.open_checkpoint(args.ckpt)
    doc["checkpoint_bytes"] = ckpt.nbytes
    doc["largest_tensor_bytes"] = largest_tensor(args.ckpt)
    wanted = [x for x in args.loaders.split(",") if x]
    for cond in args.conds.split(","):
        if cond == "warm":
            loaders = wanted or FASTFP8 + [p for p in WARM_PEERS if p in avail]
            for n in filter(None, args.sweep_threads.split(",")):
                loaders += [f"fastfp8_t{n}", f"fastfp8_t{n}_host"]
        else:
            loaders = wanted or COLD_FASTFP8 + [p for p in COLD_PEERS if p in avail]
            if "host_quant_isa" not in doc:
                measure_ceilings(doc, args, ckpt)
        if cond == "warm":  # fill the page cache
            for p in ckpt.shards:
                with open(p, "rb") as f:
                    while f.read(64 << 20):
                        pass
            if not args.no_warmup_load:
                # one load thrown away, so that the first row is not also the machine's first
                # load (2026-11-30, a fresh H200: fastfp8's defaults, first row, 38.9 GB/s
                # against 47.8 for the same options in the next process)
                run_worker(args.ckpt, "fastfp8", cond, 1, args.budget, args.threads, args.timeout, args.settle_s)
        repeat = args.repeat if cond == "warm" else args.cold_repeat
        for loader, res in measure(args, loaders, cond, repeat):
            res["summary"] = summarize(res)
            doc["rows"].append(res)
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(doc, indent=1) + "\n")
            s = res["summary"]
            print(f"{loader:26s} {cond:5s} " + (f"{s['seconds']:7.2f} s {s['gbps']:6.2f} GB/s  peak GPU "
                  f"{s['peak_gpu_bytes'] / 2**30:6.2f} GiB  RSS +{s['host_rss_growth_bytes'] / 2**30:5.2f} GiB"
                  if s else "FAILED " + res.get("error", "")[-400:]), flush=True)
        if cond == "warm" and not args.no_readers_ceiling:  # the page cache is still warm
            sweep = [int(n) for n in args.sweep_threads.split(",") if n]
            try:
                doc["readers_only_gbps"] = readers_ceilings(args.ckpt, args.budget, [args.threads, *sweep])
            except Exception as e:  # a ceiling that fails must not cost the run
                doc["readers_only_gbps"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"readers alone (no device work): {doc['readers_only_gbps']}", flush=True)
        write_results(doc, args.out)  # what a run cut short in a later condition keeps
    if "host_quant_isa" not in doc:
        measure_ceilings(doc, args, ckpt)
    write_results(doc, args.out)
    for name, t in doc["targets"].items():
        print(f"target {name}: {t}", flush=True)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
