"""Fused Triton kernel: FP8 e4m3 per-output-channel quantization in one launch.

One program handles ``BLOCK_M`` rows of one expert (grid axis 1 is the expert of a
3-D weight that cannot be viewed as 2-D). Per row it computes, bit-exactly like
:func:`fastfp8.quant.reference.quantize_channelwise_reference`:

* ``amax``: an *integer* max over the fp32 bit patterns of ``|x|`` (sign bit
  cleared). For non-negative floats the bit patterns order like the values, the max
  is exact, and a NaN (whose pattern is above +inf's) propagates to the result the
  way ``torch.amax`` propagates it; ``tl.max`` on floats does not promise that.
* ``scale = div_rn(amax, 448)`` rounded to the weight dtype (round-to-nearest-even),
  then ``eps(dtype)`` where it is 0. ``tl.div_rn`` is IEEE round-to-nearest (plain
  ``/`` on fp32 in Triton is an approximate ``div.full.f32``). fp32 division then one
  rounding to bf16/fp16 equals torch's division in bf16/fp16 (torch also divides in
  fp32 and rounds; double rounding is innocuous here since 24 >= 2p + 2).
* ``q = div_rn(x, scale)``; with ``rounding="eager"`` rounded to the weight dtype
  first (compressed-tensors' torch path divides in bf16/fp16), then clamped to
  [-448, 448] with comparisons (so NaN stays NaN, unlike ``min``/``max``), then
  converted fp32 -> e4m3 with round-to-nearest-even. Every conversion starts from
  fp32, never from bf16/fp16 directly, so no hidden intermediate rounding exists.

Rows of up to 16384 columns are loaded once into registers (single pass); longer
rows are read twice in ``BLOCK_N`` chunks (amax pass, then quantize pass whose reads
mostly hit L2). Inputs whose columns are not contiguous (e.g. a transposed view)
use square-ish tiles so that loads coalesce along the contiguous row axis.

Under ``TRITON_INTERPRET=1`` (CPU tensors) the kernel swaps the hardware fp32 -> bf16
and fp32 -> e4m3 conversions for integer emulations, because the interpreter's own
conversions truncate (bf16) or round incorrectly (fp8). That mode exists to test
the kernel's indexing and math on machines without a GPU; on a GPU only the native
conversions are compiled.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import torch
import triton
import triton.language as tl

from ..fp8 import FP8, cdiv, next_power_of_2
from .reference import Rounding, check_args, expected_scale_shape

__all__ = ["launch_config", "pick_config", "quantize_channelwise_triton", "row_amax_triton"]

_DTYPE_ID = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_MAX_GRID_Y = 65535  # CUDA limit of grid axis 1 (experts per launch)
_INT32_LIMIT = 2**31 - 1  # offsets beyond this need 64-bit index math
_SINGLE_PASS_MAX_COLS = 16384
_TILE_ELEMS = 4096


@triton.jit
def _widen(x, DTYPE_ID: tl.constexpr, EMULATE: tl.constexpr):
    """Loaded weight block -> fp32 (exact)."""
    if EMULATE and DTYPE_ID == 0:  # the interpreter's bf16 -> fp32 cast breaks subnormals
        y = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _round_fp32_to_bf16_emulated(v):
    """fp32 -> nearest-even bf16, returned as fp32 (interpreter only)."""
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lsb) & -65536
    rounded = tl.where(v != v, bits, rounded)
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def _round_to_weight_dtype(v, DTYPE_ID: tl.constexpr, EMULATE: tl.constexpr):
    """Round an fp32 tensor to the weight dtype (nearest-even); result stays fp32."""
    if DTYPE_ID == 0:
        if EMULATE:
            v = _round_fp32_to_bf16_emulated(v)
        else:
            v = v.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
    elif DTYPE_ID == 1:
        v = v.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
    return v


@triton.jit
def _fp32_to_e4m3_emulated(v):
    """fp32 in [-448, 448] (or NaN) -> float8e4nv, nearest-even (interpreter only)."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    af = a.to(tl.float32, bitcast=True)
    # normal results (|v| >= 2**-6): keep 3 mantissa bits, carry into the exponent.
    lsb = (a >> 20) & 1
    normal = ((a + 0x7FFFF + lsb) >> 20) - (120 << 3)
    # subnormal results: multiples of 2**-9, nearest-even via the 2**23 trick.
    t = af * 512.0
    sub = ((t + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(af >= 0.015625, normal, sub)
    code = tl.where(af != af, 0x7F, code | sign)  # NaN -> canonical 0x7F, like the hardware
    return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _quantize_block(x, scale_col, DTYPE_ID: tl.constexpr, DOUBLE_ROUND: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 block / per-row scale -> float8e4nv block, compressed-tensors numerics."""
    v = tl.div_rn(x, scale_col)
    if DOUBLE_ROUND:
        v = _round_to_weight_dtype(v, DTYPE_ID, EMULATE)
    v = v + 0.0  # -0.0 -> +0.0: compressed-tensors' compressor adds its zero point (0x00, not 0x80)
    v = tl.where(v > 448.0, 448.0, v)  # 448.0 == reference.FP8_MAX
    v = tl.where(v < -448.0, -448.0, v)
    if EMULATE:  # noqa: SIM108 (constexpr branch: Triton compiles one side)
        q = _fp32_to_e4m3_emulated(v)
    else:
        q = v.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    return q


@triton.jit
def _fp8_channel_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    a_ptr,
    n_rows,
    n_cols,
    sx_g,
    sx_r,
    sx_c,
    sq_g,
    sq_r,
    sq_c,
    ss_g,
    ss_r,
    EPS: tl.constexpr,
    DTYPE_ID: tl.constexpr,
    DOUBLE_ROUND: tl.constexpr,
    EMULATE: tl.constexpr,
    INT64: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
    AMAX_GIVEN: tl.constexpr,
    AMAX_ONLY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    grp = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    if INT64:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
        grp = grp.to(tl.int64)
    x_rows = x_ptr + grp * sx_g + rows[:, None] * sx_r
    q_rows = q_ptr + grp * sq_g + rows[:, None] * sq_r

    # ---- pass 1: amax per row, as an integer max over |x| bit patterns ----
    # (AMAX_GIVEN: read from a_ptr, fp32 [groups * rows]: a tensor-parallel slice's row
    # maxima, all-reduced over the ranks)
    if SINGLE_PASS:
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_rows + cols[None, :] * sx_c, mask=mask, other=0.0, eviction_policy="evict_first")
        x = _widen(x, DTYPE_ID, EMULATE)
        if AMAX_GIVEN:
            amax = tl.load(a_ptr + grp * n_rows + rows, mask=row_ok, other=0.0)
        else:
            amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
            amax = amax_bits.to(tl.float32, bitcast=True)
    elif AMAX_GIVEN:
        amax = tl.load(a_ptr + grp * n_rows + rows, mask=row_ok, other=0.0)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for c0 in range(0, n_cols, BLOCK_N):
            c = c0 + cols
            mask = row_ok[:, None] & (c[None, :] < n_cols)
            xb = tl.load(x_rows + c[None, :] * sx_c, mask=mask, other=0.0, eviction_policy="evict_last")
            xb = _widen(xb, DTYPE_ID, EMULATE)
            acc = tl.maximum(acc, xb.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
        amax_bits = tl.max(acc, axis=1)
        amax = amax_bits.to(tl.float32, bitcast=True)

    if AMAX_ONLY:  # the row maxima alone, fp32 into a_ptr (row_amax_triton)
        tl.store(a_ptr + grp * n_rows + rows, amax, mask=row_ok)
    else:
        # ---- scale = amax / 448 in the weight dtype; 0 -> eps(dtype) ----
        scale = tl.div_rn(amax, tl.full([BLOCK_M], 448.0, tl.float32))
        scale = _round_to_weight_dtype(scale, DTYPE_ID, EMULATE)
        scale = tl.where(scale == 0.0, EPS, scale)
        if EMULATE and DTYPE_ID == 0:  # the interpreter's fp32->bf16 cast breaks subnormals
            scale_st = (scale.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            scale_st = scale.to(s_ptr.dtype.element_ty)  # exact: already rounded to dtype
        tl.store(s_ptr + grp * ss_g + rows * ss_r, scale_st, mask=row_ok)
        scale_col = scale[:, None]

        # ---- pass 2: q = e4m3(clamp(x / scale)) ----
        if SINGLE_PASS:
            q = _quantize_block(x, scale_col, DTYPE_ID, DOUBLE_ROUND, EMULATE)
            tl.store(q_rows + cols[None, :] * sq_c, q, mask=mask)
        else:
            for c0 in range(0, n_cols, BLOCK_N):
                c = c0 + cols
                mask = row_ok[:, None] & (c[None, :] < n_cols)
                xb = tl.load(x_rows + c[None, :] * sx_c, mask=mask, other=0.0, eviction_policy="evict_first")
                xb = _widen(xb, DTYPE_ID, EMULATE)
                q = _quantize_block(xb, scale_col, DTYPE_ID, DOUBLE_ROUND, EMULATE)
                tl.store(q_rows + c[None, :] * sq_c, q, mask=mask)


def pick_config(n_rows: int, n_cols: int, col_stride: int) -> tuple[int, int, bool, int]:
    """Launch configuration ``(BLOCK_M, BLOCK_N, SINGLE_PASS, num_warps)``.

    Contiguous rows up to 16384 columns: the whole row (padded to a power of two)
    stays in registers, several short rows share a program so each program moves
    about 4096+ elements. Longer rows: one row per program, 4096-column chunks, two
    passes. Non-contiguous columns (transposed views): 64x64 tiles, two passes, so
    loads coalesce along the row axis.
    """
    if col_stride == 1 or n_cols == 1:
        if n_cols <= _SINGLE_PASS_MAX_COLS:
            block_n = max(16, next_power_of_2(n_cols))
            block_m = max(1, min(_TILE_ELEMS // block_n, next_power_of_2(n_rows)))
            elems = block_m * block_n
            num_warps = 4 if elems <= 4096 else (8 if elems <= 8192 else 16)
            return block_m, block_n, True, num_warps
        return 1, 4096, False, 8
    block_m = max(16, min(64, next_power_of_2(n_rows)))
    block_n = 64
    return block_m, block_n, n_cols <= block_n, 4


def _flat_row_stride(groups: int, rows: int, s_g: int, s_r: int) -> int | None:
    """Stride of row i of the [groups * rows] flattening, or None if not uniform."""
    if rows == 1:
        return s_g
    if groups == 1 or s_g == rows * s_r:
        return s_r
    return None


def _max_offset(sizes: tuple[int, ...], strides: tuple[int, ...]) -> int:
    return sum((n - 1) * abs(s) for n, s in zip(sizes, strides, strict=True) if n > 0)


@functools.cache
def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


@torch.no_grad()
def quantize_channelwise_triton(
    weight: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    rounding: Rounding = "eager",
    amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize with the fused Triton kernel; same contract as the reference.

    ``amax``: the per-row ``max|x|`` to take the scales from (shape ``[..., out, 1]``,
    any float dtype holding the weight dtype's values exactly), instead of the kernel's
    own: a tensor-parallel row slice passes the whole row's, all-reduced over the ranks.

    ``weight`` is 2-D ``[out, in]`` or 3-D ``[experts, out, in]`` with any strides,
    on a CUDA device with fp8 conversions (compute capability >= 8.9); under
    ``TRITON_INTERPRET=1`` CPU tensors are accepted (emulated conversions). Returns
    ``(q float8_e4m3fn, scale)`` with ``scale`` of the weight dtype and shape
    ``[..., out, 1]``; writes into ``out`` / ``scale_out`` when given. No NaN/Inf
    check is made here.
    """
    check_args(weight, out, scale_out, rounding)
    if out is None:
        out = torch.empty(weight.shape, dtype=FP8, device=weight.device)
    if scale_out is None:
        scale_out = torch.empty(expected_scale_shape(weight.shape), dtype=weight.dtype, device=weight.device)
    if amax is not None:
        if tuple(amax.shape) != tuple(expected_scale_shape(weight.shape)):
            raise ValueError(f"amax must have shape {expected_scale_shape(weight.shape)}, got {tuple(amax.shape)}")
        amax = amax.to(device=weight.device, dtype=torch.float32).contiguous()
    _launch(weight, out, scale_out, rounding, amax=amax)
    return out, scale_out


@torch.no_grad()
def row_amax_triton(weight: torch.Tensor) -> torch.Tensor:
    """Each row's ``max|x|`` as float32, shape ``[..., out, 1]`` (the kernel's own first
    pass, no temporary): exact, a NaN in a row gives a (positive) NaN, every value has its
    sign bit clear, so the bit patterns read as int32 order like the values (what a
    tensor-parallel all-reduce MAX relies on: :func:`fastfp8.tensor_parallel.all_reduce_absmax`)."""
    check_args(weight, None, None, "fp32")
    amax = torch.empty(expected_scale_shape(weight.shape), dtype=torch.float32, device=weight.device)
    if weight.numel():
        _launch(weight, weight, amax, "fp32", amax=amax, amax_only=True)
    else:
        amax.zero_()
    return amax


def _geometry(
    weight: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor
) -> tuple[int, int, int, tuple[int, int, int], tuple[int, int, int], tuple[int, int]]:
    """(groups, rows, cols, x strides, q strides, scale strides) for the launch; 3-D
    weights whose (expert, row) dims flatten uniformly in all three tensors become 2-D."""
    if weight.dim() == 2:
        x_s = (0, weight.stride(0), weight.stride(1))
        q_s = (0, out.stride(0), out.stride(1))
        return 1, weight.shape[0], weight.shape[1], x_s, q_s, (0, scale_out.stride(0))
    groups, rows, cols = weight.shape
    x3, q3 = weight.stride(), out.stride()
    s2 = (scale_out.stride(0), scale_out.stride(1))
    fx = _flat_row_stride(groups, rows, x3[0], x3[1])
    fq = _flat_row_stride(groups, rows, q3[0], q3[1])
    fs = _flat_row_stride(groups, rows, s2[0], s2[1])
    if fx is not None and fq is not None and fs is not None:
        return 1, groups * rows, cols, (0, fx, x3[2]), (0, fq, q3[2]), (0, fs)
    return groups, rows, cols, (x3[0], x3[1], x3[2]), (q3[0], q3[1], q3[2]), s2


def launch_config(weight: torch.Tensor) -> dict[str, Any]:
    """The launch the kernel would use for ``weight`` with fresh contiguous outputs
    (for benchmarks and debugging)."""
    out = torch.empty(weight.shape, dtype=FP8, device="meta")
    scale_out = torch.empty(expected_scale_shape(weight.shape), dtype=weight.dtype, device="meta")
    groups, rows, cols, x_s, _, _ = _geometry(weight, out, scale_out)
    block_m, block_n, single_pass, num_warps = pick_config(rows, cols, x_s[2])
    return {
        "groups": groups,
        "rows": rows,
        "cols": cols,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "SINGLE_PASS": single_pass,
        "num_warps": num_warps,
    }


def _launch(
    weight: torch.Tensor,
    out: torch.Tensor,
    scale_out: torch.Tensor,
    rounding: str,
    config: tuple[int, int, bool, int] | None = None,
    amax: torch.Tensor | None = None,
    amax_only: bool = False,
) -> list[Any]:
    """Launch the kernel on checked arguments; returns Triton's compiled-kernel handles
    (tests read their PTX). ``config`` overrides :func:`pick_config` (benchmark sweeps).
    ``amax_only``: write each row's amax (fp32) into ``amax`` and nothing else (``out`` and
    ``scale_out`` only give the geometry)."""
    if weight.numel() == 0:
        return []
    groups, rows, cols, x_s, q_s, s_s = _geometry(weight, out, scale_out)

    if groups > _MAX_GRID_Y:  # grid axis 1 is limited: launch per chunk of experts
        handles: list[Any] = []
        for g0 in range(0, groups, _MAX_GRID_Y):
            g1 = min(groups, g0 + _MAX_GRID_Y)
            part = None if amax is None else amax[g0:g1]
            handles += _launch(weight[g0:g1], out[g0:g1], scale_out[g0:g1], rounding, config, part, amax_only)
        return handles

    block_m, block_n, single_pass, num_warps = config or pick_config(rows, cols, x_s[2])
    if single_pass and block_n < cols:
        raise ValueError(f"a single-pass config needs BLOCK_N >= {cols}, got {block_n}")
    padded = (groups, math.ceil(rows / block_m) * block_m, math.ceil(cols / block_n) * block_n)
    need_int64 = max(_max_offset(padded, x_s), _max_offset(padded, q_s), _max_offset(padded[:2], s_s)) >= _INT32_LIMIT

    grid = (cdiv(rows, block_m), groups)
    # Triton launches on the current CUDA device; switch only when needed (cheap path).
    switch = weight.is_cuda and weight.device.index != torch.cuda.current_device()
    with torch.cuda.device(weight.device) if switch else contextlib.nullcontext():
        handle = _fp8_channel_quant_kernel[grid](
            weight,
            out,
            scale_out,
            scale_out if amax is None else amax,
            rows,
            cols,
            x_s[0],
            x_s[1],
            x_s[2],
            q_s[0],
            q_s[1],
            q_s[2],
            s_s[0],
            s_s[1],
            EPS=_eps(weight.dtype),
            DTYPE_ID=_DTYPE_ID[weight.dtype],
            DOUBLE_ROUND=rounding == "eager" and weight.dtype != torch.float32,
            EMULATE=not weight.is_cuda,
            INT64=need_int64,
            SINGLE_PASS=single_pass,
            AMAX_GIVEN=amax is not None and not amax_only,
            AMAX_ONLY=amax_only,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
    return [handle]
