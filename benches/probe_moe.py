"""Where an MoE call's GPU time goes: ``Fp8MoE`` (its ``"auto"`` backend) and bf16 grouped
``torch._grouped_mm`` at the same tokens, kernel by kernel (``torch.profiler``, CUDA
activity, eager calls after a warm-up), Qwen3-30B-A3B's expert shapes by default.

On the GPU machine (from the repo root)::

    python benches/probe_moe.py --tokens 4096 --out $OUT/probe_moe.json

Prints and writes, per implementation, the kernels' total time per call and each kernel's
share (name, calls, microseconds per MoE call): what the GEMMs take, and what the routing,
sort, quantization and combine around them cost. A diagnostic: the benchmark's figures
come from ``bench_modules.py`` (CUDA graphs, medians).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from fastfp8 import Fp8MoE
from fastfp8.kernels import moe as km

BF16 = torch.bfloat16
MODELS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}


def kernel_table(fn, calls: int) -> dict:
    """The kernels ``calls`` calls of ``fn`` ran: per kernel name, launches per call and
    microseconds per call, longest first, and their sum."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in p.key_averages():
        if e.self_device_time_total <= 0:
            continue
        rows.append({"kernel": e.key[:120], "launches_per_call": e.count / calls,
                     "us_per_call": e.self_device_time_total / calls})
    rows.sort(key=lambda r: -r["us_per_call"])
    return {"total_us_per_call": sum(r["us_per_call"] for r in rows), "kernels": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_moe needs a GPU", file=sys.stderr)
        return 2
    e, top_k, h, i = MODELS[args.model]
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=BF16, generator=g) / math.sqrt(h)
    w2 = torch.randn(e, h, i, device="cuda", dtype=BF16, generator=g) / math.sqrt(i)
    router = torch.randn(e, h, device="cuda", dtype=BF16, generator=g) / math.sqrt(h)
    moe = Fp8MoE.from_float(w13, w2, top_k=top_k, router_weight=router)
    report = {"gpu": torch.cuda.get_device_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
              "torch": torch.__version__, "model": args.model, "E": e, "top_k": top_k, "H": h, "I": i, "cases": []}
    for t in args.tokens:
        x = torch.randn(t, h, device="cuda", dtype=BF16, generator=g)
        _, ids = km.route_softmax_topk(F.linear(x, router), top_k)
        case = {"tokens": t, "auto_backend": km.pick_backend(x, ids, e, h, i)}

        def bf16_grouped(x=x):
            w, ids = km.route_softmax_topk(F.linear(x, router), top_k)
            return km.moe_bf16_grouped(x, ids, w, w13, w2)

        for name, fn in (("fp8", lambda x=x: moe(x)), ("bf16_grouped", bf16_grouped)):
            case[name] = kernel_table(fn, args.calls)
            print(f"T={t} {name}: {case[name]['total_us_per_call']:.1f} us of kernels per call", flush=True)
            for r in case[name]["kernels"][:12]:
                print(f"    {r['us_per_call']:8.1f} us  x{r['launches_per_call']:.0f}  {r['kernel']}", flush=True)
        report["cases"].append(case)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
