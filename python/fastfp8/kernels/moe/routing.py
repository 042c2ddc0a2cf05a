"""Routing (Mixtral / Qwen3-MoE softmax top-k, Llama4 sigmoid top-k), the dequantizing
reference loop that the tests compare every backend with, and the bf16 baselines of the
benchmark (a per-expert loop and ``torch._grouped_mm``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sort import _combine, sort_tokens

__all__ = ["moe_bf16_grouped", "moe_bf16_loop", "moe_reference", "route_llama4", "route_softmax_topk"]


def route_softmax_topk(
    logits: torch.Tensor, top_k: int, *, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen3-MoE routing: softmax over the experts in fp32, top-k, optionally
    renormalized to sum to 1. Returns ``(topk_weights fp32 [T, k], topk_ids int64 [T, k])``."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids


def route_llama4(logits: torch.Tensor, top_k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama4 routing: top-k of the raw logits, weight ``sigmoid(logit)`` (applied to the
    expert's input, not its output). Weights in the logits' dtype, as transformers has them."""
    top, ids = torch.topk(logits, top_k, dim=-1)
    return torch.sigmoid(top.float()).to(logits.dtype), ids


def _dequant(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (w.float() * s.float()).to(dtype)


def _expert_inputs(x, topk_weights, weights_on_input):
    """``[T*k, H]`` rows per (token, slot) pair when the weight scales the input, else None."""
    if not weights_on_input:
        return None
    k = topk_weights.shape[1]
    return (x.unsqueeze(1) * topk_weights.to(x.dtype).unsqueeze(-1)).reshape(-1, x.shape[1]) if k else x[:0]


@torch.no_grad()
def moe_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    *,
    weights_on_input: bool = False,
) -> torch.Tensor:
    """Loop over the experts that were hit; weights dequantized to ``x.dtype``, matmuls in
    ``x.dtype`` (like transformers' bf16 experts), combination in fp32. Syncs on CUDA."""
    return _moe_loop(x, topk_ids, topk_weights, weights_on_input,
                     lambda e: (_dequant(w13[e], w13_scale[e], x.dtype), _dequant(w2[e], w2_scale[e], x.dtype)))


@torch.no_grad()
def moe_bf16_loop(x, topk_ids, topk_weights, w13, w2, *, weights_on_input: bool = False) -> torch.Tensor:
    """The same loop on unquantized ``w13 [E, 2I, H]`` / ``w2 [E, H, I]`` (a baseline)."""
    return _moe_loop(x, topk_ids, topk_weights, weights_on_input, lambda e: (w13[e], w2[e]))


def _moe_loop(x, topk_ids, topk_weights, weights_on_input, weights_of):
    t, h = x.shape
    k = topk_ids.shape[1]
    out = torch.zeros((t, h), dtype=torch.float32, device=x.device)
    if t == 0 or k == 0:
        return out.to(x.dtype)
    xin = _expert_inputs(x, topk_weights, weights_on_input)
    flat = topk_ids.reshape(-1)
    for e in torch.unique(flat).tolist():
        pairs = (flat == e).nonzero().squeeze(1)
        tok = pairs // k
        a13, a2 = weights_of(e)
        xe = xin[pairs] if xin is not None else x[tok]
        g, u = F.linear(xe, a13).chunk(2, dim=-1)
        y = F.linear(F.silu(g) * u, a2).float()
        if not weights_on_input:
            y = y * topk_weights.reshape(-1)[pairs].float().unsqueeze(1)
        out.index_add_(0, tok, y)
    return out.to(x.dtype)


@torch.no_grad()
def moe_bf16_grouped(x, topk_ids, topk_weights, w13, w2, *, weights_on_input: bool = False) -> torch.Tensor:
    """bf16 baseline with ``torch._grouped_mm`` (the same sort and combine as the fp8
    grouped path): ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` unquantized."""
    t = x.shape[0]
    k = topk_ids.shape[1]
    order, tok, offs, inv = sort_tokens(topk_ids, w13.shape[0], with_inverse=True)
    xin = _expert_inputs(x, topk_weights, weights_on_input)
    a = xin[order] if xin is not None else x[tok]
    h13 = torch._grouped_mm(a, w13.transpose(1, 2), offs=offs)
    inter = h13.shape[1] // 2
    act = F.silu(h13[:, :inter]) * h13[:, inter:]
    y = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)
    return _combine(y, order, topk_weights, t, k, weights_on_input, inv=inv)
