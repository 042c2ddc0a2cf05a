"""What bounds the small-M FP8 linear (decode): the W8A16 GEMV kernel of
:mod:`fastfp8.kernels.gemv` against the rate its loads alone reach and against other ways of
doing the same product, per shape, M = 1 - 16; bf16 ``F.linear`` beside them.

Variants (every output checked against an fp32 reference before it is timed):

- ``gemv/BN/BK/W/S(/1/L)``: the package's kernel with that config (elementwise at M = 1,
  ``tl.dot`` in the activation dtype above; ``L``: the M = 1 loop's ring of asynchronous copies);
- ``loads/BN/BK/W/S``: the same loads of the weight (as int32 words) with an XOR instead of
  the product: the ceiling of that load pattern, no conversions, no arithmetic (``S`` = 1:
  each step loads into registers; ``S`` > 1: through a ring of ``S`` asynchronous copies);
- ``wt16/BN/BK/W/S``: W8A16 with the product transposed, ``W [BN, BK] @ x.T [BK, 16]``
  (the weight is the MMA's M side: 64 rows of it fill one warpgroup instruction);
- ``g1pP/BN/BK/W``: M = 1 with the next weight tile loaded before the current one's products
  (registers double-buffered), ``P`` programs per SM walking row blocks in one flat loop
  (``P`` = 0: one row block a program);
- ``wt8/BN/BK/W/S``: W8A8 transposed the same way, the activations quantized per token
  inside the kernel (amax pass, then e4m3 in registers, as ``act_quant``): the weight goes to
  the tensor cores as it is, with no widening.

On the GPU machine (from the repo root)::

    python benches/probe_gemv.py --out $OUT/probe_gemv.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import fastfp8  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from fastfp8.kernels import gemv as gv
from fastfp8.kernels.common import sqnr, tl, triton
from timing import ROTATE_BYTES, timeit

BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
SHAPES = [(14336, 4096), (4096, 4096), (4096, 14336), (6144, 4096), (1024, 4096), (28672, 8192), (512, 2048),
          (2048, 4096)]
MS = [1]
GEMV_CFGS = [(32, 256, 4, 3), (16, 512, 4, 3), (8, 1024, 4, 3), (4, 2048, 4, 3)]
# (..., SPLIT_K, LOAD_STAGES): the M == 1 loop's weight tiles through a ring of asynchronous copies
GEMV_CFGS += [(bn, bk, w, s, 1, s) for bn, bk in ((32, 256), (16, 512), (8, 1024), (4, 2048)) for w in (4, 8)
              for s in (3, 4, 6)]
# (BLOCK_N, BLOCK_K, num_warps, stages): stages 1 loads into registers, > 1 through asynchronous copies
LOAD_CFGS = [(8, 1024, 4, 1), (8, 2048, 8, 1), (8, 1024, 4, 3), (8, 1024, 4, 4), (16, 512, 4, 4), (32, 256, 4, 4),
             (8, 1024, 8, 6), (16, 1024, 8, 4)]
# prefetching M == 1 kernel (BLOCK_N, BLOCK_K, num_warps), with PERSIST programs per SM (0: not persistent)
G1_CFGS = [(8, 1024, 4), (4, 1024, 2), (4, 2048, 4), (16, 512, 4), (8, 512, 2), (16, 1024, 8), (32, 256, 4)]
G1_PERSIST: list[int] = []  # measured slower than the plain kernel at every shape (0, 4, 8, 16 per SM)
H16_CFGS = [(8, 1024, 4), (4, 2048, 4), (16, 512, 4), (32, 256, 4), (8, 2048, 8), (16, 1024, 8), (4, 1024, 2)]
T_CFGS = [(64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 4), (128, 256, 8, 3), (64, 512, 4, 3), (128, 128, 8, 4)]
T_SPLIT = [(64, 128, 4, 4, 2), (64, 256, 4, 3, 4), (64, 128, 4, 4, 4)]


if triton is not None:

    @triton.jit
    def _loads_kernel(w_ptr, y_ptr, N, KW, sw_n, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      STAGES: tl.constexpr):
        """XOR of every int32 word of BLOCK_N rows: the weight's loads alone."""
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rn = tl.where(rn < N, rn, 0)
        rk = tl.arange(0, BLOCK_K)
        ptrs = w_ptr + rn[:, None] * sw_n + rk[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
        for _ in tl.range(0, KW, BLOCK_K, num_stages=STAGES):
            acc ^= tl.load(ptrs, eviction_policy="evict_first")
            ptrs += BLOCK_K
        tl.store(y_ptr + pid * BLOCK_N + tl.arange(0, BLOCK_N), tl.xor_sum(acc, axis=1))

    @triton.jit
    def _gemv1_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, sw_n, KT: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, PERSIST: tl.constexpr):
        """M == 1, K a multiple of BLOCK_K (KT steps a row block): the next step's weight tile
        loaded before this step's products (registers double-buffered). ``PERSIST``: a grid of
        a few programs per SM, each walking row blocks ``pid, pid + grid, ...`` in one flat
        loop (the prefetch crosses row blocks); else one row block a program."""
        pid = tl.program_id(0)
        rk = tl.arange(0, BLOCK_K)
        r0 = tl.arange(0, BLOCK_N)
        if PERSIST:
            nprog = tl.num_programs(0)
            total = tl.cdiv(tl.cdiv(N, BLOCK_N) - pid, nprog) * KT
        else:
            nprog = 1
            total = KT
        rn = pid * BLOCK_N + r0
        w_nx = tl.load(w_ptr + tl.where(rn < N, rn, 0)[:, None] * sw_n + rk[None, :], eviction_policy="evict_first")
        x_nx = tl.load(x_ptr + rk)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for it in range(0, total):
            w = w_nx
            xv = x_nx
            nx = tl.minimum(it + 1, total - 1)
            rn_nx = (pid + (nx // KT) * nprog) * BLOCK_N + r0
            k_nx = (nx % KT) * BLOCK_K
            w_nx = tl.load(w_ptr + tl.where(rn_nx < N, rn_nx, 0)[:, None] * sw_n + (k_nx + rk)[None, :],
                           eviction_policy="evict_first")
            x_nx = tl.load(x_ptr + k_nx + rk)
            acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
            if it % KT == KT - 1:
                rn = (pid + (it // KT) * nprog) * BLOCK_N + r0
                n_ok = rn < N
                y = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=n_ok, other=0.0)
                tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)
                acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)

    @triton.jit
    def _h16_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, sw_n, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """M == 1, K a multiple of BLOCK_K: products and the per-lane sums in fp16 pairs
        (``x`` scaled by a power of two into [-1, 1], exactly), the final sum in fp32."""
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rn = tl.where(n_ok, rn, 0)
        rk = tl.arange(0, BLOCK_K)
        m = tl.zeros([BLOCK_K], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            m = tl.maximum(m, tl.load(x_ptr + k0 + rk).to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF)
        e = ((tl.max(m, axis=0) >> 23) & 0xFF) - 126  # amax < 2 ** (e - 127 + 1)... as a biased exponent step
        e = tl.minimum(tl.maximum(e, -100), 120)
        inv = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2 ** -e
        back = ((127 + e) << 23).to(tl.float32, bitcast=True)  # 2 ** e
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float16)
        w_ptrs = w_ptr + rn[:, None] * sw_n + rk[None, :]
        for k0 in range(0, K, BLOCK_K):
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            xh = (tl.load(x_ptr + k0 + rk).to(tl.float32) * inv).to(tl.float16)
            acc += w.to(tl.float16) * xh[None, :]
            w_ptrs += BLOCK_K
        y = tl.sum(acc.to(tl.float32), axis=1) * back * tl.load(s_ptr + rn)
        tl.store(y_ptr + pid * BLOCK_N + tl.arange(0, BLOCK_N), y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _wt_kernel(x_ptr, w_ptr, s_ptr, y_ptr, p_ptr, M, N, K, sx_m, sw_n, sy_m,
                   A8: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        """``y[:, n] = (W[n, :] @ x.T)`` with the weight as the MMA's M side; W8A8 (``A8``:
        activations quantized per row here) or W8A16. Split-K writes fp32 partials
        ``[SPLIT_K, M, N]`` (summed outside: a probe)."""
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        m_ok = rm < M
        rn_safe = tl.where(n_ok, rn, 0)
        per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = tl.program_id(1) * per
        k_hi = tl.minimum(k_lo + per, K)
        if A8:  # the rows' amax over the whole K (every split needs the same scale)
            amax = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            xp = x_ptr + rm[:, None] * sx_m + rk[None, :]
            for _ in range(0, K, BLOCK_K):
                amax = tl.maximum(amax, tl.abs(tl.load(xp, mask=m_ok[:, None], other=0.0).to(tl.float32)))
                xp += BLOCK_K
            a = tl.max(amax, axis=1)
            xs = tl.div_rn(a, tl.full([BLOCK_M], 448.0, tl.float32))
            xs = tl.where(xs < 1.0 / (448.0 * 512.0), 1.0 / (448.0 * 512.0), xs)
            inv = tl.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), xs)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        w_ptrs = w_ptr + rn_safe[:, None] * sw_n + (k_lo + rk)[None, :]
        x_ptrs = x_ptr + rm[:, None] * sx_m + (k_lo + rk)[None, :]
        for _ in range(k_lo, k_hi, BLOCK_K):
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            if A8:
                v = x.to(tl.float32) * inv[:, None]
                v = tl.minimum(tl.maximum(v, -448.0), 448.0)
                acc = tl.dot(w, tl.trans(v.to(tl.float8e4nv)), acc)
            else:
                acc = tl.dot(w.to(x.dtype), tl.trans(x), acc)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        out = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
        mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K > 1:
            tl.store(p_ptr + tl.program_id(1) * M * N + rm[:, None] * N + rn[None, :], out, mask=mask)
        else:
            scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0)
            out = out * scale[None, :]
            if A8:
                out = out * xs[:, None]
            tl.store(y_ptr + rm[:, None] * sy_m + rn[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


def loads(w32: torch.Tensor, cfg) -> torch.Tensor:
    bn, bk, nw, ns = cfg
    n, kw = w32.shape
    y = torch.empty(triton.cdiv(n, bn) * bn, dtype=torch.int32, device=w32.device)
    _loads_kernel[(triton.cdiv(n, bn),)](w32, y, n, kw, w32.stride(0), BLOCK_N=bn, BLOCK_K=bk // 4, STAGES=ns,
                                         num_warps=nw, num_stages=ns)
    return y


def gemv1(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, cfg, persist: int) -> torch.Tensor:
    """``persist``: programs per SM (0: one row block a program)."""
    bn, bk, nw = cfg
    n, k = w.shape
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(n, bn)
    grid = min(tiles, persist * gv._num_sms(x.device.index or 0)) if persist else tiles
    _gemv1_kernel[(grid,)](x, w, s, y, n, w.stride(0), KT=k // bk, BLOCK_N=bn, BLOCK_K=bk, PERSIST=bool(persist),
                           num_warps=nw, num_stages=1)
    return y


def h16(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, cfg) -> torch.Tensor:
    bn, bk, nw = cfg
    n, k = w.shape
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _h16_kernel[(triton.cdiv(n, bn),)](x, w, s, y, n, k, w.stride(0), BLOCK_N=bn, BLOCK_K=bk, num_warps=nw,
                                       num_stages=3)
    return y


def wt(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, cfg, a8: bool) -> torch.Tensor:
    bn, bk, nw, ns, *split = cfg
    sk = split[0] if split else 1
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    p = torch.empty((sk, m, n), dtype=torch.float32, device=x.device) if sk > 1 else y
    _wt_kernel[(triton.cdiv(n, bn), sk)](x, w, s, y, p, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                                         A8=a8, SPLIT_K=sk, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk,
                                         num_warps=nw, num_stages=ns)
    if sk > 1:  # the probe's stand-in for the in-kernel reduction (a second small kernel);
        # W8A8 partials lack the activations' scales: timed, not checked (run_shape)
        y = p.sum(0).mul_(s.reshape(1, n)).to(x.dtype)
    return y


def run_shape(n, k, rep_ms, res):
    from fastfp8.quant import quantize_channelwise

    copies = max(2, min(8, math.ceil(ROTATE_BYTES / (n * k))))
    wbs = [torch.randn(n, k, device="cuda", dtype=BF16) / math.sqrt(k) for _ in range(copies)]
    qs = [quantize_channelwise(w, rounding="fp32") for w in wbs]
    ws = [q for q, _ in qs]
    sws = [s.float().reshape(n).contiguous() for _, s in qs]
    w32 = [w.view(torch.int32) for w in ws]
    for m in MS:
        xs = [torch.randn(m, k, device="cuda", dtype=BF16) for _ in range(copies)]
        ref = xs[0].float() @ (ws[0].float() * sws[0][:, None]).t()
        case = {"N": n, "K": k, "M": m, "weight_mb": n * k / 1e6, "us": {}, "sqnr": {}, "err": {}}
        bf16 = [lambda i=i, xs=xs: torch.nn.functional.linear(xs[i], wbs[i]) for i in range(copies)]
        case["us"]["bf16"] = timeit(bf16, rep_ms=rep_ms, warmup_ms=5)
        cands = []
        for c in GEMV_CFGS:
            launch = gv.config_of(c, m)
            cands.append((f"gemv/{'/'.join(map(str, c))}",
                          lambda i, cfg=launch, xs=xs: gv.fp8_gemv(xs[i], ws[i], sws[i], config=cfg), True))
        if m == 1:
            for c in LOAD_CFGS:
                cands.append((f"loads/{'/'.join(map(str, c))}", lambda i, c=c: loads(w32[i], c), False))
        if m == 1:
            for c in H16_CFGS:
                if k % c[1] == 0:
                    cands.append((f"h16/{'/'.join(map(str, c))}",
                                  lambda i, c=c, xs=xs: h16(xs[i], ws[i], sws[i], c), True))
        if m == 1 and G1_PERSIST:
            for c in G1_CFGS:
                if k % c[1]:
                    continue
                for p in G1_PERSIST:
                    cands.append((f"g1p{p}/{'/'.join(map(str, c))}",
                                  lambda i, c=c, p=p, xs=xs: gemv1(xs[i], ws[i], sws[i], c, p), True))
        for a8 in (False, True) if m > 1 else ():
            for c in T_CFGS + T_SPLIT:
                tag = ("wt8/" if a8 else "wt16/") + "/".join(map(str, c))
                cands.append((tag, lambda i, c=c, a8=a8, xs=xs: wt(xs[i], ws[i], sws[i], c, a8), len(c) == 4 or not a8))
        for name, f, check in cands:
            try:
                out = f(0)
                torch.cuda.synchronize()
                if check:
                    db = sqnr(out.float(), ref)
                    case["sqnr"][name] = db
                    if not db >= 25:
                        case["err"][name] = f"sqnr {db:.1f}"
                        continue
                case["us"][name] = timeit([lambda i=i, f=f: f(i) for i in range(copies)], rep_ms=rep_ms,
                                          warmup_ms=5)
            except Exception as e:
                case["err"][name] = f"{type(e).__name__}: {str(e)[:160]}"
        res["cases"].append(case)
        us = case["us"]
        fams = {}
        for name, t in us.items():
            fam = name.split("/")[0]
            if fam not in fams or t < us[fams[fam]]:
                fams[fam] = name
        line = "  ".join(f"{fam} {us[nm]:.1f} ({nm.partition('/')[2]}; {n * k / us[nm] / 1e6:.2f} TB/s)"
                         for fam, nm in sorted(fams.items()))
        print(f"N={n} K={k} M={m}: {line}  errs {len(case['err'])}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="probe_gemv.json")
    ap.add_argument("--rep-ms", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=240)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cases": [], "errors": []}
    for n, k in SHAPES:
        if time.monotonic() - t0 > args.budget_s:
            res["errors"].append(f"budget: stopped before {n}x{k}")
            break
        try:
            run_shape(n, k, args.rep_ms, res)
        except Exception as e:
            traceback.print_exc()
            res["errors"].append(f"{n}x{k}: {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(res, indent=1))
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
