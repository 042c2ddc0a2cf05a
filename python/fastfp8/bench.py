"""``fastfp8 bench``: time loading a checkpoint to FP8 with fastfp8 and with each peer loader
that is installed (safetensors ``load_file`` and ``safe_open``, runai-model-streamer,
fastsafetensors, instanttensor), every one followed by the same FP8 quantization; report
seconds, GiB/s and peak memory (medians of ``repeat`` runs), as a table, JSON and a plot.
Sizes and rates are printed in binary units (:mod:`fastfp8.units`); the JSON also keeps
decimal GB/s (``gbps``), the unit of the published figures in ``benches/``.

The thorough benchmarks behind the published figures live in ``benches/``; this is the
quick check a user runs on their own machine and checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .errors import one_line
from .units import format_bytes, format_rate

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


def check_output_path(path: str | os.PathLike[str], option: str) -> None:
    """Raises ``ValueError`` (naming ``option``) unless ``path`` can be written: its parent
    directory exists and is writable, and ``path`` is not a directory. Checked before any
    run, so that a typo does not throw away minutes of timing."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{option} {path}: is a directory, not a file")
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{option} {path}: not writable")


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


def load_with_peer(name: str, paths: list[str], put, dev, cold: bool = False) -> None:
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


class MemorySampler:
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


def evict_page_cache(paths: Sequence[str]) -> None:
    """Drops the files' pages from the page cache (fdatasync, then FADV_DONTNEED): the next
    read comes from the disk. Needs no root. (On a VM the host may still cache the disk.)"""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(paths: Sequence[str]) -> None:
    """Reads the files once, so that the next read comes from the page cache."""
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _time_one(name: str, ckpt, paths, kinds, dev, *, cold: bool, load_args: dict):
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
        if kind == "experts_in_out":  # [E, in, out] -> [E, out, in] on the device
            t = t.transpose(1, 2).contiguous()
        q, s = quantize_channelwise(t, check_finite=False)
        result[k] = q
        result[k + "_scale"] = s

    with MemorySampler(dev) as sampler:
        t0 = time.perf_counter()
        if name == "fastfp8":
            result = load_quantized(ckpt, device=dev, progress=False, **load_args)
        else:
            load_with_peer(name, paths, put, dev, cold)
        _sync(dev)
        seconds = time.perf_counter() - t0
    return seconds, sum(t.numel() * t.element_size() for t in result.values()), sampler


def run(
    path,
    *,
    device: str,
    loaders: Sequence[str] | None = None,
    repeat: int = 1,
    warmup: int = 1,
    cold: bool = False,
    ignore: Sequence[str] = (),
    default_ignore: bool = True,
    memory_budget: int | str | None = None,
    threads: int | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
) -> int:
    """Times each loader (default: every one installed) on checkpoint ``path``; prints a line
    per loader and a table; returns 1 if a loader failed (the others still run), else 0."""
    import gc
    import json
    import statistics

    import torch

    from .checkpoint import open_checkpoint
    from .layouts import layout_for
    from .quant import quantize_channelwise

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if repeat < 1 or warmup < 0:
        raise ValueError("--repeat must be at least 1 and --warmup at least 0")
    if json_path:
        check_output_path(json_path, "--json")
    if plot_path:
        check_output_path(plot_path, "--plot")
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None
    avail = available_loaders(dev.type)
    if loaders is None:
        names = avail
    else:
        names = list(loaders)
        unknown = [n for n in names if n not in LOADERS]
        if unknown:
            raise ValueError(f"unknown loader(s) {', '.join(unknown)}; known: {', '.join(LOADERS)}")
        missing = [n for n in names if n not in avail]
        if missing:
            raise ValueError(f"not installed here (or not for {dev.type}): {', '.join(missing)}")

    ckpt = open_checkpoint(path)
    paths = [str(p) for p in ckpt.shards]
    nbytes = ckpt.nbytes
    layout = layout_for(ckpt.path, ignore=list(ignore), default_ignore=default_ignore)
    kinds = {t.source.name: ("experts_in_out" if t.orientation == "in_out" else t.kind)
             for t in layout.targets(ckpt)}
    load_args = {"ignore": list(ignore), "default_ignore": default_ignore, "memory_budget": memory_budget,
                 "threads": threads}
    print(f"{ckpt.path}: {format_bytes(nbytes)} in {len(paths)} file(s), on {device_name(dev)}; "
          f"loaders: {', '.join(names)}", flush=True)
    # compile/warm the quantization kernel outside the timed region
    quantize_channelwise(torch.randn(64, 256, device=dev).to(torch.bfloat16), check_finite=False)
    _sync(dev)
    if not cold:
        warm_page_cache(paths)

    rows = []
    failed = False
    for name in names:
        runs = []
        error = None
        for i in range(warmup + repeat):
            if cold:
                evict_page_cache(paths)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            try:
                one = _time_one(name, ckpt, paths, kinds, dev, cold=cold, load_args=load_args)
                if i >= warmup:
                    runs.append(one)
                del one
            except Exception as e:  # one loader failing must not stop the others
                error = one_line(e)
                break
        if error is not None:
            failed = True
            rows.append({"loader": name, "error": error})
            print(f"{name:22s} FAILED: {error}", flush=True)
            continue
        secs = statistics.median(r[0] for r in runs)
        peaks = [r[2].peaks() for r in runs]
        mid = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        row = {"loader": name, "seconds": secs, "gbps": nbytes / secs / 1e9, "gib_per_s": nbytes / secs / 2**30,
               "runs": [r[0] for r in runs],
               "peak_torch_bytes": max(p[0] for p in peaks), "peak_device_bytes": max(p[1] for p in peaks),
               "result_bytes": runs[0][1], "timeline": [(t, a, d) for t, a, d in mid[2].samples]}
        rows.append(row)
        print(f"{name:22s} {secs:8.3f} s {format_rate(nbytes / secs):>12s}", flush=True)
        del runs
    print()
    print_table(rows, dev, nbytes)
    if json_path:
        doc = {"checkpoint": str(ckpt.path), "bytes": nbytes, "device": device_name(dev), "repeat": repeat,
               "cold": cold, "rows": rows}
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)
    if plot_path:
        plot(rows, dev, plot_path, f"{os.path.basename(str(ckpt.path).rstrip('/'))}, {format_bytes(nbytes)}, "
                                    f"{device_name(dev)}{', cold' if cold else ', warm'}")
        print(f"plot written to {plot_path}")
    return 1 if failed else 0


def device_name(dev) -> str:
    import torch

    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def print_table(rows, dev, nbytes) -> None:
    mem = "peak GPU (torch / device)" if dev.type == "cuda" else "peak host RSS growth"
    head = ("loader", "seconds", "GiB/s", mem, "result")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append((r["loader"], "failed", "", "", ""))
            continue
        m = (f"{format_bytes(r['peak_torch_bytes'])} / {format_bytes(r['peak_device_bytes'])}" if dev.type == "cuda"
             else format_bytes(r["peak_device_bytes"]))
        lines.append((r["loader"], f"{r['seconds']:.3f}", f"{r['gib_per_s']:.2f}", m, format_bytes(r["result_bytes"])))
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    for x in [head, *lines]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths, strict=True))))


def plot(rows, dev, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax1.barh([r["loader"] for r in ok], [r["gib_per_s"] for r in ok], color="tab:blue")
    for i, r in enumerate(ok):
        ax1.text(r["gib_per_s"], i, f" {r['gib_per_s']:.2f}", va="center")
    ax1.invert_yaxis()
    ax1.set_xlabel("GiB/s (checkpoint bytes / seconds, load + FP8 quantization)")
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
