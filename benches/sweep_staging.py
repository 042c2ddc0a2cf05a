"""Sweep of fastfp8's staging knobs on one GPU: ring size (``memory_budget``), chunk size,
reader threads and read method, warm page cache, one process, medians of ``--repeat``.
What justifies the defaults :func:`fastfp8.host.default_staging` picks from the host.

    python benches/sweep_staging.py CKPT_DIR --out benches/results/sweep_staging_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CONFIGS = [  # (memory_budget, chunk_bytes, threads, method); None: fastfp8's default
    (None, None, None, "mmap"),
    (None, None, None, "pread"),
    ("64MiB", "4MiB", None, "mmap"),
    ("128MiB", "8MiB", None, "mmap"),
    ("128MiB", "16MiB", None, "mmap"),
    ("128MiB", "8MiB", 12, "mmap"),
    ("128MiB", "8MiB", 8, "mmap"),
    ("256MiB", "16MiB", None, "mmap"),
    ("512MiB", "32MiB", None, "mmap"),
    ("2GiB", "64MiB", None, "mmap"),
    ("128MiB", "8MiB", None, "pread"),
    ("2GiB", "64MiB", None, "pread"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "sweep_staging_h200.json"))
    args = ap.parse_args(argv)
    import fastfp8
    import torch
    from fastfp8 import host
    from fastfp8.quant import quantize_channelwise

    dev = torch.device("cuda", 0)
    quantize_channelwise(torch.randn(256, 4096, device=dev).to(torch.bfloat16), check_finite=False)
    ckpt = fastfp8.open_checkpoint(args.ckpt)
    for p in ckpt.shards:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    rows = []
    for budget, chunk, threads, method in CONFIGS:
        kw = {k: v for k, v in {"memory_budget": budget, "chunk_bytes": chunk, "threads": threads}.items() if v}
        secs = []
        for _ in range(args.repeat + 1):  # the first run pins the ring: not counted
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            state = fastfp8.load_quantized(ckpt, device=dev, method=method, progress=False, **kw)
            torch.cuda.synchronize(dev)
            secs.append(time.perf_counter() - t0)
            st = state.stats
            del state
        med = statistics.median(secs[1:])
        row = {"memory_budget": st.memory_budget, "chunk_bytes": st.chunk_bytes, "threads": st.threads,
               "method": method, "default": budget is None, "seconds": med, "gbps": ckpt.nbytes / med / 1e9,
               "runs": secs[1:]}
        rows.append(row)
        print(f"budget {st.memory_budget >> 20:5d} MiB chunk {st.chunk_bytes >> 20:3d} MiB threads {st.threads:2d} "
              f"{method:5s}{' (default)' if budget is None else ''}: {row['gbps']:.1f} GB/s", flush=True)
    doc = {"gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
           "checkpoint_bytes": ckpt.nbytes, "llc_bytes": host.last_level_cache_bytes(), "cores": host.cores(),
           "repeat": args.repeat, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"Staging sweep, {doc['gpu']}, {doc['cores']} cores, last-level cache "
             f"{(doc['llc_bytes'] or 0) >> 20} MiB, {ckpt.nbytes / 1e9:.1f} GB checkpoint, warm, {doc['date']}; "
             f"median of {args.repeat}.", "", "| ring MiB | chunk MiB | threads | method | GB/s |",
             "| ---: | ---: | ---: | --- | ---: |"]
    lines += [f"| {r['memory_budget'] >> 20}{' (default)' if r['default'] else ''} | {r['chunk_bytes'] >> 20} | "
              f"{r['threads']} | {r['method']} | {r['gbps']:.1f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
