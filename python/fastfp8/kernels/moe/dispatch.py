"""Backend choice and the entry point of the routed experts (:func:`fused_moe`)."""

from __future__ import annotations

import os

import torch

from ..common import fp8_supported, triton
from .fused import moe_triton
from .grouped import grouped_supported, moe_grouped
from .routing import moe_reference

__all__ = ["MOE_SMALL_PAIRS_PER_EXPERT", "fused_moe", "pick_backend"]

#: ``"auto"`` uses the Triton W8A8 kernels up to this many (token, expert) pairs per expert
#: on average, the W8A8 grouped GEMM (sm90) above. Measured on the H200 (CUDA graphs,
#: ``bench_modules.py --only moe``, 1 - 4096 tokens): the Triton W8A8 kernels were the
#: fastest from 1 token up to 32 pairs per expert on Mixtral-8x7B and Qwen3-30B-A3B shapes
#: (8 - 30% ahead of the W8A16 kernels, 16 - 31% of the grouped GEMM); above, the grouped
#: GEMM won on Qwen3 (64 pairs per expert: 347 us against 394) and on Mixtral at 64 and
#: 1024 per expert (not at 256: 1280 against 1043).
MOE_SMALL_PAIRS_PER_EXPERT = float(os.environ.get("FASTFP8_MOE_SMALL", "32"))


def pick_backend(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, hidden: int, inter: int) -> str:
    """``"auto"`` -> ``"triton_a8"`` (the Triton W8A8 kernels) up to
    :data:`MOE_SMALL_PAIRS_PER_EXPERT` pairs per expert and wherever the grouped GEMM cannot
    run, ``"grouped"`` (sm90) above; ``"reference"`` off CUDA / before sm89 / without Triton.
    The W8A16 kernels (``"triton"``) are there to be named."""
    if not x.is_cuda or triton is None or not fp8_supported(x.device):
        return "reference"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return "reference"
    pairs = topk_ids.numel()
    if pairs <= MOE_SMALL_PAIRS_PER_EXPERT * num_experts:
        return "triton_a8"
    if x.dtype == torch.bfloat16 and hidden % 16 == 0 and inter % 16 == 0 and grouped_supported(x.device):
        return "grouped"
    return "triton_a8"


def fused_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    *,
    weights_on_input: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """The routed experts of an FP8 MoE layer: ``x [T, H]``, ``topk_ids [T, k]`` (int),
    ``topk_weights [T, k]`` -> ``[T, H]`` in ``x.dtype``. See the module docstring."""
    if x.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"bad shapes: x {tuple(x.shape)}, topk_ids {tuple(topk_ids.shape)}, "
                         f"topk_weights {tuple(topk_weights.shape)}")
    num_experts, two_i, hidden = w13.shape
    if w2.shape != (num_experts, hidden, two_i // 2) or x.shape[1] != hidden:
        raise ValueError(f"w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} / x {tuple(x.shape)} do not fit")
    if backend == "auto":
        backend = pick_backend(x, topk_ids, num_experts, hidden, two_i // 2)
    args = (x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale)
    if backend == "reference":
        return moe_reference(*args, weights_on_input=weights_on_input)
    if backend == "triton":
        return moe_triton(*args, weights_on_input=weights_on_input, a8=False)
    if backend == "triton_a8":
        return moe_triton(*args, weights_on_input=weights_on_input, a8=True)
    if backend == "grouped":
        return moe_grouped(*args, weights_on_input=weights_on_input)
    raise ValueError(f"unknown MoE backend {backend!r}")
