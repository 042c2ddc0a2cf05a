"""What a load's pinned ring costs to make, and how fast the GPU reads from it, by the way
it is page-locked (a warm load's ``setup`` phase is mostly its ``pin``): torch's pinned
allocation (``cudaHostAlloc``, :func:`fastfp8.pinned._pinned`'s default), transparent huge
pages registered with CUDA (``FASTFP8_PINNED=thp``), and anonymous memory faulted in
first, then registered. Each buffer is new (every one kept until the end, so torch's
caching allocator hands out none twice); the copy rate is host -> device from the buffer,
best of 3.

On the GPU machine (from the repo root)::

    python benches/probe_pin.py --out $OUT/probe_pin.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import fastfp8  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from fastfp8 import pinned


def _registered(size: int) -> torch.Tensor:
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = torch.frombuffer(m, dtype=torch.uint8)
    buf.fill_(0)
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 0))
    return buf


WAYS = {"torch": lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True),
        "thp": pinned._huge_registered, "registered": _registered}


def h2d_gbps(buf: torch.Tensor, dst: torch.Tensor) -> float:
    best = float("inf")
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(buf, non_blocking=True)
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    return buf.numel() / best / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="probe_pin.json")
    ap.add_argument("--mib", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeat", type=int, default=4)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.cuda.init()
    torch.empty(1, device="cuda")
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "ms": {}, "h2d_gbps": {}}
    keep = []
    for mib in args.mib:
        n = mib << 20
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")
        for _ in range(args.repeat):  # round robin over the ways
            for way, make in WAYS.items():
                t = time.perf_counter()
                buf = make(n)
                ms = (time.perf_counter() - t) * 1e3
                keep.append(buf)
                res["ms"].setdefault(f"{way}/{mib}", []).append(ms)
                res["h2d_gbps"].setdefault(f"{way}/{mib}", []).append(h2d_gbps(buf, dst))
    for key, v in res["ms"].items():
        print(f"{key} MiB: {statistics.median(v):.1f} ms to page-lock (runs {', '.join(f'{x:.1f}' for x in v)}), "
              f"H2D {statistics.median(res['h2d_gbps'][key]):.1f} GB/s", flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
