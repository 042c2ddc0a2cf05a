"""GPU benchmark: Fp8Linear and Fp8MoE against bf16 (issues 4 and 12's targets).

Run on the GPU machine from the repo root:

    python benches/bench_modules.py --out benches/results/modules_h200.json   # everything
    python benches/bench_modules.py --quick                  # headline shapes only
    python benches/bench_modules.py --tune                   # + GEMV / MoE launch-config sweeps
    python benches/bench_decode.py --out benches/results/modules_h200.json    # + end to end (merged)

Linear (Llama-3-8B and -70B projections, Qwen3-8B MLP, Qwen3-30B-A3B attention, M in
1..8192): ``Fp8Linear`` (activation quantization included; the path of the per-shape
selection table ``fastfp8/kernels/linear_table.json``: GEMV kernel, fused act-quant +
``torch._scaled_mm`` or + the Triton W8A8 GEMM) against bf16 ``F.linear`` and against plain
``torch._scaled_mm`` rowwise fed by eager torch per-token quantization. MoE (Mixtral 8x7B: E=8 top-2 H=4096 I=14336;
Qwen3-30B-A3B: E=128 top-8 H=2048 I=768; 16/256/4096 tokens): ``Fp8MoE.forward`` (routing
included, backend "auto") and each of its backends, against a bf16 MoE with the same
routing, sort and combine around ``torch._grouped_mm``, and a bf16 per-expert loop.

Method: every configuration is first checked (SQNR against the bf16 result, printed and
stored; a failing check marks the row and skips its timing). Times are
``triton.testing.do_bench`` medians. Calls rotate over several copies of weights and
inputs (together > 2x L2) so that weights come from HBM; every linear and every MoE call
is captured in CUDA graphs (MoE eager times are stored too:
``fp8_eager_us``, ``bf16_grouped_eager_us``), one graph replaying all copies back to
back, time divided by the copies. Writes ``--out`` JSON (headline ratios
``linear_speedup_m4096``, ``linear_speedup_m1`` at N=14336 K=4096, ``linear_speedup_min``
over every shape and M, ``moe_speedup_4096``, ``moe_speedup_16`` at Qwen3-30B-A3B shapes and
``moe_speedup_min`` over every MoE row, against bf16 grouped; ``benches/bench_decode.py``
adds the end-to-end keys) and a ``.md`` table beside it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing, also when loaded by path
try:  # run from a source checkout without installing
    import fastfp8  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from fastfp8.kernels import act_quant as aq
from fastfp8.kernels import gemv as gv
from fastfp8.kernels import moe as km
from fastfp8.kernels.common import sqnr
from fastfp8.kernels.moe import grouped as kgrouped
from fastfp8.kernels.moe import sort as ksort
from fastfp8.modules import Fp8Linear, Fp8MoE
from timing import ROTATE_BYTES, timeit

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16
LINEAR_SHAPES = {  # name -> (N, K)
    "8B qkv": (6144, 4096),
    "8B o": (4096, 4096),
    "8B gate/up": (14336, 4096),
    "8B down": (4096, 14336),
    "70B q": (8192, 8192),
    "70B gate/up": (28672, 8192),
    "70B down": (8192, 28672),
    "8B k/v": (1024, 4096),
    "Qwen3-8B gate/up": (12288, 4096),
    "Qwen3-8B down": (4096, 12288),
    "Qwen3-30B q": (4096, 2048),
    "Qwen3-30B k/v": (512, 2048),
    "Qwen3-30B o": (2048, 4096),
}
LINEAR_M = [1, 16, 128, 1024, 4096, 8192]
MOE_SHAPES = {  # name -> (E, top_k, H, I)
    "Mixtral-8x7B": (8, 2, 4096, 14336),
    "Qwen3-30B-A3B": (128, 8, 2048, 768),
}
MOE_TOKENS = [16, 256, 4096]
GRAPH_MAX_M = 1 << 30  # every linear in CUDA graphs: GPU time, as the tuning sweep measures it
GRAPH_MAX_TOKENS = 1 << 30  # MoE: always (the routing/sort glue is launch-bound); eager times are kept too
MIN_SQNR = 25.0
MIN_SQNR_MOE = 22.0  # two W8A8 GEMMs in series
#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried by --tune for the Triton MoE kernel
MOE_TUNE_CONFIGS = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (16, 32, 256, 4, 3), (32, 64, 128, 4, 4),
                    (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 128, 8, 3), (128, 128, 64, 8, 3)]


def torch_token_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager per-token quantization (what a user writes without a fused kernel)."""
    s = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(aq.SCALE_FLOOR * 448) / 448
    return (x.float() / s).clamp(-448, 448).to(FP8), s


# ---------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------


def bench_linear(shapes, ms, rep_ms, rows, errors):
    for name, (n, k) in shapes.items():
        for m in ms:
            try:
                res = _linear_case(name, n, k, m, rep_ms, errors)
                rows.append(res)
                print(_fmt_linear(res), flush=True)
            except Exception as e:  # keep going: report the failure in the JSON
                traceback.print_exc()
                errors.append(f"linear {name} M={m}: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()


def _linear_case(name, n, k, m, rep_ms, errors) -> dict[str, Any]:
    copies = max(2, min(16, math.ceil(ROTATE_BYTES / (n * k * 2 + m * k * 2))))
    ws = [torch.randn(n, k, device="cuda", dtype=BF16) / math.sqrt(k) for _ in range(copies)]
    xs = [torch.randn(m, k, device="cuda", dtype=BF16) for _ in range(copies)]
    mods = [Fp8Linear.from_quantized(*_quant(w)) for w in ws]
    sb = [md.weight_scale.reshape(1, n) for md in mods]
    ref = F.linear(xs[0], ws[0])
    res: dict[str, Any] = {"shape": name, "N": n, "K": k, "M": m, "copies": copies, "graph": m <= GRAPH_MAX_M}
    res["path"] = _linear_path(xs[0], mods[0])
    res["sqnr_fp8"] = sqnr(mods[0](xs[0]), ref)

    def plain(i):
        q, s = torch_token_quant(xs[i])
        return torch._scaled_mm(q, mods[i].weight.t(), scale_a=s, scale_b=sb[i], out_dtype=BF16, use_fast_accum=True)

    res["sqnr_scaled_mm_torch"] = sqnr(plain(0), ref) if k % 16 == 0 and n % 16 == 0 else None
    ok = res["sqnr_fp8"] >= MIN_SQNR
    res["ok"] = ok
    if not ok:
        errors.append(f"linear {name} M={m}: SQNR {res['sqnr_fp8']:.1f} dB < {MIN_SQNR}")
    g = res["graph"]
    res["us_bf16"] = timeit([lambda i=i: F.linear(xs[i], ws[i]) for i in range(copies)], graph=g, rep_ms=rep_ms)
    if ok:
        res["us_fp8"] = timeit([lambda i=i: mods[i](xs[i]) for i in range(copies)], graph=g, rep_ms=rep_ms)
    if res["sqnr_scaled_mm_torch"] is not None:
        res["us_scaled_mm_torch"] = timeit([lambda i=i: plain(i) for i in range(copies)], graph=g, rep_ms=rep_ms)
    flops = 2 * m * n * k
    for key in ("bf16", "fp8", "scaled_mm_torch"):
        us = res.get("us_" + key)
        if us:
            res["tflops_" + key] = flops / us / 1e6
    if res.get("us_fp8"):
        res["speedup"] = res["us_bf16"] / res["us_fp8"]
        res["weight_gbps_fp8"] = n * k / res["us_fp8"] / 1e3
    if res.get("us_scaled_mm_torch") and res.get("us_fp8"):
        res["speedup_vs_scaled_mm_torch"] = res["us_scaled_mm_torch"] / res["us_fp8"]
    return res


def _quant(w):
    from fastfp8.quant import quantize_channelwise

    return quantize_channelwise(w, rounding="fp32")


def _linear_path(x, mod):
    from fastfp8.ops import linear_backend

    return linear_backend(x, mod.weight)


def _table_info():
    from fastfp8.kernels import linear_table

    t = linear_table.table()
    return {"source": t.get("source"), "gpu": t.get("gpu"), "date": t.get("date"), "shapes": len(t["entries"])}


def _fmt_linear(r):
    def f(key, fmt="{:8.1f}"):
        v = r.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) and v is not None else "       -"

    return (f"{r['shape']:12s} M={r['M']:5d} {r['path']:9s} bf16 {f('us_bf16')} us  fp8 {f('us_fp8')} us  "
            f"torch-fp8 {f('us_scaled_mm_torch')} us  x{f('speedup', '{:5.2f}')}  "
            f"SQNR {f('sqnr_fp8', '{:5.1f}')} dB")


# ---------------------------------------------------------------------------------------
# MoE
# ---------------------------------------------------------------------------------------


def bench_moe(shapes, tokens, rep_ms, rows, errors):
    for name, (e, top_k, h, i) in shapes.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        weights = _moe_weights(e, top_k, h, i, g)
        for t in tokens:
            try:
                res = _moe_case(name, weights, t, g, rep_ms, errors)
                rows.append(res)
                print(_fmt_moe(res), flush=True)
            except Exception as ex:
                traceback.print_exc()
                errors.append(f"moe {name} T={t}: {type(ex).__name__}: {ex}")
        weights = None
        torch.cuda.empty_cache()


def _moe_weights(e, top_k, h, i, g):
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=BF16, generator=g) / math.sqrt(h)
    w2 = torch.randn(e, h, i, device="cuda", dtype=BF16, generator=g) / math.sqrt(i)
    router = torch.randn(e, h, device="cuda", dtype=BF16, generator=g) / math.sqrt(h)
    return w13, w2, router, Fp8MoE.from_float(w13, w2, top_k=top_k, router_weight=router)


def _moe_case(name, weights, t, g, rep_ms, errors) -> dict[str, Any]:
    w13, w2, router, moe = weights
    e, top_k, h, i = moe.num_experts, moe.top_k, moe.hidden_size, moe.intermediate_size
    x = torch.randn(t, h, device="cuda", dtype=BF16, generator=g)
    graph = t <= GRAPH_MAX_TOKENS

    def route():
        return km.route_softmax_topk(F.linear(x, router), top_k)

    w, ids = route()
    ref = km.moe_bf16_loop(x, ids, w, w13, w2)
    res: dict[str, Any] = {"model": name, "E": e, "top_k": top_k, "H": h, "I": i, "tokens": t, "graph": graph,
                           "auto_backend": km.pick_backend(x, ids, e, h, i)}
    args = (moe.w13_weight, moe.w13_weight_scale, moe.w2_weight, moe.w2_weight_scale)

    def bf16_grouped():
        w, ids = route()
        return km.moe_bf16_grouped(x, ids, w, w13, w2)

    def bf16_loop():
        w, ids = route()
        return km.moe_bf16_loop(x, ids, w, w13, w2)

    def fp8_backend(b):
        w, ids = route()
        return km.fused_moe(x, ids, w, *args, backend=b)

    impls = {"fp8": lambda: moe(x), "bf16_grouped": bf16_grouped}
    for b in ("triton", "triton_a8", "grouped"):
        if b != "grouped" or km.grouped_supported(x.device):
            impls["fp8_" + b] = lambda b=b: fp8_backend(b)
    for key, fn in impls.items():
        res["sqnr_" + key] = sqnr(fn(), ref)
        floor = MIN_SQNR_MOE if key.startswith("fp8") else 30.0
        if not res["sqnr_" + key] >= floor:
            errors.append(f"moe {name} T={t} {key}: SQNR {res['sqnr_' + key]:.1f} dB < {floor}")
            continue
        res["us_" + key] = timeit([fn], graph=graph, rep_ms=rep_ms)
        if key in ("fp8", "bf16_grouped"):
            res[key + "_eager_us"] = timeit([fn], graph=False, rep_ms=rep_ms)
    res["us_bf16_loop"] = timeit([bf16_loop], graph=False, rep_ms=rep_ms)
    flops = 2 * t * top_k * 3 * h * i
    for key in [k for k in list(res) if k.startswith("us_")]:
        res["tflops_" + key[3:]] = flops / res[key] / 1e6
    if res.get("us_fp8") and res.get("us_bf16_grouped"):
        res["speedup_vs_bf16_grouped"] = res["us_bf16_grouped"] / res["us_fp8"]
    if res.get("us_fp8"):
        res["speedup_vs_bf16_loop"] = res["us_bf16_loop"] / res["us_fp8"]
    return res


def _fmt_moe(r):
    parts = [f"{r['model']:14s} T={r['tokens']:5d} auto={r['auto_backend']:9s}"]
    for key in ("fp8", "fp8_triton", "fp8_triton_a8", "fp8_grouped", "bf16_grouped", "bf16_loop"):
        v = r.get("us_" + key)
        parts.append(f"{key} {v:8.1f}" if v else f"{key}        -")
    sp = r.get("speedup_vs_bf16_grouped")
    parts.append(f"x{sp:5.2f}" if sp else "x    -")
    parts.append(f"SQNR {r.get('sqnr_fp8', float('nan')):5.1f}")
    return "  ".join(parts)


# ---------------------------------------------------------------------------------------
# launch-config sweeps (--tune)
# ---------------------------------------------------------------------------------------


def tune_gemv(rep_ms, out):
    configs = [(bn, bk, nw, ns) for bn in (8, 16, 32, 64) for bk in (256, 512, 1024) for nw in (4, 8)
               for ns in (2, 4) if 2048 <= bn * bk <= 16384]
    for (n, k) in [(14336, 4096), (4096, 14336), (28672, 8192)]:
        for m in (1, 16):
            try:
                line = _tune_gemv_case(n, k, m, configs, rep_ms)
            except Exception as e:
                traceback.print_exc()
                line = {"N": n, "K": k, "M": m, "error": f"{type(e).__name__}: {e}"}
            out.append(line)
            print(f"gemv tune N={n} K={k} M={m}: best {line.get('best', [])[:3]} default {line.get('default')} "
                  f"{line.get('default_us')} floor {line.get('floor_us')}", flush=True)
            torch.cuda.empty_cache()


def _tune_gemv_case(n, k, m, configs, rep_ms):
    copies = max(2, math.ceil(ROTATE_BYTES / (n * k)))
    ws = [torch.randn(n, k, device="cuda").to(FP8) for _ in range(copies)]
    sc = torch.rand(n, 1, device="cuda")
    xs = [torch.randn(m, k, device="cuda", dtype=BF16) for _ in range(copies)]
    ref = gv.fp8_gemv_reference(xs[0], ws[0], sc)
    best = []
    for bn, bk, nw, ns in configs:
        if m > 1 and bn < 16:
            continue
        cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns, USE_DOT=m > 1)
        try:
            if sqnr(gv.fp8_gemv(xs[0], ws[0], sc, config=cfg), ref) < 40:
                continue
            us = timeit([lambda i=i, cfg=cfg: gv.fp8_gemv(xs[i], ws[i], sc, config=cfg) for i in range(copies)],
                        graph=True, rep_ms=rep_ms)
        except Exception:
            continue
        best.append((us, (bn, bk, nw, ns)))
    best.sort()
    d = gv.gemv_config(m, n, k)
    dcfg = (d["BLOCK_N"], d["BLOCK_K"], d["num_warps"], d["num_stages"])
    dus = next((us for us, c in best if c == dcfg), None)
    return {"N": n, "K": k, "M": m, "best": best[:5], "default": dcfg, "default_us": dus, "floor_us": n * k / 3.35e6}


def tune_moe(rep_ms, out):
    for name, (e, top_k, h, i) in MOE_SHAPES.items():
        weights = _moe_weights(e, top_k, h, i, torch.Generator(device="cuda").manual_seed(1))
        for t in MOE_TOKENS:
            for a8 in (False, True):
                try:
                    best = _tune_moe_case(weights, t, a8, rep_ms)
                except Exception as ex:
                    traceback.print_exc()
                    best = [str(ex)]
                out.append({"model": name, "tokens": t, "a8": a8, "best": best[:5]})
                print(f"moe tune {name} T={t} a8={a8}: {best[:3]}", flush=True)
        weights = None
        torch.cuda.empty_cache()


def _tune_moe_case(weights, t, a8, rep_ms):
    moe = weights[3]
    args = (moe.w13_weight, moe.w13_weight_scale, moe.w2_weight, moe.w2_weight_scale)
    x = torch.randn(t, moe.hidden_size, device="cuda", dtype=BF16)
    w, ids = km.route_softmax_topk(torch.randn(t, moe.num_experts, device="cuda"), moe.top_k)
    ref = km.moe_reference(x, ids, w, *args)
    best = []
    for cfg in MOE_TUNE_CONFIGS:
        cfg = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), cfg, strict=True))
        if t * moe.top_k < cfg["BLOCK_M"] * moe.num_experts // 8 and cfg["BLOCK_M"] > 32:
            continue  # big blocks on tiny batches: all padding
        try:
            if sqnr(km.moe_triton(x, ids, w, *args, a8=a8, configs=(cfg, cfg)), ref) < 22:
                continue
            us = timeit([lambda cfg=cfg: km.moe_triton(x, ids, w, *args, a8=a8, configs=(cfg, cfg))],
                        graph=t <= GRAPH_MAX_TOKENS, rep_ms=rep_ms)
        except Exception:
            continue
        best.append((us, tuple(cfg.values())))
    best.sort()
    return best


def probe(rep_ms, out):
    """Component timings (act quant alone, _scaled_mm alone, grouped fast/slow accumulation,
    a few GEMV configs): where the time of the headline cases goes."""
    for m, k in [(1, 4096), (16, 4096), (4096, 4096), (8192, 4096), (32768, 2048)]:
        xs = [torch.randn(m, k, device="cuda", dtype=BF16) for _ in range(max(2, ROTATE_BYTES // (m * k * 2)))]
        us = timeit([lambda x=x: aq.triton_act_quant(x) for x in xs], graph=m <= GRAPH_MAX_M, rep_ms=rep_ms)
        out[f"act_quant_{m}x{k}_us"] = us
        out[f"act_quant_{m}x{k}_gbps"] = m * k * 3 / us / 1e3
        print(f"probe act_quant {m}x{k}: {us:.1f} us {m * k * 3 / us / 1e3:.0f} GB/s", flush=True)
    h13 = torch.randn(32768, 1536, device="cuda", dtype=BF16)
    out["gated_quant_32768x1536_us"] = timeit([lambda: aq.triton_act_quant(h13, gated=True)], graph=False,
                                              rep_ms=rep_ms)
    n, k, m = 14336, 4096, 4096
    w = torch.randn(n, k, device="cuda", dtype=BF16)
    mod = Fp8Linear.from_quantized(*_quant(w))
    x = torch.randn(m, k, device="cuda", dtype=BF16)
    q, s = aq.triton_act_quant(x)
    sb = mod.weight_scale.reshape(1, n)
    for fast in (True, False):
        out[f"scaled_mm_only_fast{int(fast)}_us"] = timeit(
            [lambda fast=fast: torch._scaled_mm(q, mod.weight.t(), scale_a=s, scale_b=sb, out_dtype=BF16,
                                                use_fast_accum=fast)], graph=False, rep_ms=rep_ms)
    out["fp8linear_4096_us"] = timeit([lambda: mod(x)], graph=False, rep_ms=rep_ms)
    print(f"probe scaled_mm only {out['scaled_mm_only_fast1_us']:.1f} (slow acc {out['scaled_mm_only_fast0_us']:.1f})"
          f" us, Fp8Linear {out['fp8linear_4096_us']:.1f} us", flush=True)
    # grouped MoE at Qwen3-30B-A3B, 4096 tokens: accumulation mode and the glue
    e, top_k, h, i = MOE_SHAPES["Qwen3-30B-A3B"]
    weights = _moe_weights(e, top_k, h, i, torch.Generator(device="cuda").manual_seed(2))
    moe = weights[3]
    args = (moe.w13_weight, moe.w13_weight_scale, moe.w2_weight, moe.w2_weight_scale)
    x = torch.randn(4096, h, device="cuda", dtype=BF16)
    wts, ids = km.route_softmax_topk(F.linear(x, weights[2]), top_k)
    for fast in (True, False):
        kgrouped.GROUPED_FAST_ACCUM = fast
        out[f"moe_grouped_4096_fast{int(fast)}_us"] = timeit([lambda: km.moe_grouped(x, ids, wts, *args)],
                                                             graph=False, rep_ms=rep_ms)
    kgrouped.GROUPED_FAST_ACCUM = True
    for g in (False, True):
        out[f"moe_sort_4096_graph{int(g)}_us"] = timeit([lambda: km.sort_tokens(ids, e)], graph=g, rep_ms=rep_ms)
        out[f"moe_sort_torch_4096_graph{int(g)}_us"] = timeit([lambda: km.sort_tokens_torch(ids, e)], graph=g,
                                                              rep_ms=rep_ms)
        out[f"moe_grouped_4096_graph{int(g)}_us"] = timeit([lambda: km.moe_grouped(x, ids, wts, *args)], graph=g,
                                                           rep_ms=rep_ms)
    out["moe_sort_4096_us"] = out["moe_sort_4096_graph0_us"]
    order, _, _ = km.sort_tokens(ids, e)
    y = torch.randn(4096 * top_k, h, device="cuda", dtype=BF16)
    out["moe_combine_4096_us"] = timeit([lambda: ksort._combine(y, order, wts, 4096, top_k, False)], graph=False,
                                        rep_ms=rep_ms)
    print(f"probe moe grouped fast {out['moe_grouped_4096_fast1_us']:.1f} slow {out['moe_grouped_4096_fast0_us']:.1f}"
          f" sort {out['moe_sort_4096_us']:.1f} combine {out['moe_combine_4096_us']:.1f} gated quant "
          f"{out['gated_quant_32768x1536_us']:.1f} us", flush=True)
    weights = moe = None
    # a few GEMV configs
    for (n, k) in [(14336, 4096), (4096, 14336)]:
        for m in (1, 16):
            copies = max(2, math.ceil(ROTATE_BYTES / (n * k)))
            ws = [torch.randn(n, k, device="cuda").to(FP8) for _ in range(copies)]
            sc = torch.rand(n, 1, device="cuda")
            xs = [torch.randn(m, k, device="cuda", dtype=BF16) for _ in range(copies)]
            res = {}
            for cfg in [None, (16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 8, 3), (64, 256, 8, 3), (16, 1024, 4, 2),
                        (8, 1024, 4, 3), (32, 128, 4, 4), (64, 128, 4, 4)]:
                if cfg and m > 1 and cfg[0] < 16:
                    continue
                c = None if cfg is None else dict(BLOCK_N=cfg[0], BLOCK_K=cfg[1], num_warps=cfg[2],
                                                  num_stages=cfg[3], USE_DOT=m > 1)
                try:
                    fns = [lambda i=i, c=c, xs=xs, ws=ws, sc=sc: gv.fp8_gemv(xs[i], ws[i], sc, config=c)
                           for i in range(copies)]
                    res[str(cfg)] = timeit(fns, graph=True, rep_ms=rep_ms)
                except Exception as ex:
                    res[str(cfg)] = f"{type(ex).__name__}"
            out[f"gemv_{n}x{k}_m{m}"] = res
            print(f"probe gemv N={n} K={k} M={m}: " + ", ".join(
                f"{c}: {v:.1f}" if isinstance(v, float) else f"{c}: {v}" for c, v in res.items()), flush=True)
            ws = xs = None


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------


def headline(linear_rows, moe_rows) -> dict[str, Any]:
    def lin(m):
        r = next((r for r in linear_rows if r["N"] == 14336 and r["K"] == 4096 and r["M"] == m), None)
        return r.get("speedup") if r else None

    def moe(t):
        r = next((r for r in moe_rows if r["model"] == "Qwen3-30B-A3B" and r["tokens"] == t), None)
        return r.get("speedup_vs_bf16_grouped") if r else None

    def smallest(rows, key):
        vals = [r[key] for r in rows if r.get(key)]
        return min(vals) if vals else None

    h = {"linear_speedup_m4096": lin(4096), "linear_speedup_m1": lin(1),
         "linear_speedup_min": smallest(linear_rows, "speedup"),
         "moe_speedup_4096": moe(4096), "moe_speedup_16": moe(16),
         "moe_speedup_min": smallest(moe_rows, "speedup_vs_bf16_grouped")}
    slowest = min((r for r in linear_rows if r.get("speedup")), key=lambda r: r["speedup"], default=None)
    if slowest:
        h["linear_slowest"] = {k: slowest[k] for k in ("shape", "N", "K", "M", "path", "speedup")}
    h["targets"] = dict(TARGETS)
    h["targets_met"] = {k: (h.get(k) is not None and h[k] >= v) for k, v in TARGETS.items() if k in h}
    return h


#: issue 12's targets (the decode/prefill ones are checked by bench_decode.py)
TARGETS = {"linear_speedup_m1": 1.8, "linear_speedup_m4096": 1.8, "linear_speedup_min": 1.2,
           "moe_speedup_4096": 1.5, "moe_speedup_min": 1.2, "decode_speedup_b1": 1.5, "prefill_speedup_4096": 1.5}


def markdown(report) -> str:
    lines = [f"# Fp8Linear / Fp8MoE on {report['gpu']} ({report['date']})", ""]
    lines.append(f"torch {report['torch']}, triton {report['triton']}, CUDA {report['cuda']}. "
                 "Median µs per call (`triton.testing.do_bench`), weights rotated past L2, CUDA graphs for "
                 "every linear and every MoE call (eager MoE times in the JSON).")
    if report.get("runs_note"):  # a table put together from several runs says which
        lines += ["", report["runs_note"]]
    lines.append("")
    lines.append("| headline | value | target |")
    lines.append("| --- | --- | --- |")
    for k, v in report["targets"].items():
        if k not in report:
            continue  # measured by bench_decode.py
        val = report.get(k)
        lines.append(f"| {k} | {val:.2f}x | >= {v}x |" if val is not None else f"| {k} | - | >= {v}x |")
    e2e = [k for k in report if k.startswith(("decode_", "prefill_", "moe_decode_", "moe_prefill_", "logits_sqnr"))]
    if e2e:  # merged in by bench_decode.py
        lines += ["", "## End to end (`bench_decode.py`)", "", "| key | value |", "| --- | --- |"]
        lines += [f"| {k} | {report[k]:.2f}{'' if 'sqnr' in k else 'x'} |" if isinstance(report[k], (int, float))
                  else f"| {k} | - |" for k in e2e]
    lines += ["", "## Linear", "",
              "| shape | N | K | M | path | bf16 µs | Fp8Linear µs | torch quant + _scaled_mm µs | speedup vs bf16 "
              "| vs torch fp8 | fp8 TFLOP/s | SQNR dB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def f(v, fmt="{:.1f}"):
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    for r in report["linear"]:
        lines.append(f"| {r['shape']} | {r['N']} | {r['K']} | {r['M']} | {r['path']} | {f(r.get('us_bf16'))} | "
                     f"{f(r.get('us_fp8'))} | {f(r.get('us_scaled_mm_torch'))} | {f(r.get('speedup'), '{:.2f}x')} | "
                     f"{f(r.get('speedup_vs_scaled_mm_torch'), '{:.2f}x')} | {f(r.get('tflops_fp8'), '{:.0f}')} | "
                     f"{f(r.get('sqnr_fp8'))} |")
    lines += ["", "## MoE", "",
              "| model | tokens | auto | Fp8MoE µs | triton W8A16 µs | triton W8A8 µs | grouped W8A8 µs | "
              "bf16 grouped µs | Fp8MoE / bf16 grouped eager µs | bf16 loop µs (eager) | vs bf16 grouped "
              "| vs bf16 loop | SQNR dB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["moe"]:
        lines.append(f"| {r['model']} | {r['tokens']} | {r['auto_backend']} | {f(r.get('us_fp8'))} | "
                     f"{f(r.get('us_fp8_triton'))} | {f(r.get('us_fp8_triton_a8'))} | {f(r.get('us_fp8_grouped'))} | "
                     f"{f(r.get('us_bf16_grouped'))} | {f(r.get('fp8_eager_us'))} / "
                     f"{f(r.get('bf16_grouped_eager_us'))} | {f(r.get('us_bf16_loop'))} | "
                     f"{f(r.get('speedup_vs_bf16_grouped'), '{:.2f}x')} | {f(r.get('speedup_vs_bf16_loop'), '{:.2f}x')}"
                     f" | {f(r.get('sqnr_fp8'))} |")
    if report["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benches/results/modules_h200.json")
    ap.add_argument("--quick", action="store_true", help="headline shapes only")
    ap.add_argument("--tune", action="store_true", help="also sweep GEMV / MoE launch configs")
    ap.add_argument("--only", choices=["linear", "moe", "tune", "probe"], default=None)
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--moe-tokens", default=None,
                    help=f"comma-separated token counts of the MoE table (default {','.join(map(str, MOE_TOKENS))})")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    import triton

    report: dict[str, Any] = {
        "gpu": props.name,
        "sm": f"{props.major}.{props.minor}",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "env": {k: v for k, v in os.environ.items() if k.startswith("FASTFP8_")},
        "linear_table": _table_info(),
        "linear": [],
        "moe": [],
        "tune": {"gemv": [], "moe": []},
        "probe": {},
        "errors": [],
    }
    lin_shapes = {"8B gate/up": LINEAR_SHAPES["8B gate/up"]} if args.quick else LINEAR_SHAPES
    lin_m = [1, 16, 4096] if args.quick else LINEAR_M
    moe_shapes = {"Qwen3-30B-A3B": MOE_SHAPES["Qwen3-30B-A3B"]} if args.quick else MOE_SHAPES
    moe_tokens = [16, 4096] if args.quick else MOE_TOKENS
    if args.moe_tokens:
        moe_tokens = [int(t) for t in args.moe_tokens.split(",")]
    if args.only in (None, "linear"):
        bench_linear(lin_shapes, lin_m, args.rep_ms, report["linear"], report["errors"])
    if args.only in (None, "moe"):
        bench_moe(moe_shapes, moe_tokens, args.rep_ms, report["moe"], report["errors"])
    if args.only == "probe":
        probe(max(20, args.rep_ms // 2), report["probe"])
    if args.tune or args.only == "tune":
        tune_gemv(max(20, args.rep_ms // 4), report["tune"]["gemv"])
        tune_moe(max(20, args.rep_ms // 4), report["tune"]["moe"])
    report.update(headline(report["linear"], report["moe"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
