"""Stateless FP8 e4m3 per-output-channel weight quantization, bit-exact with
compressed-tensors (``QuantizationArgs(num_bits=8, type="float", strategy="channel",
symmetric=True)``, the weights of llm-compressor's ``FP8_DYNAMIC``).

Per output row: ``scale = max|x| / 448`` in the weight dtype (0 -> ``eps(dtype)``),
``q = clamp(x / scale, -448, 448).to(float8_e4m3fn)``; see
:mod:`fastfp8.quant.reference` for the exact operation order, the two rounding
modes, signed zeros and non-finite inputs.

:func:`quantize_channelwise` dispatches: CUDA tensors on devices with fp8
conversions (compute capability >= 8.9) go to the fused Triton kernel
(:mod:`fastfp8.quant.triton_kernel`) when Triton imports; every other tensor
(CPU, older GPUs, ROCm, no Triton) goes to the pure-torch reference on its own
device. Setting ``FASTFP8_QUANT_BACKEND=reference`` forces the reference (for
debugging numerics); ``triton`` forces the kernel.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Literal

import torch

from ..fp8 import capability, fp8_supported
from .reference import FP8_MAX, SUPPORTED_DTYPES, Rounding, quantize_channelwise_reference

__all__ = [
    "FP8_MAX",
    "SUPPORTED_DTYPES",
    "NonFiniteError",
    "Rounding",
    "check_finite_scales",
    "compressed_tensors_version",
    "quantize_channelwise",
    "quantize_channelwise_reference",
    "resolve_rounding",
    "triton_supported",
]


class NonFiniteError(ValueError):
    """A weight row contains NaN or +-inf, so it has no valid FP8 scale.

    Attributes:
        num_rows: how many output rows are affected.
        first_row: index of the first affected row, ``(row,)`` for a 2-D weight and
            ``(expert, row)`` for a 3-D one.
    """

    def __init__(self, message: str, *, num_rows: int, first_row: tuple[int, ...]) -> None:
        super().__init__(message)
        self.num_rows = num_rows
        self.first_row = first_row


def check_finite_scales(scale: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` if any per-row scale is NaN or inf.

    A scale is non-finite exactly when its weight row holds a NaN or an inf:
    ``amax / 448`` of finite bf16/fp16/fp32 values cannot overflow, and NaN
    propagates through the amax. Checking the ``[..., out, 1]`` scale is therefore a
    complete and cheap check of the whole weight. On CUDA this synchronizes once.
    """
    bad = ~torch.isfinite(scale)
    if not bool(bad.any()):
        return
    idx = bad.squeeze(-1).nonzero()
    first = tuple(int(i) for i in idx[0].tolist())
    raise NonFiniteError(
        f"{idx.shape[0]} of {bad.numel()} output rows contain NaN or Inf "
        f"(first at index {first}); cannot quantize to FP8",
        num_rows=int(idx.shape[0]),
        first_row=first,
    )


@functools.cache
def _triton_importable() -> bool:
    try:
        from . import triton_kernel  # noqa: F401
    except Exception:  # ImportError, or a broken Triton install
        return False
    return True


def triton_supported(device: torch.device) -> bool:
    """Whether :func:`quantize_channelwise` uses the Triton kernel on ``device``."""
    return fp8_supported(device) and _triton_importable()


#: compressed-tensors quantizes on CUDA with its Triton kernel (``_quantize_triton`` in
#: ``quantization/lifecycle/forward_helpers.py``: ``tl.div_rn`` in fp32, one rounding to
#: e4m3) from this version on, on devices of compute capability 9.0+ when Triton imports.
#: 0.17 has no such kernel (``_quantize`` divides in the weight dtype, then rounds);
#: 0.18 ships it registered with priority ``"disable"`` (never used). vLLM 0.33 pins 0.17.
CT_TRITON_SINCE = (0, 19)


@functools.cache
def compressed_tensors_version() -> tuple[int, int] | None:
    """``(major, minor)`` of the installed compressed-tensors (from its metadata, without
    importing it), or ``None`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("compressed-tensors")
    except PackageNotFoundError:
        return None
    import re

    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else None


def resolve_rounding(rounding: str, device: torch.device) -> Rounding:
    """``"auto"`` -> the rounding the installed compressed-tensors uses on ``device``:
    ``"fp32"`` where it runs its Triton kernel (version 0.19+, CUDA device of compute
    capability 9.0+, Triton importable), ``"eager"`` everywhere else (its torch path; all
    devices with 0.17 and 0.18, which vLLM 0.33 installs). Without compressed-tensors
    installed, the newest behaviour (0.19+). See :data:`CT_TRITON_SINCE`."""
    if rounding == "auto":
        ct = compressed_tensors_version()
        if ct is not None and ct < CT_TRITON_SINCE:
            return "eager"
        if device.type == "cuda" and capability(device) >= (9, 0) and _triton_importable():
            return "fp32"
        return "eager"
    if rounding not in ("eager", "fp32"):
        raise ValueError(f"rounding must be 'auto', 'eager' or 'fp32', not {rounding!r}")
    return rounding  # type: ignore[return-value]


def quantize_channelwise(
    weight: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    check_finite: bool = True,
    rounding: Rounding | Literal["auto"] = "auto",
    reduce_absmax: Callable[[torch.Tensor], object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 per-output-channel quantization of a 2-D or 3-D weight.

    Args:
        weight: ``[out, in]`` or ``[experts, out, in]``, bf16/fp16/fp32, any strides
            (transposed views work), CPU or CUDA.
        out: optional preallocated ``float8_e4m3fn`` tensor of the weight's shape
            (any strides), filled in place and returned.
        scale_out: optional preallocated tensor of the weight's dtype and shape
            ``[out, 1]`` / ``[experts, out, 1]``, filled in place and returned.
        check_finite: raise :class:`NonFiniteError` when a row holds NaN/Inf (one
            device sync). With ``False`` such rows are quantized anyway: NaN rows get
            a NaN scale and NaN bytes, rows with inf (no NaN) get scale inf, their
            finite values become +-0 and their infinities NaN. NaN bytes may be
            0x7F or 0xFF (the kernel and torch may disagree on the sign of a NaN).
            With ``True`` the outputs have still been written when it raises.
        rounding: ``"auto"`` (default): what compressed-tensors itself does on the
            weight's device (:func:`resolve_rounding`); ``"eager"``: its torch path
            (divide in the weight dtype, then round to e4m3); ``"fp32"``: its Triton
            path on sm90+ (divide in fp32, round once). Same scales; the two differ in
            ~3% of the bytes of a bf16 weight, never for fp32 weights.
        reduce_absmax: an in-place reduction of the per-row absolute maxima before the
            scales are taken (tensor-parallel row slices: an all-reduce MAX). On the Triton
            path the maxima are taken by torch (one pass), reduced, and handed to the kernel.

    Returns:
        ``(q, scale)``: float8_e4m3fn of the weight's shape and a scale of the
        weight's dtype and shape ``[..., out, 1]``, such that
        ``weight ~= q.to(weight.dtype) * scale``; bytes identical to compressed-tensors.
    """
    rounding = resolve_rounding(rounding, weight.device)
    forced = os.environ.get("FASTFP8_QUANT_BACKEND", "")
    use_triton = (
        (forced == "triton" or (forced != "reference" and triton_supported(weight.device))) and weight.is_cuda
    )
    if use_triton:
        from .triton_kernel import quantize_channelwise_triton, row_amax_triton

        amax = None
        if reduce_absmax is not None and weight.numel():
            amax = row_amax_triton(weight)  # fp32, exact, NaN propagates
            reduce_absmax(amax)
        q, scale = quantize_channelwise_triton(weight, out=out, scale_out=scale_out, rounding=rounding, amax=amax)
    else:
        q, scale = quantize_channelwise_reference(
            weight, out=out, scale_out=scale_out, rounding=rounding, reduce_absmax=reduce_absmax
        )
    if check_finite:
        check_finite_scales(scale)
    return q, scale
