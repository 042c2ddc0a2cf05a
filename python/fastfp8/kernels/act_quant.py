"""Dynamic per-token FP8 e4m3 activation quantization: a fused Triton kernel and the torch
reference it matches bit for bit.

Per row ``x`` (one token) of a 2-D ``[M, K]`` activation, all in fp32:

1. ``amax = max|x|`` (exact; NaN propagates, as ``torch.amax`` does),
2. ``scale = max(amax / 448, SCALE_FLOOR)``: IEEE division, then a floor (``1 / (448 *
   512)``, vLLM's minimum dynamic scale) so that an all-zero row gets a finite scale and
   no ``0 / 0`` NaN,
3. ``inv = 1 / scale`` (IEEE division, once per row),
4. ``q = e4m3(clamp(x * inv, -448, 448))``, round-to-nearest-even. The clamp comes before
   the cast (eager torch casts out-of-range values to NaN in some versions).

``scale`` is returned in fp32 with shape ``[M, 1]`` (what ``torch._scaled_mm`` takes as
``scale_a``), so that ``x ~= q.float() * scale``.

The ``gated`` variant reads ``[M, 2I]`` (gate columns first, then up), computes
``silu(gate) * up`` in fp32 and quantizes that ``[M, I]`` result the same way: the
activation between the two grouped GEMMs of an MoE expert. ``silu`` uses Triton's
``sigmoid``, so that variant matches its reference to rounding, not bit for bit.

Under ``TRITON_INTERPRET=1`` (CPU tensors) the kernel swaps the hardware fp32 -> e4m3
and bf16 -> fp32 conversions for integer emulations, because the interpreter's own
conversions round incorrectly; on a GPU only the native conversions are compiled.
"""

from __future__ import annotations

import contextlib

import torch

from . import common
from .common import FP8, FP8_MAX, cdiv, fp8_supported, next_power_of_2, tl, triton

#: The smallest per-token scale (vLLM's ``1 / (448 * 512)``): rows whose amax is below
#: ``448 * SCALE_FLOOR`` (including all-zero rows) use this scale.
SCALE_FLOOR = 1.0 / (FP8_MAX * 512.0)
_SINGLE_PASS_MAX = 16384
_INT32_LIMIT = 2**31 - 1

__all__ = [
    "FP8_MAX",
    "SCALE_FLOOR",
    "act_quant",
    "act_quant_reference",
    "gated_act_quant_reference",
    "triton_act_quant",
]


# ---------------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------------


def _quant_rows(xf: torch.Tensor, out: torch.Tensor | None, scale_out: torch.Tensor | None):
    amax = xf.abs().amax(dim=-1, keepdim=True)
    # Device tensors (not Python scalars) so that CUDA divides instead of multiplying by a
    # rounded reciprocal: same bits on every device.
    c448 = torch.full((1, 1), FP8_MAX, dtype=torch.float32, device=xf.device)
    one = torch.ones((1, 1), dtype=torch.float32, device=xf.device)
    scale = amax / c448
    scale = torch.where(scale < SCALE_FLOOR, torch.full_like(scale, SCALE_FLOOR), scale)  # keeps NaN
    inv = one / scale
    q = torch.clamp(xf * inv, -FP8_MAX, FP8_MAX).to(FP8)
    if out is not None:
        out.copy_(q)
        q = out
    if scale_out is not None:
        scale_out.copy_(scale)
        scale = scale_out
    return q, scale


@torch.no_grad()
def act_quant_reference(
    x: torch.Tensor, *, out: torch.Tensor | None = None, scale_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization of ``x [M, K]`` in plain torch, any device.

    Returns ``(q float8_e4m3fn [M, K], scale float32 [M, 1])``; see the module docstring.
    """
    _check(x, gated=False)
    if x.numel() == 0:
        return _empty_outputs(x, x.shape[1], out, scale_out)
    return _quant_rows(x.float(), out, scale_out)


@torch.no_grad()
def gated_act_quant_reference(
    x: torch.Tensor, *, out: torch.Tensor | None = None, scale_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize(silu(x[:, :I]) * x[:, I:])`` for ``x [M, 2I]``, in fp32, in plain torch."""
    _check(x, gated=True)
    inter = x.shape[1] // 2
    if x.numel() == 0:
        return _empty_outputs(x, inter, out, scale_out)
    xf = x.float()
    g, u = xf[:, :inter], xf[:, inter:]
    return _quant_rows(g * torch.sigmoid(g) * u, out, scale_out)


def _check(x: torch.Tensor, *, gated: bool) -> None:
    if x.dim() != 2:
        raise ValueError(f"activations must be 2-D [tokens, features], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"activations must be bf16, fp16 or fp32, got {x.dtype}")
    if gated and x.shape[1] % 2:
        raise ValueError(f"gated activations need an even number of columns, got {x.shape[1]}")


def _empty_outputs(x, cols, out, scale_out):
    q = out if out is not None else torch.empty((x.shape[0], cols), dtype=FP8, device=x.device)
    s = scale_out if scale_out is not None else torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    return q, s


# ---------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load_f32(ptrs, mask, IS_BF16: tl.constexpr, EMULATE: tl.constexpr):
        """Masked load -> fp32 (exact). The interpreter's bf16 -> fp32 cast breaks subnormals."""
        x = tl.load(ptrs, mask=mask, other=0.0)
        if EMULATE and IS_BF16:
            y = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            y = x.to(tl.float32)
        return y

    # fp32 -> e4m3 by integer code under the interpreter, shared with the weight kernel
    from ..quant.triton_kernel import _fp32_to_e4m3_emulated as _e4m3_emulated

    @triton.jit
    def _to_e4m3(v, inv_col, EMULATE: tl.constexpr):
        v = v * inv_col
        v = tl.where(v > 448.0, 448.0, v)  # comparisons: NaN stays NaN
        v = tl.where(v < -448.0, -448.0, v)
        if EMULATE:  # noqa: SIM108 (constexpr branch)
            q = _e4m3_emulated(v)
        else:
            q = v.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        return q

    @triton.jit
    def _load_act(x_ptr, rows, cols, mask, sx_m, INTER, GATED: tl.constexpr, IS_BF16: tl.constexpr,
                  EMULATE: tl.constexpr):
        base = x_ptr + rows[:, None] * sx_m + cols[None, :]
        v = _load_f32(base, mask, IS_BF16, EMULATE)
        if GATED:
            u = _load_f32(base + INTER, mask, IS_BF16, EMULATE)
            v = v * tl.sigmoid(v) * u
        return v

    @triton.jit
    def _act_quant_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        g_ptr,
        n_rows,
        n_cols,  # of the output (I for the gated variant)
        sx_m,
        sq_m,
        GATED: tl.constexpr,
        IS_BF16: tl.constexpr,
        EMULATE: tl.constexpr,
        INT64: tl.constexpr,
        SCATTER: tl.constexpr,
        SINGLE_PASS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """``SCATTER`` (> 0): input row ``r``'s bytes and scale go to output rows
        ``g_ptr[r * SCATTER + j]``, ``j < SCATTER`` (int64 indices), not to row ``r``."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_K)
        row_ok = rows < n_rows
        if INT64:
            rows = rows.to(tl.int64)
        if SINGLE_PASS:
            mask = row_ok[:, None] & (cols[None, :] < n_cols)
            x = _load_act(x_ptr, rows, cols, mask, sx_m, n_cols, GATED, IS_BF16, EMULATE)
            # max over |x| bit patterns: exact, and NaN (above +inf) propagates
            amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
            for c0 in range(0, n_cols, BLOCK_K):
                c = c0 + cols
                mask = row_ok[:, None] & (c[None, :] < n_cols)
                xb = _load_act(x_ptr, rows, c, mask, sx_m, n_cols, GATED, IS_BF16, EMULATE)
                acc = tl.maximum(acc, xb.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
            amax_bits = tl.max(acc, axis=1)
        amax = amax_bits.to(tl.float32, bitcast=True)
        scale = tl.div_rn(amax, tl.full([BLOCK_M], 448.0, tl.float32))
        scale = tl.where(scale < 1.0 / (448.0 * 512.0), 1.0 / (448.0 * 512.0), scale)  # == SCALE_FLOOR
        inv = tl.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), scale)
        inv_col = inv[:, None]
        for j in tl.static_range(max(SCATTER, 1)):
            if SCATTER > 0:  # noqa: SIM108 (a constexpr branch)
                dst = tl.load(g_ptr + rows.to(tl.int64) * SCATTER + j, mask=row_ok, other=0)
            else:
                dst = rows
            tl.store(s_ptr + dst, scale, mask=row_ok)
            q_rows = q_ptr + dst[:, None] * sq_m
            if SINGLE_PASS:
                tl.store(q_rows + cols[None, :], _to_e4m3(x, inv_col, EMULATE), mask=mask)
            else:
                for c0 in range(0, n_cols, BLOCK_K):
                    c = c0 + cols
                    mask = row_ok[:, None] & (c[None, :] < n_cols)
                    xb = _load_act(x_ptr, rows, c, mask, sx_m, n_cols, GATED, IS_BF16, EMULATE)
                    tl.store(q_rows + c[None, :], _to_e4m3(xb, inv_col, EMULATE), mask=mask)


def pick_config(n_rows: int, n_cols: int, gated: bool) -> tuple[int, int, bool, int]:
    """``(BLOCK_M, BLOCK_K, SINGLE_PASS, num_warps)``: whole rows in registers up to 16384
    columns (8192 gated), several short rows per program (~4096 elements a program)."""
    limit = _SINGLE_PASS_MAX // 2 if gated else _SINGLE_PASS_MAX
    if n_cols <= limit:
        block_k = max(16, next_power_of_2(n_cols))
        block_m = max(1, min(4096 // block_k, next_power_of_2(n_rows)))
        elems = block_m * block_k
        num_warps = 4 if elems <= 2048 else (8 if elems <= 8192 else 16)
        return block_m, block_k, True, num_warps
    return 1, 4096, False, 8


@torch.no_grad()
def triton_act_quant(
    x: torch.Tensor,
    *,
    gated: bool = False,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    scatter: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel. ``x [M, K]`` (``[M, 2I]`` when ``gated``) with unit column stride;
    CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. Writes into ``out`` (fp8,
    row-contiguous) / ``scale_out`` (fp32 ``[M, 1]``, contiguous) when given.

    ``scatter`` (``M * c`` int64 row indices, a permutation of ``range(M * c)``): row ``r``
    of ``x`` is quantized once and written to the result's rows ``scatter[r * c + j]``,
    ``j < c``: ``M * c`` rows (the grouped MoE's per-expert copies of the tokens, written
    where the sort puts them: one kernel that reads each token once). Its dtype, device and
    length are checked; that it is a permutation is the caller's to ensure (the sort's
    inverse is one)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    _check(x, gated=gated)
    if x.stride(1) != 1 and x.shape[1] > 1:
        x = x.contiguous()
    copies = 0
    if scatter is not None:
        if scatter.dim() != 1 or scatter.dtype != torch.int64 or scatter.device != x.device or \
                (x.shape[0] and scatter.numel() % x.shape[0]) or (scatter.numel() and not x.shape[0]):
            raise ValueError(f"scatter must be a 1-D int64 tensor on {x.device} of a multiple of {x.shape[0]} "
                             f"indices, got {scatter.dtype} {tuple(scatter.shape)} on {scatter.device}")
        scatter = scatter.contiguous()
        copies = scatter.numel() // x.shape[0] if x.shape[0] else 0
    rows = x.shape[0]
    out_rows = rows * copies if scatter is not None else rows
    cols = x.shape[1] // 2 if gated else x.shape[1]
    q = out if out is not None else common.empty((out_rows, cols), FP8, x.device)
    s = scale_out if scale_out is not None else common.empty((out_rows, 1), torch.float32, x.device)
    if tuple(q.shape) != (out_rows, cols) or q.dtype != FP8 or (cols > 1 and q.stride(1) != 1):
        raise ValueError(f"out must be a row-contiguous float8_e4m3fn [{out_rows}, {cols}] tensor")
    if tuple(s.shape) != (out_rows, 1) or s.dtype != torch.float32 or not s.is_contiguous():
        raise ValueError(f"scale_out must be a contiguous float32 [{out_rows}, 1] tensor")
    if out_rows == 0 or cols == 0:
        if cols == 0 and out_rows:
            s.fill_(SCALE_FLOOR)
        return q, s
    block_m, block_k, single, num_warps = pick_config(rows, cols, gated)
    padded_rows = cdiv(rows, block_m) * block_m
    need64 = max(max(padded_rows, out_rows) * max(x.stride(0), q.stride(0)) + 2 * cols + block_k,
                 0) >= _INT32_LIMIT
    switch = x.is_cuda and x.device.index != torch.cuda.current_device()
    with torch.cuda.device(x.device) if switch else contextlib.nullcontext():
        _act_quant_kernel[(cdiv(rows, block_m),)](
            x, q, s, scatter if scatter is not None else s, rows, cols, x.stride(0), q.stride(0),
            GATED=gated,
            IS_BF16=x.dtype == torch.bfloat16,
            EMULATE=not x.is_cuda,
            INT64=need64,
            SCATTER=copies,
            SINGLE_PASS=single,
            BLOCK_M=block_m,
            BLOCK_K=block_k,
            num_warps=num_warps,
        )
    return q, s


def act_quant(x: torch.Tensor, *, gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization: the Triton kernel on CUDA devices with fp8
    conversions (sm89+), the torch reference elsewhere."""
    if x.is_cuda and triton is not None and fp8_supported(x.device):
        return triton_act_quant(x, gated=gated)
    return gated_act_quant_reference(x) if gated else act_quant_reference(x)
