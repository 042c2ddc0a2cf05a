"""The ``fastfp8`` command: ``inspect``, ``convert`` and ``bench`` a bf16 checkpoint.

Exit codes: 0 success; 1 a failure while working (a read error, a full disk, a loader
that failed in ``bench``); 2 bad usage or bad input (unknown option, missing or invalid
checkpoint, existing destination, bad ignore pattern); 130 interrupted (Ctrl-C). Every
error is one line on stderr, ``fastfp8: error: ...``; set ``FASTFP8_DEBUG=1`` for the
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from .errors import (
    BudgetError,
    CheckpointError,
    Error,
    NonFiniteWeightError,
    UnsupportedDtypeError,
)
from .units import format_bytes, parse_bytes

PROG = "fastfp8"

DESCRIPTION = """\
Load bf16 safetensors checkpoints as FP8 (e4m3, one scale per output channel:
compressed-tensors / llm-compressor FP8_DYNAMIC), fast.

  fastfp8 inspect MODEL_DIR            what would be quantized, and the size after
  fastfp8 convert MODEL_DIR OUT_DIR    write an FP8 checkpoint vLLM and transformers load
  fastfp8 bench MODEL_DIR              time loading to the GPU against other loaders

By default lm_head, embeddings, MoE routers and vision towers stay in bf16; add modules
with --ignore NAME or --ignore 're:<regex>' (matched from the start of the module name).
Run 'fastfp8 COMMAND --help' for the options of a command.
"""

EPILOG = """\
exit codes: 0 ok, 1 failed while working, 2 bad usage or input, 130 interrupted.
Serve a bf16 model as FP8 in vLLM without converting: vllm serve MODEL_DIR --load-format fastfp8
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


class _UsageError(Exception):
    pass


def _ignore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ignore", action="append", default=[], metavar="MODULE",
                   help="keep this module in bf16: an exact module name (model.layers.0.mlp.down_proj) or "
                        "'re:<regex>' (re:.*self_attn); repeat it or separate entries with commas")
    p.add_argument("--no-default-ignore", action="store_true",
                   help="also quantize what stays bf16 by default (lm_head, embeddings, MoE routers, vision towers)")


def _ignore_list(args) -> list[str]:
    out: list[str] = []
    for entry in args.ignore:
        out += [e.strip() for e in entry.split(",") if e.strip()] if not entry.startswith("re:") else [entry]
    return out


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("inspect", help="list tensors, what would be quantized, and the resulting size",
                       description="List the tensors of a checkpoint (a model directory or a .safetensors file) "
                                   "with dtype, shape and size, what fastfp8 would do with each, and the size of "
                                   "the FP8 result. Reads only the headers.")
    p.add_argument("path", metavar="MODEL", help="model directory or .safetensors file")
    _ignore_args(p)
    p.add_argument("--summary", action="store_true", help="print only the totals, not one line per tensor")

    p = sub.add_parser("convert", help="write an FP8_DYNAMIC compressed-tensors checkpoint",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Stream a bf16/fp16/fp32 checkpoint into an FP8_DYNAMIC compressed-tensors "
                                   "checkpoint\n(what llm-compressor writes; vLLM and transformers load it): "
                                   "sharded safetensors + index,\nconfig.json with quantization_config, and "
                                   "the other files (tokenizer, ...) copied.\nHost memory stays at about "
                                   "--memory-budget plus the largest tensor. The output is\nwritten to "
                                   "OUT.tmp-<pid> and renamed to OUT only when complete.",
                       epilog="example:\n  fastfp8 convert ~/models/Llama-3.1-8B-Instruct "
                              "~/models/Llama-3.1-8B-Instruct-FP8 --device cuda")
    p.add_argument("src", metavar="MODEL", help="bf16 model directory (or one .safetensors file)")
    p.add_argument("dst", metavar="OUT", help="output directory (must not exist, unless --force)")
    _ignore_args(p)
    p.add_argument("--device", default=None,
                   help="where to quantize: cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest output file (default 5GB)")
    p.add_argument("--memory-budget", default="1GiB", metavar="SIZE",
                   help="host buffer for reading, e.g. 512MiB (default 1GiB)")
    p.add_argument("--threads", type=int, default=None, help="reader threads (default: cores, at most 16)")
    p.add_argument("--rounding", choices=["auto", "eager", "fp32"], default="auto",
                   help="auto (default): the bytes compressed-tensors itself produces on --device "
                        "(fp32 on H100-class GPUs, eager on CPU); pick one to force it")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (once the new one is complete)")
    p.add_argument("--allow-non-finite", action="store_true", help="quantize weights holding NaN/Inf anyway")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("bench", help="time loading to FP8 on the GPU against the peer loaders installed",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Load MODEL with fastfp8 and with each peer loader that is installed "
                                   "(safetensors load_file,\nsafetensors safe_open + .to(device), "
                                   "runai-model-streamer, fastsafetensors, instanttensor),\nevery one followed "
                                   "by the same FP8 quantization, and print seconds, GB/s and peak GPU memory.\n"
                                   "The page cache is warmed first (or emptied before each run with --cold);\n"
                                   "each loader runs --warmup times untimed, then --repeat times timed.",
                       epilog="example:\n  fastfp8 bench ~/models/Llama-3.1-8B-Instruct --repeat 3 --plot load.png")
    p.add_argument("path", metavar="MODEL", help="model directory or .safetensors file")
    _ignore_args(p)
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--loaders", default="all",
                   help=f"comma-separated, from: {', '.join(LOADERS)} (default: all installed)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per loader; the median is reported (default 1)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs per loader first (pinned buffers, kernel compilation; default 1)")
    p.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before each run")
    p.add_argument("--memory-budget", default="2GiB", metavar="SIZE", help="fastfp8's pinned buffer (default 2GiB)")
    p.add_argument("--threads", type=int, default=None, help="fastfp8 reader threads")
    p.add_argument("--plot", metavar="FILE.png", help="draw GB/s per loader and GPU memory over time (matplotlib)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return parser


# ---------------------------------------------------------------------------------------
# inspect


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def cmd_inspect(args) -> int:
    from .checkpoint import open_checkpoint
    from .convert import ignored_modules, plan_jobs
    from .select import plan_targets

    ckpt = open_checkpoint(args.path)
    targets = plan_targets(ckpt, _ignore_list(args), default_ignore=not args.no_default_ignore)
    jobs = plan_jobs(targets)
    after: dict[str, int] = {}
    for j in jobs:
        after[j.target.source.name] = after.get(j.target.source.name, 0) + sum(o.nbytes for o in j.outputs)
    actions = {"copy": "keep", "quantize": "fp8", "fused_experts": "fp8 per expert"}
    rows = [(t.source.name, t.source.dtype, _shape(t.source.shape), format_bytes(t.source.nbytes),
             actions[t.kind], format_bytes(after[t.source.name])) for t in targets]
    before_total = sum(t.source.nbytes for t in targets)
    after_total = sum(after.values())
    quantized = [t for t in targets if t.quantized]
    out = sys.stdout
    n_sh = len(ckpt.shards)
    print(f"{ckpt.path}: {len(targets)} tensors in {n_sh} file{'s' if n_sh != 1 else ''}, "
          f"{format_bytes(before_total)}", file=out)
    if not args.summary and rows:
        head = ("tensor", "dtype", "shape", "size", "action", "after")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        right = {3, 5}
        for r in [head, *rows]:
            cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
            print("  ".join(cells).rstrip(), file=out)
    dtypes: dict[str, int] = {}
    for t in targets:
        dtypes[t.source.dtype] = dtypes.get(t.source.dtype, 0) + t.source.nbytes
    print("dtypes: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(dtypes.items(), key=lambda x: -x[1])),
          file=out)
    pct = 100 * after_total / before_total if before_total else 100.0
    print(f"quantized: {len(quantized)} of {len(targets)} tensors "
          f"({format_bytes(sum(t.source.nbytes for t in quantized))}) -> FP8 e4m3, one scale per output channel",
          file=out)
    kept = ignored_modules(targets)
    if kept:
        shown = ", ".join(kept[:8]) + (f", ... ({len(kept)} in all)" if len(kept) > 8 else "")
        print(f"kept as they are by the ignore rules: {shown}", file=out)
    print(f"size: {format_bytes(before_total)} -> {format_bytes(after_total)} ({pct:.0f}%)", file=out)
    return 0


# ---------------------------------------------------------------------------------------
# convert


def _default_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"not a device: {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda, cuda:N or cpu, not {device!r}")


def cmd_convert(args) -> int:
    from .convert import convert

    device = _default_device(args.device)
    _check_device(device)
    parse_bytes(args.max_shard_size)
    parse_bytes(args.memory_budget)
    progress = False if args.no_progress else None
    res = convert(args.src, args.dst, ignore=_ignore_list(args), default_ignore=not args.no_default_ignore,
                  device=device, max_shard_size=args.max_shard_size, memory_budget=args.memory_budget,
                  threads=args.threads, rounding=args.rounding, overwrite=args.force,
                  allow_non_finite=args.allow_non_finite, progress=progress)
    print(f"wrote {res.path}: {len(res.shards)} shard{'s' if len(res.shards) != 1 else ''}, {res.tensors} tensors "
          f"({res.quantized} FP8 weights), {format_bytes(res.bytes_in)} -> {format_bytes(res.bytes_out)} "
          f"in {res.seconds:.1f} s; {len(res.copied_files)} other files copied")
    if res.ignored:
        print(f"kept unquantized: {', '.join(res.ignored[:8])}{' ...' if len(res.ignored) > 8 else ''}")
    return 0


# ---------------------------------------------------------------------------------------
# bench

#: loader name -> module whose import tells whether it is installed
LOADERS: dict[str, str] = {
    "fastfp8": "fastfp8",
    "safetensors_load_file": "safetensors.torch",
    "safetensors_safe_open": "safetensors",
    "runai": "runai_model_streamer",
    "fastsafetensors": "fastsafetensors",
    "instanttensor": "instanttensor",
}
_CUDA_ONLY = {"instanttensor", "fastsafetensors"}


def available_loaders(device_type: str) -> list[str]:
    import importlib

    out = []
    for name, module in LOADERS.items():
        if device_type != "cuda" and name in _CUDA_ONLY:
            continue
        try:
            importlib.import_module(module)
        except Exception:  # not installed, or a broken native library
            continue
        out.append(name)
    return out


def _peer(name: str, paths: list[str], put, dev, cold: bool = False) -> None:
    """Loads every tensor of ``paths`` with peer ``name``, handing each to ``put(name,
    tensor, owned)``; ``owned=False`` when the tensor is a view of the peer's own buffer.
    fastsafetensors and instanttensor read through the page cache unless ``cold`` (then
    with their default direct I/O)."""
    if name == "safetensors_load_file":
        from safetensors.torch import load_file

        for p in paths:
            shard = load_file(p, device=str(dev))
            for k in list(shard):
                put(k, shard.pop(k), True)
    elif name == "safetensors_safe_open":
        from safetensors import safe_open

        for p in paths:
            with safe_open(p, framework="pt", device="cpu") as f:
                for k in f.keys():  # noqa: SIM118 - safe_open is no dict
                    t = f.get_tensor(k)
                    put(k, t.to(dev), t.device != dev)
    elif name == "runai":
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as s:
            s.stream_files(list(paths))
            for k, t in s.get_tensors():
                put(k, t.to(dev), dev.type != "cpu")
    elif name == "fastsafetensors":
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        old = os.environ.get("FASTSAFETENSORS_ODIRECT")
        if not cold:  # buffered reads, served by the page cache
            os.environ["FASTSAFETENSORS_ODIRECT"] = "0"
        try:
            for p in paths:
                loader = SafeTensorsFileLoader(SingleGroup(), str(dev), nogds=True)
                try:
                    loader.add_filenames({0: [p]})
                    fb = loader.copy_files_to_device()
                    try:
                        for k in list(fb.key_to_rank_lidx):
                            put(k, fb.get_tensor(k), False)
                        _sync(dev)
                    finally:
                        fb.close()
                finally:
                    loader.close()
        finally:
            if old is None:
                os.environ.pop("FASTSAFETENSORS_ODIRECT", None)
            else:
                os.environ["FASTSAFETENSORS_ODIRECT"] = old
    elif name == "instanttensor":
        import warnings

        from instanttensor import BackendPolicy, safe_open

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="copy=False")  # each tensor is consumed inline
            f = safe_open(list(paths), framework="pt", device=dev, copy=False,
                          backend=None if cold else BackendPolicy.BUFFERED)
        with f:
            for k, t in f.tensors():
                put(k, t, False)
            _sync(dev)
    else:
        raise ValueError(f"unknown loader {name!r}")


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _MemorySampler:
    """Samples memory every ``period`` seconds in a thread: on CUDA the PyTorch allocator's
    bytes and the device's used bytes (which also sees other libraries' buffers), on the
    CPU the process's resident set."""

    def __init__(self, dev, period: float = 0.005) -> None:
        import threading

        self.dev = dev
        self.period = period
        self.samples: list[tuple[float, int, int]] = []  # (t, torch bytes, device/RSS bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> tuple[int, int]:
        import torch

        if self.dev.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.dev)
            return torch.cuda.memory_allocated(self.dev), total - free
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return 0, rss

    def _loop(self) -> None:
        import time

        while not self._stop.is_set():
            a, d = self._read()
            self.samples.append((time.perf_counter() - self.t0, a, d))
            time.sleep(self.period)

    def __enter__(self):
        import time

        self.t0 = time.perf_counter()
        self.base = self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import time

        self._stop.set()
        self._thread.join()
        a, d = self._read()
        self.samples.append((time.perf_counter() - self.t0, a, d))

    def peaks(self) -> tuple[int, int]:
        pa = max((s[1] for s in self.samples), default=0) - self.base[0]
        pd = max((s[2] for s in self.samples), default=0) - self.base[1]
        return max(pa, 0), max(pd, 0)


def _evict(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _warm(paths: list[str]) -> None:
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _bench_one(name: str, ckpt, paths, kinds, args, dev):
    """One run of loader ``name``: (seconds, result tensor bytes, sampler)."""
    import time

    import torch

    from .loader import load_quantized
    from .quant import quantize_channelwise

    result: dict[str, torch.Tensor] = {}

    def put(k: str, t: torch.Tensor, owned: bool) -> None:
        kind = kinds.get(k, "copy")
        if kind == "copy":
            result[k] = t if owned else t.clone()
            return
        if kind == "fused_experts":  # [E, in, out] -> [E, out, in] on the device
            t = t.transpose(1, 2).contiguous()
        q, s = quantize_channelwise(t, check_finite=False)
        result[k] = q
        result[k + "_scale"] = s

    with _MemorySampler(dev) as sampler:
        t0 = time.perf_counter()
        if name == "fastfp8":
            result = load_quantized(ckpt, device=dev, ignore=_ignore_list(args),
                                    default_ignore=not args.no_default_ignore, memory_budget=args.memory_budget,
                                    threads=args.threads, progress=False)
        else:
            _peer(name, paths, put, dev, args.cold)
        _sync(dev)
        seconds = time.perf_counter() - t0
    return seconds, sum(t.numel() * t.element_size() for t in result.values()), sampler


def cmd_bench(args) -> int:
    import gc
    import json
    import statistics

    import torch

    from .checkpoint import open_checkpoint
    from .quant import quantize_channelwise
    from .select import plan_targets

    device = _default_device(args.device)
    _check_device(device)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if args.repeat < 1 or args.warmup < 0:
        raise ValueError("--repeat must be at least 1 and --warmup at least 0")
    parse_bytes(args.memory_budget)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None
    avail = available_loaders(dev.type)
    if args.loaders == "all":
        names = avail
    else:
        names = [n.strip() for n in args.loaders.split(",") if n.strip()]
        unknown = [n for n in names if n not in LOADERS]
        if unknown:
            raise ValueError(f"unknown loader(s) {', '.join(unknown)}; known: {', '.join(LOADERS)}")
        missing = [n for n in names if n not in avail]
        if missing:
            raise ValueError(f"not installed here (or not for {dev.type}): {', '.join(missing)}")

    ckpt = open_checkpoint(args.path)
    paths = [str(p) for p in ckpt.shards]
    nbytes = ckpt.nbytes
    kinds = {t.source.name: t.kind for t in plan_targets(ckpt, _ignore_list(args),
                                                         default_ignore=not args.no_default_ignore)}
    print(f"{ckpt.path}: {format_bytes(nbytes)} in {len(paths)} file(s), on {_device_name(dev)}; "
          f"loaders: {', '.join(names)}", flush=True)
    # compile/warm the quantization kernel outside the timed region
    quantize_channelwise(torch.randn(64, 256, device=dev).to(torch.bfloat16), check_finite=False)
    _sync(dev)
    if not args.cold:
        _warm(paths)

    rows = []
    failed = False
    for name in names:
        runs = []
        error = None
        for i in range(args.warmup + args.repeat):
            if args.cold:
                _evict(paths)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            try:
                run = _bench_one(name, ckpt, paths, kinds, args, dev)
                if i >= args.warmup:
                    runs.append(run)
                del run
            except Exception as e:  # one loader failing must not stop the others
                error = _one_line(e)
                break
        if error is not None:
            failed = True
            rows.append({"loader": name, "error": error})
            print(f"{name:22s} FAILED: {error}", flush=True)
            continue
        secs = statistics.median(r[0] for r in runs)
        peaks = [r[2].peaks() for r in runs]
        mid = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        row = {"loader": name, "seconds": secs, "gbps": nbytes / secs / 1e9, "runs": [r[0] for r in runs],
               "peak_torch_bytes": max(p[0] for p in peaks), "peak_device_bytes": max(p[1] for p in peaks),
               "result_bytes": runs[0][1], "timeline": [(t, a, d) for t, a, d in mid[2].samples]}
        rows.append(row)
        print(f"{name:22s} {secs:8.3f} s {row['gbps']:8.2f} GB/s", flush=True)
        del runs
    print()
    _print_table(rows, dev, nbytes)
    if args.json:
        doc = {"checkpoint": str(ckpt.path), "bytes": nbytes, "device": _device_name(dev), "repeat": args.repeat,
               "cold": args.cold, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot:
        _plot(rows, dev, args.plot, f"{os.path.basename(str(ckpt.path).rstrip('/'))}, {format_bytes(nbytes)}, "
                                    f"{_device_name(dev)}{', cold' if args.cold else ', warm'}")
        print(f"plot written to {args.plot}")
    return 1 if failed else 0


def _device_name(dev) -> str:
    import torch

    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def _print_table(rows, dev, nbytes) -> None:
    mem = "peak GPU (torch / device)" if dev.type == "cuda" else "peak host RSS growth"
    head = ("loader", "seconds", "GB/s", mem, "result")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append((r["loader"], "failed", "", "", ""))
            continue
        m = (f"{format_bytes(r['peak_torch_bytes'])} / {format_bytes(r['peak_device_bytes'])}" if dev.type == "cuda"
             else format_bytes(r["peak_device_bytes"]))
        lines.append((r["loader"], f"{r['seconds']:.3f}", f"{r['gbps']:.2f}", m, format_bytes(r["result_bytes"])))
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    for x in [head, *lines]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths, strict=True))))


def _plot(rows, dev, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax1.barh([r["loader"] for r in ok], [r["gbps"] for r in ok], color="tab:blue")
    for i, r in enumerate(ok):
        ax1.text(r["gbps"], i, f" {r['gbps']:.2f}", va="center")
    ax1.invert_yaxis()
    ax1.set_xlabel("GB/s (checkpoint bytes / seconds, load + FP8 quantization)")
    ax1.set_title("throughput")
    col = 2 if dev.type != "cuda" else 1
    for r in ok:
        tl = r["timeline"]
        if not tl:
            continue
        base = tl[0][col]
        ax2.plot([t for t, *_ in tl], [(s[col] - base) / 2**30 for s in tl], label=r["loader"])
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("GiB allocated by PyTorch" if dev.type == "cuda" else "GiB host RSS growth")
    ax2.set_title("GPU memory over time" if dev.type == "cuda" else "host memory over time")
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# main


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and not isinstance(e, Error):
        msg = e.strerror + (f": {e.filename}" if e.filename else "")
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


_BAD_INPUT = (CheckpointError, BudgetError, UnsupportedDtypeError, NonFiniteWeightError, ValueError, TypeError,
              FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError, _UsageError)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``fastfp8`` command line; returns the exit code."""
    debug = os.environ.get("FASTFP8_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(list(argv) if argv is not None else None)
        except SystemExit as e:  # --help, --version
            return e.code if isinstance(e.code, int) else 0
        if args.command is None:
            parser.print_help()
            return 2
        return {"inspect": cmd_inspect, "convert": cmd_convert, "bench": cmd_bench}[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fastfp8 inspect X | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except (Error, OSError, ValueError, TypeError, _UsageError) as e:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, _BAD_INPUT) else 1
    except Exception as e:
        if debug:
            raise
        print(f"{PROG}: error: unexpected {type(e).__name__}: {_one_line(e)} (FASTFP8_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
