"""Pure-torch reference for FP8 e4m3 per-output-channel weight quantization.

This module reproduces, operation for operation, what compressed-tensors does for
``QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)``
(the weight half of llm-compressor's ``FP8_DYNAMIC`` scheme). It runs on any device
and is the oracle that the fused Triton kernel is tested against byte for byte.

The math, per output row ``x`` (last dimension) of a weight of dtype ``D``
(bf16, fp16 or fp32); every step is evaluated in ``D`` exactly like compressed-tensors:

1. ``min = min(amin(x), 0)``, ``max = max(amax(x), 0)``
   (llm-compressor's min-max observer reduces the last dim; compressed-tensors'
   ``calculate_qparams`` clamps the range so that 0 is representable).
2. ``scale = max(|min|, |max|) / 448`` -- a division in ``D``, i.e. the exact
   quotient rounded once to ``D`` (torch computes it in fp32 and rounds to ``D``;
   for a single division that double rounding is innocuous because fp32 has more
   than ``2p + 2`` significand bits for bf16 (p=8) and fp16 (p=11)). The 448 is a
   0-d tensor of dtype ``D`` on the weight's device, as in compressed-tensors; a
   Python scalar would make CUDA multiply by a rounded reciprocal instead.
3. ``scale = eps(D)`` where ``scale == 0`` (all-zero rows, or rows so small that
   ``amax / 448`` underflows ``D``); ``eps`` is ``torch.finfo(D).eps``:
   2**-7 (bf16), 2**-10 (fp16), 2**-23 (fp32).
4. ``q = clamp(x / scale, -448, 448).to(float8_e4m3fn)``. With ``rounding="eager"``
   the division is in ``D``: the quotient is rounded to ``D`` first and then
   rounded again (round-to-nearest-even) to e4m3. That double rounding differs from
   a single fp32 -> e4m3 rounding in a few percent of the bytes of a bf16 weight.
   The clamp matters: eager casts of out-of-range values give NaN in some torch
   versions (2.11) and saturate in others (2.15), so nothing may reach the cast
   unclamped.

``rounding="fp32"`` instead divides in fp32 and rounds once to e4m3. That is what
compressed-tensors 0.19/0.20 do on CUDA devices of compute capability >= 9.0 when
Triton is installed (their ``_quantize_triton`` backend uses
``tl.div_rn(x.to(fp32), scale.to(fp32))`` and casts the clamped fp32 value to
e4m3 directly). The scales are the same in both modes; for fp32 weights the two
modes are identical.

Signed zero: ``-0.0`` weights quantize to ``+0.0`` (byte ``0x00``), byte for byte what
compressed-tensors writes into a checkpoint: llm-compressor initialises its modules
with ``force_zero_point=True`` (a zero-point tensor of zeros even for symmetric
schemes), and the compressor passes it to ``quantize``, which adds it to the quotient
(``scaled += zero_point``, in the quotient's dtype): ``-0.0 + 0.0 = +0.0``. Checked
against ``ModelCompressor.compress`` of compressed-tensors 0.20.1 (see
``tests/test_quant.py``); the same holds for its Triton path (``has_zero_point``). Only
``quantize(..., zero_point=None)`` (no zero-point tensor at all) keeps ``-0.0`` as
``0x80``; adding ``+0.0`` changes nothing else (it is exact for every other value).

Non-finite weights: a NaN anywhere in a row makes that row's scale NaN and every
byte of the row NaN (``0x7F`` or ``0xFF``: like compressed-tensors, the e4m3 result is
cast to ``D`` and back, which is exact for numbers and may only flip the sign of a
NaN); a row with ``+-inf`` and no NaN gets scale ``+inf``, its finite values become
``+-0`` and its infinities NaN. Callers
normally reject such weights (see :func:`fastfp8.quant.quantize_channelwise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from ..fp8 import FP8, FP8_MAX

__all__ = [
    "FP8_MAX",
    "SUPPORTED_DTYPES",
    "Rounding",
    "check_args",
    "expected_scale_shape",
    "quantize_channelwise_reference",
]


#: Weight dtypes accepted by the quantizers (the scale has the weight's dtype).
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)

Rounding = Literal["eager", "fp32"]


def expected_scale_shape(weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the per-channel scale: the weight shape with its last dim set to 1."""
    return (*tuple(weight_shape)[:-1], 1)


def check_args(
    weight: torch.Tensor,
    out: torch.Tensor | None,
    scale_out: torch.Tensor | None,
    rounding: str,
) -> None:
    """Validate the arguments shared by the reference and the Triton kernel.

    Raises ``TypeError`` for unsupported dtypes and ``ValueError`` for bad shapes,
    devices or rounding modes.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight dtype must be one of bfloat16, float16, float32; got {weight.dtype}")
    if weight.dim() not in (2, 3):
        raise ValueError(f"weight must be 2-D [out, in] or 3-D [experts, out, in]; got shape {tuple(weight.shape)}")
    if weight.shape[-1] == 0 and math.prod(weight.shape[:-1]) > 0:
        raise ValueError(f"weight has rows but no columns: shape {tuple(weight.shape)}")
    if rounding not in ("eager", "fp32"):
        raise ValueError(f"rounding must be 'eager' or 'fp32', got {rounding!r}")
    if out is not None:
        if out.dtype != FP8:
            raise TypeError(f"out must be float8_e4m3fn, got {out.dtype}")
        if tuple(out.shape) != tuple(weight.shape):
            raise ValueError(f"out shape {tuple(out.shape)} != weight shape {tuple(weight.shape)}")
        if out.device != weight.device:
            raise ValueError(f"out is on {out.device}, weight on {weight.device}")
    if scale_out is not None:
        if scale_out.dtype != weight.dtype:
            raise TypeError(f"scale_out dtype must equal the weight dtype {weight.dtype}, got {scale_out.dtype}")
        want = expected_scale_shape(weight.shape)
        if tuple(scale_out.shape) != want:
            raise ValueError(f"scale_out shape {tuple(scale_out.shape)} != {want}")
        if scale_out.device != weight.device:
            raise ValueError(f"scale_out is on {scale_out.device}, weight on {weight.device}")


@torch.no_grad()
def quantize_channelwise_reference(
    weight: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    rounding: Rounding = "eager",
    reduce_absmax: Callable[[torch.Tensor], object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` to FP8 e4m3 with one scale per output row, in plain torch.

    Args:
        weight: ``[out, in]`` or ``[experts, out, in]`` tensor of dtype bf16, fp16 or
            fp32, any strides, any device.
        out: optional preallocated ``float8_e4m3fn`` tensor of the weight's shape.
        scale_out: optional preallocated tensor of the weight's dtype and shape
            ``[..., out, 1]``.
        rounding: ``"eager"`` (divide in the weight dtype, then round to e4m3: the
            compressed-tensors torch path) or ``"fp32"`` (divide in fp32, round once:
            the compressed-tensors >= 0.19 Triton path on sm90+ GPUs).
        reduce_absmax: called in place on the per-row ``max(|min|, |max|)`` (shape
            ``[..., out, 1]``, weight dtype) before the scale is taken: a tensor-parallel
            slice of the input dim all-reduces it (MAX) so that its scale is the whole
            row's. The max is exact, so the result equals the unsliced quantization's slice.

    Returns:
        ``(q, scale)``: ``q`` is float8_e4m3fn with the weight's shape, ``scale`` has the
        weight's dtype and shape ``[..., out, 1]``; ``weight ~= q.to(dtype) * scale``.
        When ``out`` / ``scale_out`` are given they are filled and returned.

    This function does not check for NaN/Inf (see the module docstring for what
    such rows produce); :func:`fastfp8.quant.quantize_channelwise` does.
    """
    check_args(weight, out, scale_out, rounding)
    dtype = weight.dtype
    device = weight.device

    if weight.numel() == 0:
        q = torch.empty(weight.shape, dtype=FP8, device=device)
        scale = torch.empty(expected_scale_shape(weight.shape), dtype=dtype, device=device)
    else:
        # 1. observer (llm-compressor min-max, strategy="channel"): reduce the last dim.
        min_vals = torch.amin(weight, dim=-1, keepdim=True)
        max_vals = torch.amax(weight, dim=-1, keepdim=True)
        # 2. calculate_qparams: include 0, symmetric range, divide by 448 in dtype.
        min_vals = torch.min(min_vals, torch.zeros_like(min_vals))
        max_vals = torch.max(max_vals, torch.zeros_like(max_vals))
        max_val_pos = torch.max(torch.abs(min_vals), torch.abs(max_vals))
        if reduce_absmax is not None:
            reduce_absmax(max_val_pos)
        # compressed-tensors: bit_range = (448 - (-448)) as a 0-d tensor on `device`,
        # then `max_val_pos / (bit_range.to(dtype) / 2)`.
        half_range = torch.tensor(2.0 * FP8_MAX, device=device).to(dtype) / 2
        scale = max_val_pos / half_range
        # 3. zero scales -> eps of the scale dtype.
        eps = torch.tensor(torch.finfo(dtype).eps, dtype=dtype, device=device)
        scale = torch.where(scale == 0, eps, scale)
        # 4. _quantize: x / scale (dtype or fp32), clamp to +-448, cast to e4m3.
        if rounding == "eager":  # noqa: SIM108 (two modes kept visibly apart)
            scaled = weight / scale  # in dtype: rounded to bf16/fp16, then to e4m3 below
        else:
            scaled = weight.to(torch.float32) / scale.to(torch.float32)  # one rounding
        # compressed-tensors adds the (zero) zero point: -0.0 becomes +0.0, nothing else
        # changes (see "Signed zero" above).
        scaled = scaled + 0.0
        q = torch.clamp(scaled, -FP8_MAX, FP8_MAX).to(FP8)
        # compressed-tensors casts back to the input dtype and then to e4m3 again
        # (round_to_quantized_type_args(cast_to_original_dtype=True), then .to(dtype)).
        # Exact for every e4m3 value; it only changes the sign bit of NaN bytes.
        q = q.to(dtype).to(FP8)

    if out is not None:
        out.copy_(q)
        q = out
    if scale_out is not None:
        scale_out.copy_(scale)
        scale = scale_out
    return q, scale
