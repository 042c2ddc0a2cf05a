"""fastfp8's kernels as torch custom ops (namespace ``fastfp8``), with fake implementations,
so that ``torch.compile`` (``fullgraph=True`` included) and CUDA graphs see opaque ops:

- ``torch.ops.fastfp8.act_quant(x) -> (q, scale)``: per-token dynamic fp8 quantization of
  ``x [M, K]``: ``q`` float8_e4m3fn ``[M, K]``, ``scale`` fp32 ``[M, 1]``.
- ``torch.ops.fastfp8.gemv(x, weight, weight_scale, bias?) -> y``: the small-M W8A16 kernel
  (CUDA only).
- ``torch.ops.fastfp8.linear(x, weight, weight_scale, bias?) -> y``: ``Fp8Linear``'s forward
  for ``x [..., K]``, dispatching on the device and the shape (see :func:`fp8_linear`).
- ``torch.ops.fastfp8.moe(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale,
  weights_on_input, backend) -> y``: the routed experts (:func:`fastfp8.kernels.moe.fused_moe`).

Schemas are written out (not inferred from annotations) so that the same code registers
on torch 2.8 through the newest.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .kernels import act_quant as _aq
from .kernels import gemm as _gemm
from .kernels import gemv as _gemv
from .kernels import linear_table as _table
from .kernels import moe as _moe
from .kernels.common import FP8, capability, fp8_supported, triton

_NS = "fastfp8"

__all__ = ["fp8_linear", "fp8_linear_fallback", "linear_backend", "linear_choice", "moe_experts"]

_FORCED = ("gemv", "w16", "scaled_mm", "tile", "tma", "fallback")


def _fast_path(x: torch.Tensor) -> bool:
    return x.is_cuda and triton is not None and fp8_supported(x.device)


def linear_choice(x: torch.Tensor, weight: torch.Tensor) -> tuple[str, tuple | None]:
    """``(backend, config)`` that :func:`fp8_linear` uses for ``x [..., K]`` and ``weight [N, K]``:
    ``"gemv"``, ``"w16"``, ``"scaled_mm"``, ``"tile"``, ``"tma"`` (from the selection table,
    :mod:`fastfp8.kernels.linear_table`) or ``"fallback"``. ``FASTFP8_LINEAR_BACKEND`` forces
    one of them where it can run (``w16``/``tile``/``tma`` with a default tile)."""
    forced = os.environ.get("FASTFP8_LINEAR_BACKEND", "")
    if forced and forced not in _FORCED:
        raise ValueError(f"FASTFP8_LINEAR_BACKEND={forced!r} is not one of {', '.join(_FORCED)}")
    if forced == "fallback" or not _fast_path(x):
        return "fallback", None
    n, k = weight.shape
    m = x.numel() // k if k else 0
    gemv_ok = x.dtype in (torch.bfloat16, torch.float16)
    mm_ok = k % 16 == 0 and n % 16 == 0
    if forced in _FORCED:
        if forced == "gemv" and gemv_ok and m <= _gemv.MAX_ROWS:
            return "gemv", None
        if forced == "w16" and gemv_ok:
            return "w16", _gemm.default_config(m, n, k, "w16")
        if forced == "scaled_mm" and mm_ok:
            return "scaled_mm", None
        if forced == "tile" or (forced == "tma" and mm_ok and _gemm.tma_supported(x.device)):
            return forced, _gemm.default_config(m, n, k, forced)
    backend, cfg = _table.select(m, n, k, capability(x.device))
    if backend == "gemv" and not (gemv_ok and m <= _gemv.MAX_ROWS):
        backend, cfg = "scaled_mm", None
    if backend == "w16" and not gemv_ok:  # W8A16 takes bf16/fp16 activations only
        backend, cfg = "scaled_mm", None
    if backend == "tma" and not (mm_ok and _gemm.tma_supported(x.device)):
        backend, cfg = "tile", _gemm.default_config(m, n, k, "tile")
    if backend == "scaled_mm" and not mm_ok:
        backend, cfg = "tile", _gemm.default_config(m, n, k, "tile")
    if backend in ("tile", "tma") and cfg is None:
        cfg = _gemm.default_config(m, n, k, backend)
    if backend == "w16" and cfg is None:
        cfg = _gemm.default_config(m, n, k, "w16")
    return backend, cfg


def linear_backend(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The backend name of :func:`linear_choice`."""
    return linear_choice(x, weight)[0]


def fp8_linear_fallback(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantize (fp32 product, rounded to ``x.dtype``), then ``F.linear``: CPU, pre-sm89."""
    w = (weight.float() * weight_scale.float().reshape(-1, 1)).to(x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    fresh_counters: bool = False,
) -> torch.Tensor:
    """``x [..., K] @ (weight [N, K] * weight_scale [N, 1]).T + bias``, in ``x.dtype``.

    CUDA sm89+: the path of the selection table (:func:`linear_choice`): the W8A16 GEMV
    kernel for a few rows (bf16/fp16); the W8A16 tiled GEMM (bf16/fp16, no activation
    quantization); else the fused per-token
    activation quantization followed by ``torch._scaled_mm`` rowwise (fast accumulation, bias
    added after) or by the Triton W8A8 GEMM (scales and bias in its epilogue). Elsewhere:
    :func:`fp8_linear_fallback`.

    ``fresh_counters=True``: a split-K kernel (the GEMV, the tiled GEMMs) counts its splits'
    arrivals in zeros made for the call, not in the stream's persistent counters, which, made
    inside torch.compile's CUDA graphs (cudagraph trees allocate in the graphs' own pool, also
    while warming up, and on a side stream too), would be a live allocation those graphs do
    not own, which they refuse.
    The compiled op (``torch.ops.fastfp8.linear``) passes ``True``.
    """
    backend, cfg = linear_choice(x, weight)
    if backend == "fallback":
        return fp8_linear_fallback(x, weight, weight_scale, bias)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], n))
    if backend == "gemv":
        launch = None if cfg is None else _gemv.config_of(cfg, x2.shape[0])
        y = _gemv.fp8_gemv(x2, weight, weight_scale, bias, config=launch, fresh_counters=fresh_counters)
        return y.reshape(*x.shape[:-1], n)
    if backend == "w16":
        y = _gemm.w16_gemm(x2, weight, weight_scale, bias, config=cfg, fresh_counters=fresh_counters)
        return y.reshape(*x.shape[:-1], n)
    q, s = _aq.triton_act_quant(x2)
    if backend in ("tile", "tma"):
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        y = _gemm.fp8_gemm(q, s, weight, weight_scale, bias, config=cfg, out_dtype=out_dtype,
                               fresh_counters=fresh_counters)
    else:
        scale_b = weight_scale.reshape(1, n)
        if scale_b.dtype != torch.float32:
            scale_b = scale_b.float()
        y = torch._scaled_mm(q, weight.t(), scale_a=s, scale_b=scale_b, out_dtype=torch.bfloat16,
                             use_fast_accum=True)
        if bias is not None:
            y.add_(bias.to(y.dtype))
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    weights_on_input: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`fastfp8.kernels.moe.fused_moe` (plain call; the op is ``torch.ops.fastfp8.moe``)."""
    return _moe.fused_moe(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale,
                          weights_on_input=weights_on_input, backend=backend)


# ---------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------


def _registered(name: str) -> bool:
    return hasattr(getattr(torch.ops, _NS), name)


def _act_quant_impl(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = _aq.act_quant(x)
    return q, s


def _act_quant_fake(x):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def _gemv_impl(x, weight, weight_scale, bias):
    return _gemv.fp8_gemv(x, weight, weight_scale, bias)


def _gemv_fake(x, weight, weight_scale, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _linear_impl(x, weight, weight_scale, bias):
    return fp8_linear(x, weight, weight_scale, bias, fresh_counters=True)  # see fp8_linear


def _linear_fake(x, weight, weight_scale, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _moe_impl(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, weights_on_input, backend):
    return moe_experts(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, weights_on_input, backend)


def _moe_fake(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, weights_on_input, backend):
    return torch.empty_like(x)


_OPS = {
    "act_quant": ("(Tensor x) -> (Tensor, Tensor)", _act_quant_impl, _act_quant_fake),
    "gemv": ("(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor", _gemv_impl, _gemv_fake),
    "linear": ("(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor", _linear_impl, _linear_fake),
    "moe": (
        "(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13, Tensor w13_scale, Tensor w2, "
        "Tensor w2_scale, bool weights_on_input, str backend) -> Tensor",
        _moe_impl,
        _moe_fake,
    ),
}

for _name, (_schema, _impl, _fake) in _OPS.items():
    if not _registered(_name):  # a re-import (importlib.reload) must not register twice
        _op = torch.library.custom_op(f"{_NS}::{_name}", _impl, mutates_args=(), schema=_schema)
        _op.register_fake(_fake)
