"""The grouped-GEMM backend: ``torch._scaled_grouped_mm`` (sm90, torch >= 2.8), W8A8 rowwise
with fast accumulation; the activation between the GEMMs is fused with its quantization
(:func:`fastfp8.kernels.act_quant.triton_act_quant` ``gated=True``)."""

from __future__ import annotations

import os

import torch

from ..act_quant import triton_act_quant
from ..common import capability
from .routing import _expert_inputs
from .sort import _combine, sort_tokens

__all__ = ["GROUPED_FAST_ACCUM", "grouped_supported", "moe_grouped"]

#: ``use_fast_accum`` of the grouped backend's ``torch._scaled_grouped_mm`` calls
GROUPED_FAST_ACCUM = os.environ.get("FASTFP8_GROUPED_FAST_ACCUM", "1") == "1"


def grouped_supported(device: torch.device) -> bool:
    """``torch._scaled_grouped_mm`` exists and runs on ``device`` (sm90)."""
    return (
        hasattr(torch, "_scaled_grouped_mm")
        and capability(device)[0] == 9
        and os.environ.get("FASTFP8_NO_GROUPED", "") != "1"
    )


@torch.no_grad()
def moe_grouped(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, *, weights_on_input=False):
    """W8A8 with ``torch._scaled_grouped_mm`` (see the module docstring)."""
    t = x.shape[0]
    k = topk_ids.shape[1]
    num_experts = w13.shape[0]
    order, _, offs, inv = sort_tokens(topk_ids, num_experts, with_inverse=True)
    xin = _expert_inputs(x, topk_weights, weights_on_input)
    # each token quantized once and its bytes and scale written to its pairs' sorted rows
    # (one kernel: quantizing, then gathering the k copies' bytes and scales took three,
    # 72 us at 4096 tokens of Qwen3-30B-A3B on an H200; quantizing each gathered copy 82)
    aq, sa = triton_act_quant(x if xin is None else xin, scatter=inv)
    s13 = w13_scale.reshape(num_experts, -1).float()
    s2 = w2_scale.reshape(num_experts, -1).float()
    h13 = torch._scaled_grouped_mm(aq, w13.transpose(1, 2), sa.reshape(-1), s13, offs=offs,
                                   out_dtype=torch.bfloat16, use_fast_accum=GROUPED_FAST_ACCUM)
    act, sact = triton_act_quant(h13, gated=True)
    y = torch._scaled_grouped_mm(act, w2.transpose(1, 2), sact.reshape(-1), s2, offs=offs,
                                 out_dtype=torch.bfloat16, use_fast_accum=GROUPED_FAST_ACCUM)
    return _combine(y, order, topk_weights, t, k, weights_on_input, out_dtype=x.dtype, inv=inv)
