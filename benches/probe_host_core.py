"""One core's host quantization rate against its copy rate, by working-set size: whether the
reader threads' quantization is bound by the code or by the memory it reads (issue 15's
"per-core quantize GB/s").

    python benches/probe_host_core.py --out $OUT/probe_host_core.json

For sizes from L2-resident to DRAM: ``_native.quantize_rows`` (bf16 rows of 4096, fp32
rounding, as the reader quantizes; its output buffers allocated per call, as in
``bench_load.host_quant_core_gbps``) and a plain copy of the same bytes (numpy), best of
``--repeat`` calls each, in GB/s of bf16 input.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from fastfp8 import _native

SIZES = (256 << 10, 1 << 20, 4 << 20, 8 << 20, 64 << 20)


def best_s(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    rows = []
    for nbytes in SIZES:
        src = torch.randn(nbytes // 2, dtype=torch.float32).mul(0.02).to(torch.bfloat16).view(torch.uint8).numpy()
        raw = src.tobytes()
        dst = np.empty_like(src)
        q = best_s(lambda raw=raw: _native.quantize_rows(raw, "BF16", 4096, "fp32"), args.repeat)
        c = best_s(lambda src=src, dst=dst: np.copyto(dst, src), args.repeat)
        rows.append({"bytes": nbytes, "quantize_gbps": nbytes / q / 1e9, "copy_gbps": nbytes / c / 1e9})
        print(f"{nbytes >> 10:>8} KiB: quantize {rows[-1]['quantize_gbps']:6.2f} GB/s, copy "
              f"{rows[-1]['copy_gbps']:6.2f} GB/s", flush=True)
    doc = {"cpu": cpu, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
