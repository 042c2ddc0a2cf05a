"""FP8 inference modules: :class:`Fp8Linear` and :class:`Fp8MoE`.

Weights are float8_e4m3fn with one scale per output channel (compressed-tensors
``FP8_DYNAMIC`` weights, what :func:`fastfp8.load_quantized` produces); activations are
quantized per token at run time where the GPU computes in fp8. Scales are kept in fp32
(``torch._scaled_mm`` takes fp32 scales; a bf16 checkpoint scale converts exactly).

Both modules hold their tensors as ``nn.Parameter(requires_grad=False)`` (the names follow
compressed-tensors / vLLM: ``weight``, ``weight_scale``, ``w13_weight``, ...), and call the
custom ops of :mod:`fastfp8.ops` under ``torch.compile`` (the plain functions otherwise, to
save the op dispatch in eager mode).
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .kernels import moe as _moe
from .kernels.common import FP8
from .quant import quantize_channelwise

__all__ = ["Fp8Linear", "Fp8MoE"]


def _param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) and not t.requires_grad else nn.Parameter(t, requires_grad=False)


def _scale_f32(scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    s = scale.reshape(shape)
    return s if s.dtype == torch.float32 else s.float()


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class Fp8Linear(nn.Module):
    """A linear layer with an fp8 weight ``[out, in]`` and a per-output-channel scale.

    ``forward(x [..., in]) -> [..., out]`` in ``x.dtype``. On CUDA sm89+ the path is the
    selection table's for the shape and row count (:func:`fastfp8.ops.linear_choice`): the
    W8A16 GEMV kernel (bf16/fp16, up to 128 rows), or the fused per-token activation
    quantization followed by ``torch._scaled_mm`` (rowwise, fast accumulation) or by the
    Triton W8A8 GEMM; on the CPU and older GPUs the weight is dequantized for an ``F.linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, device=None,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _param(torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.weight_scale = _param(torch.empty(out_features, 1, dtype=torch.float32, device=device))
        if bias:
            self.bias = _param(torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> Fp8Linear:
        """Wraps an fp8 ``weight [out, in]`` and its ``[out, 1]`` scale (any float dtype;
        kept as fp32) without copying the weight."""
        if weight.dtype != FP8 or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D float8_e4m3fn tensor, got {weight.dtype} {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        if weight_scale.numel() != out_f:
            raise ValueError(f"weight_scale must hold {out_f} values, got shape {tuple(weight_scale.shape)}")
        if bias is not None and bias.shape != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.in_features, mod.out_features = in_f, out_f
        mod.weight = _param(weight.detach())
        mod.weight_scale = _param(_scale_f32(weight_scale.detach(), (out_f, 1)).to(weight.device))
        if bias is not None:
            mod.bias = _param(bias.detach())
        else:
            mod.register_parameter("bias", None)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rounding: str = "auto") -> Fp8Linear:
        """Quantizes an ``nn.Linear`` (compressed-tensors numerics, per output channel)."""
        from .quant import resolve_rounding

        w = linear.weight.detach()
        q, s = quantize_channelwise(w, rounding=resolve_rounding(rounding, w.device))
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls.from_quantized(q, s, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _compiling():
            return torch.ops.fastfp8.linear(x, self.weight, self.weight_scale, self.bias)
        return ops.fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight as ``dtype`` (fp32 product, rounded once)."""
        return (self.weight.float() * self.weight_scale.float()).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


ROUTINGS = ("softmax_topk", "llama4")


class Fp8MoE(nn.Module):
    """A mixture-of-experts MLP with fp8 experts (SwiGLU: ``down(silu(gate x) * up x)``).

    Parameters: ``w13_weight [E, 2I, H]`` (gate rows, then up rows), ``w13_weight_scale
    [E, 2I, 1]``, ``w2_weight [E, H, I]``, ``w2_weight_scale [E, H, 1]`` (scales fp32), and
    optionally the router ``gate`` (an ``nn.Linear(H, E)`` in the activation dtype) and a
    ``shared_expert`` module whose output is added.

    Routing (``routing``): ``"softmax_topk"`` (Mixtral, Qwen3-MoE: softmax in fp32, top-k,
    renormalized when ``norm_topk_prob``) or ``"llama4"`` (top-k of the logits, the weight
    ``sigmoid(logit)`` scales the expert's input). ``forward(x [..., H])`` routes with
    ``gate``; :meth:`run_experts` takes routing decisions made elsewhere.

    ``backend`` (default ``"auto"``): see :func:`fastfp8.kernels.moe.fused_moe`.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, top_k: int,
                 routing: str = "softmax_topk", norm_topk_prob: bool = True, router: bool = True,
                 shared_expert: nn.Module | None = None, device=None, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        e, h, i = num_experts, hidden_size, intermediate_size
        self._setup(e, h, i, top_k, routing, norm_topk_prob)
        self.w13_weight = _param(torch.empty(e, 2 * i, h, dtype=FP8, device=device))
        self.w13_weight_scale = _param(torch.empty(e, 2 * i, 1, dtype=torch.float32, device=device))
        self.w2_weight = _param(torch.empty(e, h, i, dtype=FP8, device=device))
        self.w2_weight_scale = _param(torch.empty(e, h, 1, dtype=torch.float32, device=device))
        self.gate = nn.Linear(h, e, bias=False, device=device, dtype=dtype) if router else None
        self.shared_expert = shared_expert

    def _setup(self, e, h, i, top_k, routing, norm_topk_prob):
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if not 1 <= top_k <= e:
            raise ValueError(f"top_k must be in [1, {e}], got {top_k}")
        self.num_experts, self.hidden_size, self.intermediate_size = e, h, i
        self.top_k = top_k
        self.routing = routing
        self.norm_topk_prob = norm_topk_prob
        self.backend = "auto"

    @classmethod
    def from_quantized(cls, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                       *, top_k: int, router_weight: torch.Tensor | None = None, routing: str = "softmax_topk",
                       norm_topk_prob: bool = True, shared_expert: nn.Module | None = None) -> Fp8MoE:
        """Wraps fp8 expert stacks (no copy of the weights) and an optional router weight ``[E, H]``."""
        if w13.dtype != FP8 or w2.dtype != FP8 or w13.dim() != 3 or w2.dim() != 3:
            raise ValueError("w13 and w2 must be 3-D float8_e4m3fn tensors [E, 2I, H] and [E, H, I]")
        e, two_i, h = w13.shape
        i = two_i // 2
        if two_i % 2 or w2.shape != (e, h, i):
            raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit [E, 2I, H] / [E, H, I]")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod._setup(e, h, i, top_k, routing, norm_topk_prob)
        mod.w13_weight = _param(w13.detach())
        mod.w13_weight_scale = _param(_scale_f32(w13_scale.detach(), (e, two_i, 1)))
        mod.w2_weight = _param(w2.detach())
        mod.w2_weight_scale = _param(_scale_f32(w2_scale.detach(), (e, h, 1)))
        if router_weight is not None:
            if router_weight.shape != (e, h):
                raise ValueError(f"router_weight must be [{e}, {h}], got {tuple(router_weight.shape)}")
            gate = nn.Linear(h, e, bias=False, device="meta", dtype=router_weight.dtype)
            gate.weight = _param(router_weight.detach())
            mod.gate = gate
        else:
            mod.gate = None
        mod.shared_expert = shared_expert
        return mod

    @classmethod
    def from_float(cls, w13: torch.Tensor, w2: torch.Tensor, *, top_k: int, router_weight: torch.Tensor | None = None,
                   routing: str = "softmax_topk", norm_topk_prob: bool = True,
                   shared_expert: nn.Module | None = None, rounding: str = "auto") -> Fp8MoE:
        """Quantizes bf16/fp16/fp32 expert stacks ``w13 [E, 2I, H]`` and ``w2 [E, H, I]``."""
        from .quant import resolve_rounding

        r = resolve_rounding(rounding, w13.device)
        q13, s13 = quantize_channelwise(w13.detach(), rounding=r)
        q2, s2 = quantize_channelwise(w2.detach(), rounding=r)
        return cls.from_quantized(q13, s13, q2, s2, top_k=top_k, router_weight=router_weight, routing=routing,
                                  norm_topk_prob=norm_topk_prob, shared_expert=shared_expert)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(topk_weights, topk_ids)`` for ``x [T, H]`` from the ``gate`` router."""
        if self.gate is None:
            raise RuntimeError("this Fp8MoE has no router: call run_experts() with routing decisions")
        logits = self.gate(x)
        if self.routing == "llama4":
            return _moe.route_llama4(logits, self.top_k)
        return _moe.route_softmax_topk(logits, self.top_k, renormalize=self.norm_topk_prob)

    def run_experts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The routed experts only: ``x [T, H]`` -> ``[T, H]`` (no shared expert)."""
        on_input = self.routing == "llama4"
        args = (x, topk_ids, topk_weights, self.w13_weight, self.w13_weight_scale, self.w2_weight,
                self.w2_weight_scale)
        if _compiling():
            return torch.ops.fastfp8.moe(*args, on_input, self.backend)
        return ops.moe_experts(*args, on_input, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        topk_weights, topk_ids = self.route(x2)
        y = self.run_experts(x2, topk_ids, topk_weights)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x2)
        return y.reshape(shape)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w13, w2)`` as ``dtype``."""
        return ((self.w13_weight.float() * self.w13_weight_scale).to(dtype),
                (self.w2_weight.float() * self.w2_weight_scale).to(dtype))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, top_k={self.top_k}, routing={self.routing!r}")

