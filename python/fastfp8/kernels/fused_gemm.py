"""FP8 GEMM that quantizes the activations itself: one kernel from bf16/fp16 ``x`` to ``y``.

``y = x @ (w * w_scale).T + bias`` with the fp8 e4m3 weight ``w [N, K]`` (per-output-channel
``w_scale``) and the activations quantized per token inside the kernel, by the rule of
:mod:`fastfp8.kernels.act_quant` (``scale = max(amax / 448, SCALE_FLOOR)``, then ``x * (1 /
scale)`` saturated and rounded to nearest even): each program first reads its ``BLOCK_M``
rows over all of K for their amax, then walks K again quantizing each ``[BLOCK_M, BLOCK_K]``
tile in registers into the fp8 ``tl.dot``, accumulating in fp32 with the dot itself (so the
tensor-core products of successive K steps overlap); the row scales, the weight scales and
the bias follow once per output tile. The quantized activations and their scales equal
:func:`~fastfp8.kernels.act_quant.act_quant_reference`'s bit for bit, so the result is the
two-kernel paths' (activation quantization, then a GEMM) up to fp32 summation order.

Why: the two-kernel W8A8 paths read the activations in bf16, write them in fp8 and read them
again, and pay a second launch; where the weight is small (attention k/v projections,
Qwen3-MoE attention) that costs more than the fp8 tensor cores save, and fastfp8 was slower
than bf16 there. Here the activations are read twice in bf16 (the second time mostly from
L2) and no second kernel runs. (The first version scaled each K slice apart: its products
could not accumulate in the dot, each K step waited for its own, and it ran 1.1 - 7.6x slower
than the two-kernel paths on the H200. This one, measured there too, is still 1.2 - 6.2x
slower than the best path at every shape and row count tried, median 2.9x: every program
reads its rows of the activations over all of K twice, and the narrow weights it was for
give few programs, each bound by the bytes it can have in flight. The selection table does
not take it.)

Under ``TRITON_INTERPRET=1`` (CPU tensors) the dot runs in fp32 on the e4m3 values (the
interpreter has no fp8 dot): the same products, exactly.
"""

from __future__ import annotations

import contextlib

import torch

from . import common
from .act_quant import SCALE_FLOOR, act_quant_reference
from .common import cdiv, tl, triton
from .gemm import GemmConfig

__all__ = ["default_config", "fp8_gemm_fused", "fp8_gemm_fused_reference"]


@torch.no_grad()
def fp8_gemm_fused_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The kernel's math in torch (fp32): ``x`` quantized per token
    (:func:`~fastfp8.kernels.act_quant.act_quant_reference`), times the dequantized weight."""
    q, s = act_quant_reference(x)
    y = (q.float() * s) @ (w.float() * w_scale.float().reshape(-1, 1)).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


if triton is not None:
    from .act_quant import _to_e4m3  # the per-token kernel's fp32 -> e4m3 (saturating, RTNE)
    from .gemm import grouped_tile

    @triton.jit
    def _x_tile(ptrs, k0, rk, K, EVEN_K: tl.constexpr, IS_BF16: tl.constexpr, EMULATE: tl.constexpr):
        """A ``[BLOCK_M, BLOCK_K]`` tile of ``x`` at column ``k0`` as fp32 (exact; past K: 0)."""
        if EVEN_K:  # noqa: SIM108 (constexpr branch)
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(k0 + rk)[None, :] < K, other=0.0)
        if EMULATE and IS_BF16:  # the interpreter's bf16 -> fp32 cast breaks subnormals
            xf = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            xf = x.to(tl.float32)
        return xf

    @triton.jit
    def _fused_gemm_kernel(
        x_ptr, w_ptr, y_ptr, ws_ptr, bias_ptr,
        M, N, K, s_xm, s_wn, s_ym,
        HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr,
        EMULATE: tl.constexpr,
        IS_BF16: tl.constexpr,
        FLOOR: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        rm, rn, m_ok, n_ok, rm_s, rn_s = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rk = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rm_s[:, None] * s_xm + rk[None, :]
        # pass 1: each row's amax over K, as the max of |x| bit patterns (exact; NaN, above
        # +inf, propagates), kept elementwise and reduced once
        bits = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
        # stages asked for: Triton pipelines by itself only the loads that feed a dot
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            xf = _x_tile(x_ptrs + k0, k0, rk, K, EVEN_K, IS_BF16, EMULATE)
            bits = tl.maximum(bits, xf.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
        amax = tl.max(bits, axis=1).to(tl.float32, bitcast=True)
        scale = tl.div_rn(amax, tl.full([BLOCK_M], 448.0, tl.float32))
        scale = tl.where(scale < FLOOR, FLOOR, scale)  # keeps NaN
        inv = tl.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), scale)
        # pass 2: quantize each tile in registers into the dot, which accumulates
        w_ptrs = w_ptr + rn_s[None, :] * s_wn + rk[:, None]  # [BLOCK_K, BLOCK_N], K-major
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:  # noqa: SIM108 (constexpr branch)
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=(k0 + rk)[:, None] < K, other=0.0)
            xf = _x_tile(x_ptrs, k0, rk, K, EVEN_K, IS_BF16, EMULATE)
            q = _to_e4m3(xf, inv[:, None], EMULATE)
            if EMULATE:
                acc += tl.dot(q.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(q, w, acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        sb = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
        acc = acc * scale[:, None] * sb[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * s_ym + rn[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def default_config(m: int, n: int, k: int) -> GemmConfig:
    """A reasonable tile where the selection table names none."""
    if m <= 16:
        return ("fused", 16, 64, 128, 8, 1, 4, 4)
    if m <= 64:
        return ("fused", 64, 64, 128, 8, 1, 4, 4)
    return ("fused", 128, 128, 128, 8, 1, 8, 3)


@torch.no_grad()
def fp8_gemm_fused(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: GemmConfig,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x [M, K]`` (bf16/fp16/fp32, unit column stride or copied) times the fp8 ``w [N, K]``
    with ``w_scale`` (``N`` values), plus ``bias [N]``; the activations are quantized inside.
    Returns ``[M, N]`` in ``out_dtype`` (default ``x.dtype``). ``config``: a
    :data:`~fastfp8.kernels.gemm.GemmConfig` of kernel ``"fused"`` (``SPLIT_K`` 1)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    m, k = x.shape
    w, sb = common.fp8_weight(w, w_scale, k)
    n = w.shape[0]
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"fp8_gemm_fused takes bf16/fp16/fp32 activations, got {x.dtype}")
    kernel, bm, bn, bk, gm, split, nw, ns = config
    if kernel != "fused" or split != 1:
        raise ValueError(f"not a fused-GEMM config: {config}")
    if x.stride(1) != 1:
        x = x.contiguous()
    sb = sb.float()
    out_dtype = out_dtype or x.dtype
    if m == 0 or n == 0 or k == 0:
        y = torch.zeros((m, n), dtype=out_dtype, device=x.device)
        return y + bias.to(out_dtype) if bias is not None and m else y
    y = common.empty((m, n), out_dtype, x.device)
    grid = (cdiv(m, bm) * cdiv(n, bn),)
    switch = x.is_cuda and x.device.index != torch.cuda.current_device()
    with torch.cuda.device(x.device) if switch else contextlib.nullcontext():
        _fused_gemm_kernel[grid](
            x, w, y, sb, bias if bias is not None else sb,
            m, n, k, x.stride(0), w.stride(0), y.stride(0),
            HAS_BIAS=bias is not None,
            EVEN_K=k % bk == 0,
            EMULATE=not x.is_cuda,
            IS_BF16=x.dtype == torch.bfloat16,
            FLOOR=SCALE_FLOOR,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, STAGES=ns,
            num_warps=nw, num_stages=ns,
        )
    return y
