"""Sweep of the FP8 linear paths per shape, the source of ``fastfp8/kernels/linear_table.py``.

On the GPU machine (from the repo root)::

    python benches/tune_linear.py --out $OUT/tune_linear.json        # ~3 min on an H200
    python benches/tune_linear.py --table tune_linear.json            # here: JSON -> linear_table.py

For every ``(N, K)`` of :data:`SHAPES` and every ``M`` of :data:`MS`, times (CUDA graphs,
weights rotated past L2, ``do_bench`` medians) bf16 ``F.linear`` and each fp8 candidate,
activation quantization included where the candidate needs it: the GEMV kernel (W8A16,
M <= 16), fused act-quant + ``torch._scaled_mm`` rowwise, fused act-quant + the Triton GEMM
(``"tile"`` and ``"tma"`` configs). Each candidate's output is first checked against an fp32
emulation (a failure drops it). The JSON is written after every shape, so a run cut short
keeps what it measured. ``--table`` picks the fastest candidate per ``(N, K, M)`` and writes
the table module.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

try:
    import fastfp8  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
SHAPES = [  # (N, K), most used first: Llama-3-8B / Mixtral attention and MLP, Llama-3-70B, Qwen3 dense and MoE
    (14336, 4096), (4096, 4096), (1024, 4096), (4096, 14336), (6144, 4096),
    (28672, 8192), (8192, 28672), (8192, 8192), (10240, 8192), (1024, 8192),
    (12288, 4096), (4096, 12288), (4096, 2048), (512, 2048), (5120, 2048), (2048, 4096),
]
MS = [1, 16, 32, 64, 128, 256, 1024, 4096, 8192]
ROTATE_BYTES = 120 << 20
GEMV_M1 = [(8, 1024, 4, 3), (16, 512, 4, 3), (16, 1024, 8, 3), (32, 256, 4, 3), (32, 512, 8, 3), (64, 128, 4, 4)]
GEMV_M16 = [(16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 8, 3), (64, 256, 8, 3)]
# (kernel, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K, num_warps, num_stages)
TILE_SMALL = [("tile", 16, 64, 128, 8, s, 4, 4) for s in (1, 2, 4)] + \
             [("tile", 16, 128, 128, 8, s, 4, 4) for s in (1, 2, 4)] + [("tile", 16, 64, 256, 8, 1, 4, 3)]
TILE_MID = [("tile", bm, bn, 128, 8, s, 4, 4) for bm in (32, 64) for bn in (64, 128) for s in (1, 2)] + \
           [("tile", 64, 256, 128, 8, 1, 8, 3)]
TILE_LARGE = [("tile", 128, 128, 128, 8, 1, 8, 3), ("tile", 128, 256, 128, 8, 1, 8, 3),
              ("tile", 64, 256, 128, 8, 1, 4, 4), ("tile", 128, 128, 128, 8, 1, 4, 4)]
TMA = [("tma", 128, 128, 128, 8, 1, 8, 3), ("tma", 128, 256, 128, 8, 1, 8, 3), ("tma", 128, 256, 64, 8, 1, 8, 4),
       ("tma", 64, 128, 128, 8, 1, 4, 4), ("tma", 128, 128, 128, 8, 1, 4, 4)]


def candidates(m: int) -> list:
    out: list = [("scaled_mm",)]
    if m == 1:
        out += [("gemv", *c) for c in GEMV_M1]
    elif m <= 16:
        out += [("gemv", *c) for c in GEMV_M16]
    if m <= 16:
        out += TILE_SMALL
    elif m <= 128:
        out += TILE_MID + TILE_SMALL[:3]
    if m >= 128:
        out += TILE_LARGE + TMA
    if 128 <= m <= 512:
        out += TILE_MID[2:]
    return out


def sqnr(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    err = (out - ref).pow(2).sum()
    return float("inf") if err == 0 else float(10 * torch.log10(ref.pow(2).sum() / err))


def timeit(fns, rep_ms: int) -> float:
    from triton.testing import do_bench

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    ms = do_bench(g.replay, warmup=5, rep=rep_ms, return_mode="median")
    return ms * 1e3 / len(fns)


def run_case(n, k, m, ws, sws, wbs, rep_ms):
    from fastfp8.kernels import act_quant as aq
    from fastfp8.kernels import gemm as gm
    from fastfp8.kernels import gemv as gv

    copies = len(ws)
    xs = [torch.randn(m, k, device="cuda", dtype=BF16) for _ in range(copies)]
    q0, s0 = aq.triton_act_quant(xs[0])
    emu8 = gm.fp8_gemm_reference(q0, s0, ws[0], sws[0], out_dtype=torch.float32)
    emu16 = gv.fp8_gemv_reference(xs[0].float(), ws[0], sws[0])
    res = {"N": n, "K": k, "M": m, "copies": copies, "us": {}, "sqnr": {}, "err": {}}
    res["us"]["bf16"] = timeit([lambda i=i: torch.nn.functional.linear(xs[i], wbs[i]) for i in range(copies)], rep_ms)
    for cand in candidates(m):
        name = "/".join(str(c) for c in cand)
        try:
            if cand[0] == "scaled_mm":
                def f(i):
                    q, s = aq.triton_act_quant(xs[i])
                    return torch._scaled_mm(q, ws[i].t(), scale_a=s, scale_b=sws[i].reshape(1, n),
                                            out_dtype=BF16, use_fast_accum=True)
                ref = emu8
            elif cand[0] == "gemv":
                cfg = dict(BLOCK_N=cand[1], BLOCK_K=cand[2], num_warps=cand[3], num_stages=cand[4], USE_DOT=m > 1)

                def f(i, cfg=cfg):
                    return gv.fp8_gemv(xs[i], ws[i], sws[i], config=cfg)
                ref = emu16
            else:
                def f(i, cand=cand):
                    q, s = aq.triton_act_quant(xs[i])
                    return gm.fp8_gemm(q, s, ws[i], sws[i], config=cand)
                ref = emu8
            db = sqnr(f(0), ref)
            res["sqnr"][name] = db
            if not db >= 35:
                res["err"][name] = f"sqnr {db:.1f}"
                continue
            res["us"][name] = timeit([lambda i=i, f=f: f(i) for i in range(copies)], rep_ms)
        except Exception as e:  # a config that does not compile or fit: skip it
            res["err"][name] = f"{type(e).__name__}: {str(e)[:200]}"
    fp8 = {c: us for c, us in res["us"].items() if c != "bf16"}
    best = min(fp8, key=fp8.get) if fp8 else None
    res["best"] = best
    res["speedup"] = res["us"]["bf16"] / fp8[best] if best else None
    res["speedup_scaled_mm"] = res["us"]["bf16"] / fp8["scaled_mm"] if "scaled_mm" in fp8 else None
    return res


def sweep(out_path: Path, rep_ms: int, shapes, ms, budget_s: float) -> None:
    from fastfp8.quant import quantize_channelwise

    t0 = time.monotonic()
    report = {"gpu": torch.cuda.get_device_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
              "torch": torch.__version__, "cases": [], "errors": []}
    for n, k in shapes:
        copies = max(2, min(8, math.ceil(ROTATE_BYTES / (n * k))))
        wbs = [torch.randn(n, k, device="cuda", dtype=BF16) / math.sqrt(k) for _ in range(copies)]
        qs = [quantize_channelwise(w, rounding="fp32") for w in wbs]
        ws = [q for q, _ in qs]
        sws = [s.float().reshape(n) for _, s in qs]
        for m in ms:
            if time.monotonic() - t0 > budget_s:
                report["errors"].append(f"budget: stopped before N={n} K={k} M={m}")
                break
            try:
                r = run_case(n, k, m, ws, sws, wbs, rep_ms)
            except Exception as e:
                traceback.print_exc()
                report["errors"].append(f"N={n} K={k} M={m}: {type(e).__name__}: {e}")
                continue
            report["cases"].append(r)
            print(f"N={n:6d} K={k:6d} M={m:5d} bf16 {r['us']['bf16']:8.1f}  best {r['best']} "
                  f"{r['us'].get(r['best'], float('nan')):8.1f} x{r['speedup'] or 0:5.2f}  "
                  f"scaled_mm x{r['speedup_scaled_mm'] or 0:5.2f}  errs {len(r['err'])}  "
                  f"t={time.monotonic() - t0:.0f}s", flush=True)
        wbs = ws = qs = None
        torch.cuda.empty_cache()
        out_path.write_text(json.dumps(report, indent=1))
    out_path.write_text(json.dumps(report, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tune_linear.json")
    ap.add_argument("--rep-ms", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--table", default=None, help="write python/fastfp8/kernels/linear_table.py from this JSON")
    args = ap.parse_args(argv)
    if args.table:
        from fastfp8.kernels.linear_table_gen import write_table

        write_table(json.loads(Path(args.table).read_text()))
        return 0
    sweep(Path(args.out), args.rep_ms, SHAPES, MS, args.budget_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
