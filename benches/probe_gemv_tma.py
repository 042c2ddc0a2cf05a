"""Can the M = 1 W8A16 GEMV (``y[1, N] = x[1, K] @ (w[N, K] fp8 e4m3, widened).T * scale[N]``)
stream the weight faster than :mod:`fastfp8.kernels.gemv`'s kernel? Per shape: TMA weight loads,
a persistent flat loop, split-K with atomics, against the package's kernel and bf16 ``F.linear``.

Variants (every output checked against the fp32 reference, ``gv.fp8_gemv_reference`` on
``x.float()``, in a NaN-poisoned output buffer before it is timed; ``tmaload*`` and ``ldref``
checked bit for bit against the XOR of the weight's int32 words):

- ``bf16``: ``F.linear`` on a bf16 weight; ``pkg``: ``fp8_gemv`` with the selection table's row
  for the shape (what ``fp8_linear`` runs at M = 1); ``pkg0``: ``fp8_gemv`` with no config (the
  kernel's own heuristic, ``gemv_config``);
- ``ldref/BN/BK/W/S``: ``probe_gemv``'s loads-alone kernel (plain pointer loads, XOR), the
  ceiling measured before, for comparison in the same run;
- ``tmaload/BN/BK/W/S`` (``tmaloadh``: host-side descriptor): the loads alone through TMA, the
  weight read as int32 words ``[N, K / 4]`` with a device-side tensor descriptor
  (``tl.make_tensor_descriptor``), ``tl.range(..., num_stages=S)``, XOR-reduced and stored;
- ``tma/BN/BK/W/S`` (``tmah``: host-side ``TensorDescriptor``): the full GEMV with the weight's
  tiles through TMA, ``[BN, BK]`` fp32 products accumulated, one ``tl.sum`` at the end;
- ``tmaload3``, ``tma3`` (``tma3h``): the same with the weight viewed as ``[N, K / 128, 128]``
  bytes, so that a tile is one TMA message (Triton 3.6 splits a 2-D ``[BN, BK]`` box into
  ``BK / 128`` messages of ``[BN, 128]`` bytes: the 128-byte swizzle's width); accumulator
  ``[BN, BK / 128, 128]``;
- ``flat/BN/BK/W/S/P`` (``flattma``: the weight through a device-side descriptor): persistent,
  ``P`` programs per SM, each owning a contiguous range of row blocks and walking (row block,
  k tile) in one flat ``tl.range`` loop; accumulator stored and reset at a row block's last tile;
- ``split/BN/BK/W/S/SK``: the package-style loop over a K range, ``SK`` splits added with
  ``tl.atomic_add`` into an fp32 buffer, then a small epilogue kernel (scale, bf16, buffer back to 0).

Timing: :func:`timing.timeit` (CUDA graphs, weight copies rotated past L2), as ``probe_gemv``.
Compilation: the sweep's kernels are compiled first in a pool of processes (``--jobs``), which
fills Triton's on-disk cache for the main process; ``--jobs 0`` compiles on first use.

On the GPU machine (from the repo root)::

    python benches/probe_gemv_tma.py --out $OUT/probe_gemv_tma.json

Self-test (tiny shapes, every variant checked; on a CPU machine under ``TRITON_INTERPRET=1``,
re-executed so by itself where there is no GPU)::

    python benches/probe_gemv_tma.py --self-test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
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

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton without host-side descriptors: the *h variants error
    TensorDescriptor = None

try:  # the loads-alone kernel measured before (a reference point in the same run)
    import probe_gemv
except Exception:  # (another file: whatever breaks it must not stop this probe)
    probe_gemv = None

BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
SHAPES = [(14336, 4096), (28672, 8192), (4096, 4096), (6144, 4096), (4096, 14336), (1024, 4096)]
MIN_SQNR = 30.0  # bf16 output rounding alone gives ~50 dB

# (BLOCK_N, BLOCK_K, num_warps, stages); BLOCK_K in bytes of the weight (fp8 elements). Each
# line compiles once per distinct (BLOCK_N, BLOCK_K, num_warps, stages): 72 kernels in all.
LDREF_CFGS = [(8, 1024, 4, 1), (8, 1024, 4, 4), (16, 1024, 8, 4)]
# the loads alone: an int32 accumulator of BN * BK / 4 words (BN * BK up to 32 KiB at 8 warps)
TMALOAD_CFGS = [(8, 1024, 4, 3), (8, 1024, 4, 4), (8, 1024, 4, 6), (16, 512, 4, 4), (32, 256, 4, 4),
                (4, 2048, 4, 4), (16, 1024, 8, 4), (16, 1024, 8, 6), (64, 256, 8, 4), (32, 1024, 8, 3)]
TMALOADH_CFGS = [(8, 1024, 4, 4), (16, 1024, 8, 4), (16, 1024, 8, 6), (64, 256, 8, 4)]
TMALOAD3_CFGS = [(8, 1024, 4, 4), (8, 1024, 4, 6), (16, 1024, 8, 4), (32, 256, 4, 4), (64, 256, 8, 4),
                 (16, 2048, 8, 3)]
# the GEMV's [BN, BK] fp32 accumulator: BN * BK <= 2048 * num_warps (<= 64 registers a thread)
TMA_CFGS = [(8, 1024, 4, 2), (8, 1024, 4, 3), (8, 1024, 4, 4), (8, 1024, 4, 6), (16, 512, 4, 3), (16, 512, 4, 4),
            (16, 512, 4, 6), (32, 256, 4, 4), (4, 2048, 4, 4), (4, 1024, 4, 4), (16, 1024, 8, 4), (16, 1024, 8, 6),
            (8, 2048, 8, 4), (64, 256, 8, 4)]
TMAH_CFGS = [(8, 1024, 4, 3), (8, 1024, 4, 4), (8, 1024, 4, 6), (16, 512, 4, 4), (16, 1024, 8, 4), (32, 256, 4, 4)]
TMA3_CFGS = [(8, 1024, 4, 3), (8, 1024, 4, 4), (8, 1024, 4, 6), (16, 512, 4, 4), (32, 256, 4, 4), (4, 2048, 4, 4),
             (16, 1024, 8, 4), (16, 1024, 8, 6), (64, 256, 8, 4), (32, 512, 8, 4)]
TMA3H_CFGS = [(8, 1024, 4, 4), (8, 1024, 4, 6), (16, 1024, 8, 4), (32, 256, 4, 4)]
# (BLOCK_N, BLOCK_K, num_warps, stages, programs per SM): P does not change the compiled kernel
FLAT_CFGS = [(8, 1024, 4, s, p) for s in (3, 4, 6) for p in (1, 2, 4)]
FLAT_CFGS += [(16, 512, 4, 4, p) for p in (1, 2, 4)] + [(16, 1024, 8, 4, p) for p in (1, 2)]
FLAT_CFGS += [(4, 2048, 4, 4, p) for p in (1, 2)]
FLATTMA_CFGS = [(8, 1024, 4, s, p) for s in (3, 4, 6) for p in (1, 2)]
FLATTMA_CFGS += [(16, 1024, 8, 4, p) for p in (1, 2)] + [(16, 512, 4, 4, p) for p in (1, 2)]
# (BLOCK_N, BLOCK_K, num_warps, stages, splits): the split count does not change the compiled kernel
SPLIT_CFGS = [(8, 1024, 4, 4, 2), (8, 1024, 4, 4, 4), (16, 512, 4, 4, 2), (16, 512, 4, 4, 4), (4, 2048, 4, 4, 2),
              (32, 256, 4, 4, 2)]

# host-side descriptors (the package's GEMM uses them) before device-side ones: a kernel that
# breaks the CUDA context ends the run (results so far written)
SWEEP = {"ldref": LDREF_CFGS, "flat": FLAT_CFGS, "split": SPLIT_CFGS, "tmaloadh": TMALOADH_CFGS, "tmah": TMAH_CFGS,
         "tma3h": TMA3H_CFGS, "tmaload": TMALOAD_CFGS, "tmaload3": TMALOAD3_CFGS, "tma": TMA_CFGS, "tma3": TMA3_CFGS,
         "flattma": FLATTMA_CFGS}
#: the self-test's configs (tiny tiles, K = 512 or 1024)
SELF_TEST = {"ldref": [(8, 128, 4, 1), (16, 256, 4, 3)],
             "tmaload": [(8, 128, 4, 2), (16, 256, 4, 3)], "tmaloadh": [(8, 256, 4, 3)],
             "tmaload3": [(8, 256, 4, 2), (16, 128, 4, 3)],
             "tma": [(8, 128, 4, 2), (16, 256, 4, 3)], "tmah": [(8, 128, 4, 3)],
             "tma3": [(8, 256, 4, 2), (16, 128, 4, 3)], "tma3h": [(8, 256, 4, 3)],
             "flat": [(8, 128, 4, 3, 1), (8, 256, 4, 2, 2), (16, 128, 4, 3, 4)],
             "flattma": [(8, 128, 4, 3, 1), (16, 256, 4, 2, 2)],
             "split": [(8, 128, 4, 2, 2), (16, 128, 4, 3, 4)]}


if triton is not None:

    @triton.jit
    def _tmaload_kernel(w, y_ptr, N, KW, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, STAGES: tl.constexpr,
                        HOST: tl.constexpr):
        """XOR of every int32 word of BLOCK_N rows, the tiles through TMA (``w``: a host-side
        descriptor of ``[N, KW]`` int32, or the int32 pointer to make one from here)."""
        pid = tl.program_id(0)
        if HOST:
            desc = w
        else:
            desc = tl.make_tensor_descriptor(w, shape=[N, KW], strides=[KW, 1], block_shape=[BLOCK_N, BLOCK_KW])
        n0 = pid * BLOCK_N
        acc = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.int32)
        for k0 in tl.range(0, KW, BLOCK_KW, num_stages=STAGES):
            acc ^= desc.load([n0, k0])
        tl.store(y_ptr + n0 + tl.arange(0, BLOCK_N), tl.xor_sum(acc, axis=1))

    @triton.jit
    def _tma_kernel(x_ptr, w, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    STAGES: tl.constexpr, HOST: tl.constexpr):
        """M == 1, K a multiple of BLOCK_K, the weight's tiles through TMA: elementwise fp32
        products in a ``[BLOCK_N, BLOCK_K]`` accumulator, one sum at the end."""
        pid = tl.program_id(0)
        if HOST:  # noqa: SIM108 (a constexpr branch: the descriptor is made only where asked)
            desc = w
        else:
            desc = tl.make_tensor_descriptor(w, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        n0 = pid * BLOCK_N
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            wt = desc.load([n0, k0])
            xv = tl.load(x_ptr + k0 + rk)
            acc += wt.to(tl.float32) * xv.to(tl.float32)[None, :]
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        y = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=n_ok, other=0.0)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _tmaload3_kernel(w, y_ptr, N, KW, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, STAGES: tl.constexpr,
                         HOST: tl.constexpr):
        """``_tmaload_kernel`` with the int32 words as ``[N, KW / 32, 32]``: one TMA message a
        tile (a 2-D box is 128 bytes wide under the 128-byte swizzle: ``BLOCK_KW / 32`` of them)."""
        J: tl.constexpr = BLOCK_KW // 32
        pid = tl.program_id(0)
        if HOST:
            desc = w
        else:
            desc = tl.make_tensor_descriptor(w, shape=[N, KW // 32, 32], strides=[KW, 32, 1],
                                             block_shape=[BLOCK_N, J, 32])
        n0 = pid * BLOCK_N
        acc = tl.zeros([BLOCK_N, J, 32], dtype=tl.int32)
        for k0 in tl.range(0, KW, BLOCK_KW, num_stages=STAGES):
            acc ^= desc.load([n0, k0 // 32, 0])
        tl.store(y_ptr + n0 + tl.arange(0, BLOCK_N), tl.xor_sum(tl.xor_sum(acc, axis=2), axis=1))

    @triton.jit
    def _tma3_kernel(x_ptr, w, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     STAGES: tl.constexpr, HOST: tl.constexpr):
        """``_tma_kernel`` with the weight as ``[N, K / 128, 128]``: one TMA message of
        ``BLOCK_N * BLOCK_K`` bytes a tile (2-D: ``BLOCK_K / 128`` messages of 128-byte rows);
        the accumulator ``[BLOCK_N, BLOCK_K / 128, 128]``."""
        J: tl.constexpr = BLOCK_K // 128
        pid = tl.program_id(0)
        if HOST:
            desc = w
        else:
            desc = tl.make_tensor_descriptor(w, shape=[N, K // 128, 128], strides=[K, 128, 1],
                                             block_shape=[BLOCK_N, J, 128])
        n0 = pid * BLOCK_N
        xo = tl.arange(0, J)[:, None] * 128 + tl.arange(0, 128)[None, :]
        acc = tl.zeros([BLOCK_N, J, 128], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            wt = desc.load([n0, k0 // 128, 0])
            xv = tl.load(x_ptr + k0 + xo)
            acc += wt.to(tl.float32) * xv.to(tl.float32)[None, :, :]
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        y = tl.sum(tl.sum(acc, axis=2), axis=1) * tl.load(s_ptr + rn, mask=n_ok, other=0.0)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _flat_kernel(x_ptr, w, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     STAGES: tl.constexpr, TMA: tl.constexpr):
        """Persistent M == 1: program ``pid`` of ``G`` owns row blocks ``[pid * nb // G, (pid + 1)
        * nb // G)`` and walks (row block, k tile) in one flat loop (the pipeline runs across
        row blocks); a row block's sums are stored, and the accumulator reset, at its last
        tile. ``TMA``: ``w`` is the fp8 pointer to make a descriptor from; else plain loads
        (asynchronous copies through ``num_stages``)."""
        pid = tl.program_id(0)
        g = tl.num_programs(0)
        nb = tl.cdiv(N, BLOCK_N)
        lo = pid * nb // g
        hi = (pid + 1) * nb // g
        kt_n = K // BLOCK_K
        total = (hi - lo) * kt_n
        r0 = tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        if TMA:
            desc = tl.make_tensor_descriptor(w, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for t in tl.range(0, total, num_stages=STAGES):
            q = t // kt_n
            kt = t - q * kt_n
            rb = lo + q
            k0 = kt * BLOCK_K
            if TMA:
                wt = desc.load([rb * BLOCK_N, k0])
            else:
                rn = rb * BLOCK_N + r0
                rn = tl.where(rn < N, rn, 0)
                wt = tl.load(w + rn[:, None] * K + (k0 + rk)[None, :], eviction_policy="evict_first")
            xv = tl.load(x_ptr + k0 + rk)
            acc += wt.to(tl.float32) * xv.to(tl.float32)[None, :]
            if kt == kt_n - 1:
                rn_o = rb * BLOCK_N + r0
                n_ok = rn_o < N
                y = tl.sum(acc, axis=1) * tl.load(s_ptr + rn_o, mask=n_ok, other=0.0)
                tl.store(y_ptr + rn_o, y.to(y_ptr.dtype.element_ty), mask=n_ok)
                acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)

    @triton.jit
    def _split_kernel(x_ptr, w_ptr, acc_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      STAGES: tl.constexpr):
        """M == 1, split ``program_id(1)`` of ``num_programs(1)`` (K a multiple of splits *
        BLOCK_K): the package's loop over its K range, the row sums added into ``acc_ptr``."""
        pid = tl.program_id(0)
        per = (K // BLOCK_K) // tl.num_programs(1) * BLOCK_K  # a multiple of BLOCK_K, known as one: the
        k_lo = tl.program_id(1) * per  # loads stay 16-byte vectors (else no asynchronous copies either)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rn_safe = tl.where(n_ok, rn, 0)
        rk = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rn_safe[:, None] * K + (k_lo + rk)[None, :]
        x_ptrs = x_ptr + k_lo + rk
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for _ in tl.range(0, per, BLOCK_K, num_stages=STAGES):
            wt = tl.load(w_ptrs, eviction_policy="evict_first")
            xv = tl.load(x_ptrs)
            acc += wt.to(tl.float32) * xv.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        tl.atomic_add(acc_ptr + rn, tl.sum(acc, axis=1), mask=n_ok, sem="relaxed")

    @triton.jit
    def _split_epilogue(acc_ptr, s_ptr, y_ptr, N, BLOCK: tl.constexpr):
        """``y = acc * scale`` in y's dtype; ``acc`` back to zero for the next call."""
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = r < N
        a = tl.load(acc_ptr + r, mask=ok, other=0.0)
        y = a * tl.load(s_ptr + r, mask=ok, other=0.0)
        tl.store(y_ptr + r, y.to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(acc_ptr + r, tl.zeros_like(a), mask=ok)


# ---------------------------------------------------------------------------------------
# launches


class _Scratch:
    """Triton's global-scratch allocator (device-side tensor descriptors live there, 128 bytes a
    program): one buffer per size, kept for the process, so that nothing is allocated while a
    CUDA graph is captured and every replay finds its buffer. Launches on one stream never
    overlap, so kernels may share a buffer."""

    def __init__(self):
        self.bufs: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, size: int, alignment: int, stream):
        dev = torch.cuda.current_device()
        key = (dev, max(int(size), 1))
        b = self.bufs.get(key)
        if b is None:
            b = self.bufs[key] = torch.empty(key[1], dtype=torch.int8, device=f"cuda:{dev}")
        return b


def setup_allocator() -> None:
    """``triton.set_allocator`` (a context variable: set in every process that launches)."""
    if triton is not None and hasattr(triton, "set_allocator") and not INTERPRET:
        triton.set_allocator(_Scratch())


class Case:
    """One shape's operands: ``copies`` weights (fp8 + fp32 scales, their int32 views), inputs,
    outputs (the timed calls write them), split-K buffers, and the fp32 reference of copy 0."""

    def __init__(self, n: int, k: int, device: str, copies: int, *, quantize: bool, seed: int = 0, sms: int = 132):
        self.n, self.k, self.device, self.copies, self.sms = n, k, device, copies, sms
        g = torch.Generator(device=device).manual_seed(seed)
        self.ws, self.sws = [], []
        for _ in range(copies):
            wb = torch.randn(n, k, device=device, dtype=torch.float32, generator=g).div_(math.sqrt(k)).to(BF16)
            if quantize:
                from fastfp8.quant import quantize_channelwise

                q, s = quantize_channelwise(wb, rounding="fp32")
            else:
                q = (torch.randn(n, k, device=device, generator=g) * 64).clamp(-448, 448).to(FP8)
                s = torch.rand(n, device=device, generator=g) / 64 + 1e-3
            self.ws.append(q)
            self.sws.append(s.float().reshape(n).contiguous())
            del wb
        self.w32 = [w.view(torch.int32) for w in self.ws]
        self.xs = [torch.randn(1, k, device=device, generator=g).to(BF16) for _ in range(copies)]
        self.outs = [torch.empty(1, n, device=device, dtype=BF16) for _ in range(copies)]
        self.accs = [torch.zeros(n, device=device, dtype=torch.float32) for _ in range(copies)]
        self.ref = gv.fp8_gemv_reference(self.xs[0].float(), self.ws[0], self.sws[0]).float()
        self._xor = None

    def xor_ref(self, bn: int) -> torch.Tensor:
        """Per row, the XOR of its int32 words (copy 0), as int32 ``[N]``."""
        if self._xor is None:
            a = self.w32[0]
            while a.shape[1] > 1:
                h = a.shape[1] // 2
                b = a[:, :h] ^ a[:, h : 2 * h]
                if a.shape[1] % 2:
                    b[:, 0] ^= a[:, -1]
                a = b
            self._xor = a[:, 0].contiguous()
        return self._xor


def _tag(name, cfg) -> str:
    return f"{name}/{'/'.join(map(str, cfg))}"


def build(name: str, cfg, case: Case):
    """``(f, kind)``: ``f(i, out)`` runs copy ``i`` writing ``out`` (``[1, N]`` bf16, or for
    ``xor`` kinds an int32 ``[>= N]`` buffer of its own: ``out`` unused, the result returned);
    ``kind``: ``"gemv"`` (check against the fp32 reference) or ``"xor"`` (bit for bit). Raises
    ``ValueError("skip: ...")`` where the config does not fit the shape."""
    n, k = case.n, case.k
    bn, bk, nw, ns, *rest = cfg
    if k % bk:
        raise ValueError(f"skip: K % {bk}")
    if name == "ldref":
        if probe_gemv is None:
            raise RuntimeError("probe_gemv did not import")

        def f(i, out):
            return probe_gemv.loads(case.w32[i], cfg)

        return f, "xor"
    host = name.endswith("h")
    if host and TensorDescriptor is None:
        raise RuntimeError("this Triton has no triton.tools.tensor_descriptor.TensorDescriptor")
    if name in ("tmaload", "tmaloadh", "tmaload3", "tmaload3h"):
        ys = [torch.zeros(triton.cdiv(n, bn) * bn, dtype=torch.int32, device=case.device) for _ in range(case.copies)]
        if name.startswith("tmaload3"):
            kern = _tmaload3_kernel
            args = [TensorDescriptor(w, [n, k // 128, 32], [k // 4, 32, 1], [bn, bk // 128, 32]) if host else w
                    for w in case.w32]
        else:
            kern = _tmaload_kernel
            args = [TensorDescriptor(w, [n, k // 4], [k // 4, 1], [bn, bk // 4]) if host else w for w in case.w32]
        grid = (triton.cdiv(n, bn),)

        def f(i, out, ys=ys, args=args, grid=grid):
            kern[grid](args[i], ys[i], n, k // 4, BLOCK_N=bn, BLOCK_KW=bk // 4, STAGES=ns, HOST=host, num_warps=nw,
                       num_stages=ns)
            return ys[i]

        return f, "xor"
    if name in ("tma", "tmah", "tma3", "tma3h"):
        if name.startswith("tma3"):
            kern = _tma3_kernel
            args = [TensorDescriptor(w, [n, k // 128, 128], [k, 128, 1], [bn, bk // 128, 128]) if host else w
                    for w in case.ws]
        else:
            kern = _tma_kernel
            args = [TensorDescriptor(w, [n, k], [k, 1], [bn, bk]) if host else w for w in case.ws]
        grid = (triton.cdiv(n, bn),)

        def f(i, out, args=args, grid=grid):
            kern[grid](case.xs[i], args[i], case.sws[i], out, n, k, BLOCK_N=bn, BLOCK_K=bk, STAGES=ns, HOST=host,
                       num_warps=nw, num_stages=ns)
            return out

        return f, "gemv"
    if name in ("flat", "flattma"):
        (p,) = rest
        grid = (max(1, min(triton.cdiv(n, bn), p * case.sms)),)

        def f(i, out, grid=grid):
            _flat_kernel[grid](case.xs[i], case.ws[i], case.sws[i], out, n, k, BLOCK_N=bn, BLOCK_K=bk, STAGES=ns,
                               TMA=name == "flattma", num_warps=nw, num_stages=ns)
            return out

        return f, "gemv"
    if name == "split":
        (sk,) = rest
        if k % (bk * sk):
            raise ValueError(f"skip: K % ({bk} * {sk})")
        grid = (triton.cdiv(n, bn), sk)
        eb = 1024
        egrid = (triton.cdiv(n, eb),)

        def f(i, out, grid=grid):
            _split_kernel[grid](case.xs[i], case.ws[i], case.accs[i], n, k, BLOCK_N=bn, BLOCK_K=bk, STAGES=ns,
                                num_warps=nw, num_stages=ns)
            _split_epilogue[egrid](case.accs[i], case.sws[i], out, n, BLOCK=eb, num_warps=4)
            return out

        return f, "gemv"
    raise ValueError(f"unknown variant {name}")


def check(f, kind: str, case: Case, bn: int) -> float:
    """Runs copy 0 once into a NaN-poisoned output and returns its SQNR in dB (``xor``: inf
    when every row's XOR matches, else -inf)."""
    out = case.outs[0]
    out.fill_(float("nan"))
    case.accs[0].zero_()
    r = f(0, out)
    if case.device == "cuda":
        torch.cuda.synchronize()
    if kind == "xor":
        return float("inf") if torch.equal(r[: case.n].cpu(), case.xor_ref(bn).cpu()) else float("-inf")
    return sqnr(out.float(), case.ref)


def _err(e: BaseException) -> str:
    """An exception in one line: its type and the last lines of its message (Triton's
    compile errors end with the cause)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {' | '.join(lines[-3:])}"[:400]


def measure(label: str, f, kind: str, case: Case, bn: int, rep_ms: int) -> dict:
    """One config: checked, then timed (``us``, weight ``gbps``)."""
    rec: dict = {"config": label}
    try:
        db = check(f, kind, case, bn)
        rec["sqnr"] = db if math.isfinite(db) else ("exact" if db > 0 else str(db))
        if not (db >= MIN_SQNR):
            rec["error"] = f"check failed: sqnr {db}"
            return rec
        if case.device != "cuda":  # the self-test: checked, not timed
            return rec
        us = timeit([lambda i=i: f(i, case.outs[i]) for i in range(case.copies)], rep_ms=rep_ms, warmup_ms=5)
        rec["us"] = round(us, 3)
        rec["gbps"] = round(case.n * case.k / us / 1e3, 1)
    except Exception as e:  # (a config that fails to compile or run is recorded and skipped)
        rec["error"] = _err(e)
    return rec


def _sm(device: str) -> tuple[int, int]:
    return torch.cuda.get_device_capability() if device == "cuda" else (0, 0)


def baselines(case: Case, rep_ms: int, res_shape: dict) -> None:
    """``bf16`` (``F.linear``), ``pkg`` (the table's config) and ``pkg0`` (no config)."""
    from fastfp8.kernels import linear_table

    n, k = case.n, case.k
    try:
        backend, cfg = linear_table.select(1, n, k, _sm(case.device))
    except Exception as e:
        backend, cfg = "error", None
        res_shape["errors"].append(f"linear_table: {_err(e)}")
    res_shape["table_row"] = [backend, list(cfg) if cfg else None]
    launch = gv.config_of(cfg, 1) if backend == "gemv" and cfg else None
    fams = {
        "pkg": (str(list(cfg)) if launch else "default",
                lambda i, out, c=launch: gv.fp8_gemv(case.xs[i], case.ws[i], case.sws[i], out=out, config=c)),
        "pkg0": ("default", lambda i, out: gv.fp8_gemv(case.xs[i], case.ws[i], case.sws[i], out=out)),
    }
    for fam, (label, f) in fams.items():
        rec = measure(label, f, "gemv", case, 0, rep_ms)
        res_shape["variants"][fam] = [rec]
        _print_rec(fam, rec)
    # bf16 F.linear on bf16 weights of the same shape (their own copies: twice the bytes)
    try:
        g = torch.Generator(device=case.device).manual_seed(1)
        wbs = [torch.randn(n, k, device=case.device, generator=g).div_(math.sqrt(k)).to(BF16)
               for _ in range(case.copies)]
        ref = case.xs[0].float() @ wbs[0].float().t()
        db = sqnr(torch.nn.functional.linear(case.xs[0], wbs[0]).float(), ref)
        rec = {"config": "F.linear", "sqnr": db}
        if case.device == "cuda":
            us = timeit([lambda i=i: torch.nn.functional.linear(case.xs[i], wbs[i]) for i in range(case.copies)],
                        rep_ms=rep_ms, warmup_ms=5)
            rec.update(us=round(us, 3), gbps=round(2 * n * k / us / 1e3, 1))  # its own (bf16) weight bytes
    except Exception as e:
        rec = {"config": "F.linear", "error": _err(e)}
    res_shape["variants"]["bf16"] = [rec]
    _print_rec("bf16", rec)


def _print_rec(fam: str, rec: dict) -> None:
    if "us" in rec:
        s = rec["sqnr"]
        s = f"{s:.1f}" if isinstance(s, float) else s
        print(f"  {fam:9s} {rec['config']:22s} {rec['us']:8.2f} us {rec['gbps']:8.1f} GB/s  sqnr {s}", flush=True)
    elif "error" in rec:
        print(f"  {fam:9s} {rec['config']:22s} {rec['error'][:150]}", flush=True)
    else:  # checked, not timed (the self-test)
        print(f"  {fam:9s} {rec['config']:22s} sqnr {rec.get('sqnr')}", flush=True)


def summarize(res_shape: dict) -> dict:
    best = {}
    us_bf16 = _best_us(res_shape["variants"].get("bf16", []))
    us_pkg = _best_us(res_shape["variants"].get("pkg", []))
    for fam, recs in res_shape["variants"].items():
        ok = [r for r in recs if "us" in r]
        if not ok:
            continue
        r = min(ok, key=lambda r: r["us"])
        best[fam] = {"config": r["config"], "us": r["us"], "gbps": r["gbps"],
                     "speedup_vs_bf16": round(us_bf16 / r["us"], 3) if us_bf16 else None,
                     "speedup_vs_pkg": round(us_pkg / r["us"], 3) if us_pkg else None}
    return best


def _best_us(recs) -> float | None:
    us = [r["us"] for r in recs if "us" in r]
    return min(us) if us else None


def _cuda_ok() -> bool:
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return True
    except Exception:
        return False


def run_shape(n: int, k: int, args, res: dict, t0: float, sms: int) -> None:
    copies = max(2, min(8, math.ceil(ROTATE_BYTES / (n * k))))
    case = Case(n, k, "cuda", copies, quantize=True, sms=sms)
    rs = {"N": n, "K": k, "weight_mb": n * k / 1e6, "copies": copies, "variants": {}, "errors": []}
    res["shapes"].append(rs)
    print(f"N={n} K={k} ({n * k / 1e6:.1f} MB, {copies} copies)", flush=True)
    baselines(case, args.rep_ms, rs)
    for fam in ("bf16", "pkg", "pkg0"):
        rs[f"{fam}_us"] = _best_us(rs["variants"].get(fam, []))
    stopped = False
    for name, cfgs in SWEEP.items():
        if args.variants and name not in args.variants:
            continue
        recs = rs["variants"].setdefault(name, [])
        for cfg in cfgs:
            if time.monotonic() - t0 > args.budget_s:
                rs["errors"].append(f"budget: stopped at {_tag(name, cfg)}")
                stopped = True
                break
            label = "/".join(map(str, cfg))
            try:
                f, kind = build(name, cfg, case)
            except Exception as e:
                if not str(e).startswith("skip:"):
                    recs.append({"config": label, "error": _err(e)})
                    _print_rec(name, recs[-1])
                continue
            rec = measure(label, f, kind, case, cfg[0], args.rep_ms)
            recs.append(rec)
            _print_rec(name, rec)
            if "error" in rec and not _cuda_ok():
                rs["errors"].append(f"CUDA context lost at {_tag(name, cfg)}: {rec['error']}")
                rs["best"] = summarize(rs)
                raise RuntimeError(f"CUDA context lost at {_tag(name, cfg)}")
        if stopped:
            break
    rs["best"] = summarize(rs)
    line = "  ".join(f"{fam} {b['us']:.1f}" for fam, b in sorted(rs["best"].items(), key=lambda kv: kv[1]["us"]))
    print(f"N={n} K={k} best: {line}", flush=True)
    del case
    torch.cuda.empty_cache()
    if stopped:
        raise TimeoutError("budget")


# ---------------------------------------------------------------------------------------
# compiling ahead, in parallel (fills Triton's on-disk cache; the main process then loads)

_WARM_CASE: Case | None = None


def _warm_init() -> None:
    setup_allocator()


def _warm_one(name: str, cfg) -> str | None:
    """In a worker: compiles (and runs once) one config on a small case whose integer
    arguments specialize as the real shapes' do (multiples of 16, 32-bit)."""
    global _WARM_CASE
    try:
        if _WARM_CASE is None:  # (the interpreter: the process plumbing tested on a CPU machine)
            _WARM_CASE = Case(64, 8192, "cpu", 1, quantize=False) if INTERPRET else \
                Case(1024, 8192, "cuda", 1, quantize=False)
        f, _ = build(name, cfg, _WARM_CASE)
        f(0, _WARM_CASE.outs[0])
        if not INTERPRET:
            torch.cuda.synchronize()
        return None
    except Exception as e:
        return _err(e)


def precompile(jobs: int, variants, timeout_s: float) -> dict:
    import concurrent.futures as cf
    import multiprocessing as mp

    tasks = []
    seen = set()
    for name, cfgs in SWEEP.items():
        if variants and name not in variants:
            continue
        for cfg in cfgs:
            key = (name, tuple(cfg[:4]))  # flat's P, split's SK: the same compiled kernel
            if key not in seen:
                seen.add(key)
                tasks.append((name, tuple(cfg)))
    t = time.monotonic()
    out = {"tasks": len(tasks), "jobs": jobs, "errors": {}}
    ex = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_warm_init)
    try:
        futs = {ex.submit(_warm_one, name, cfg): _tag(name, cfg) for name, cfg in tasks}
        done, pending = cf.wait(futs, timeout=timeout_s)
        for fu in done:
            try:
                err = fu.result()
            except Exception as e:  # (a worker died)
                err = _err(e)
            if err:
                out["errors"][futs[fu]] = err
        out["unfinished"] = len(pending)
    finally:
        procs = list(getattr(ex, "_processes", {}).values())
        ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:  # a worker stuck past the deadline must not hold the run
            if p.is_alive():
                p.join(timeout=2)
            if p.is_alive():
                p.terminate()
    out["s"] = round(time.monotonic() - t, 1)
    return out


# ---------------------------------------------------------------------------------------
# self-test


def self_test() -> int:
    """Every variant's self-test configs on tiny shapes against the references; exit 1 on a
    failed check (a variant that cannot run here is reported, and fails too)."""
    device = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
    if device == "cpu" and not INTERPRET:
        print("no GPU: re-running under TRITON_INTERPRET=1", flush=True)
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.run([sys.executable, __file__, "--self-test"], env=env).returncode
    if device == "cuda":
        setup_allocator()
    print(f"self-test on {device} (interpreter: {INTERPRET}), triton {triton.__version__}", flush=True)
    failed = []
    for n, k in [(64, 512), (72, 1024)]:
        case = Case(n, k, device, 2, quantize=False, sms=3)
        rs = {"variants": {}, "errors": []}
        baselines(case, 5, rs)
        for fam in ("pkg", "pkg0", "bf16"):
            r = rs["variants"][fam][0]
            if not (isinstance(r.get("sqnr"), float) and r["sqnr"] >= MIN_SQNR):
                failed.append(f"{n}x{k} {fam}: {r}")
        for name, cfgs in SELF_TEST.items():
            for cfg in cfgs:
                tag = _tag(name, cfg)
                try:
                    f, kind = build(name, cfg, case)
                    db = check(f, kind, case, cfg[0])
                    if kind == "gemv":  # the second copy too, into its own buffer
                        out = case.outs[1].fill_(float("nan"))
                        f(1, out)
                        ref1 = gv.fp8_gemv_reference(case.xs[1].float(), case.ws[1], case.sws[1]).float()
                        db = min(db, sqnr(out.float(), ref1))
                    ok = db >= MIN_SQNR
                    print(f"  {n}x{k} {tag:24s} {'ok' if ok else 'FAILED'} ({kind}, sqnr {db:.1f})", flush=True)
                    if not ok:
                        failed.append(f"{n}x{k} {tag}: sqnr {db}")
                except Exception as e:
                    print(f"  {n}x{k} {tag:24s} ERROR {_err(e)}", flush=True)
                    failed.append(f"{n}x{k} {tag}: {_err(e)}")
    # the XOR reference itself against numpy's
    import numpy as np

    case = Case(72, 1024, "cpu", 1, quantize=False)
    want = np.bitwise_xor.reduce(case.w32[0].numpy(), axis=1)
    if not np.array_equal(case.xor_ref(8).numpy(), want):
        failed.append("xor_ref differs from numpy")
    print("self-test:", "OK" if not failed else f"{len(failed)} FAILED", flush=True)
    for f in failed:
        print("  ", f, flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------


def _x(v) -> str:
    return f"{v:.2f}x" if v else "-"


def _shape(s: str) -> tuple[int, int]:
    n, _, k = s.lower().partition("x")
    return int(n), int(k)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="probe_gemv_tma.json")
    ap.add_argument("--shapes", nargs="+", type=_shape, default=SHAPES, metavar="NxK",
                    help="weight shapes N x K (default: %(default)s)")
    ap.add_argument("--variants", nargs="+", choices=list(SWEEP), default=None,
                    help="sweep only these (bf16 / pkg / pkg0 always run)")
    ap.add_argument("--rep-ms", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=200, help="stop sweeping past this many seconds")
    ap.add_argument("--jobs", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 2)),
                    help="processes compiling the sweep's kernels ahead (0: compile on first use)")
    ap.add_argument("--self-test", action="store_true", help="tiny shapes, every variant checked; no timing")
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test()
    if triton is None or not torch.cuda.is_available():
        print("needs a CUDA GPU and Triton (or --self-test)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    setup_allocator()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "sms": sms, "argv": sys.argv[1:], "shapes": [], "errors": []}
    out = Path(args.out)
    if args.jobs > 0:
        try:
            res["precompile"] = precompile(args.jobs, args.variants, timeout_s=max(10.0, args.budget_s * 0.4))
            pc = res["precompile"]
            print(f"precompiled {pc['tasks']} kernels in {pc['s']} s ({args.jobs} processes, "
                  f"{len(pc['errors'])} errors, {pc.get('unfinished', 0)} unfinished)", flush=True)
        except Exception as e:  # (then the main process compiles them)
            traceback.print_exc()
            res["errors"].append(f"precompile: {_err(e)}")
    for n, k in args.shapes:
        if time.monotonic() - t0 > args.budget_s:
            res["errors"].append(f"budget: stopped before {n}x{k}")
            break
        try:
            run_shape(n, k, args, res, t0, sms)
        except TimeoutError:
            res["errors"].append(f"budget: stopped in {n}x{k}")
            out.write_text(json.dumps(res, indent=1))
            break
        except Exception as e:
            traceback.print_exc()
            res["errors"].append(f"{n}x{k}: {_err(e)}")
            if not _cuda_ok():
                res["errors"].append("the CUDA context is gone: stopped")
                break
        torch.cuda.empty_cache()
        out.write_text(json.dumps(res, indent=1))
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    print("\nbest per variant (us; speedup over bf16, over pkg):", flush=True)
    for rs in res["shapes"]:
        best = rs.get("best") or summarize(rs)
        rs["best"] = best
        cells = "  ".join(f"{fam} {b['us']:.1f} ({_x(b['speedup_vs_bf16'])}, {_x(b['speedup_vs_pkg'])})"
                          for fam, b in sorted(best.items(), key=lambda kv: kv[1]["us"]))
        print(f"{rs['N']}x{rs['K']}: {cells}", flush=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out} ({res['elapsed_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
