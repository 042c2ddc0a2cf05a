"""Routing (Mixtral / Qwen3-MoE softmax top-k, Llama4 sigmoid top-k), the dequantizing
reference loop that the tests compare every backend with, and the bf16 baselines of the
benchmark (a per-expert loop and ``torch._grouped_mm``)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..common import empty, next_power_of_2, tl, triton
from .sort import _combine, sort_tokens

__all__ = ["moe_bf16_grouped", "moe_bf16_loop", "moe_reference", "route_llama4", "route_softmax_topk",
           "route_softmax_topk_torch"]

#: the most experts, and the largest top-k, the one-kernel routing takes (more: torch; its
#: k rounds are unrolled when the kernel is compiled)
ROUTE_MAX_EXPERTS = 1024
ROUTE_MAX_TOP_K = 32

if triton is not None:

    @triton.jit
    def _route_kernel(logits_ptr, w_ptr, ids_ptr, n_tokens, n_experts, s_t,
                      K: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        # BLOCK_T tokens a program: softmax over the experts in fp32, then K rounds of
        # (max, its lowest index) on the logits' order, each winner masked out
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        row_ok = rows < n_tokens
        ok = row_ok[:, None] & (cols < n_experts)[None, :]
        x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * s_t + cols[None, :], mask=ok,
                    other=-float("inf")).to(tl.float32)
        m = tl.max(x, axis=1)
        p = tl.exp(x - m[:, None])
        p = tl.where(ok, p, 0.0)
        inv_sum = 1.0 / tl.sum(p, axis=1)
        prob = tl.where(ok, p * inv_sum[:, None], -1.0)
        total = tl.zeros([BLOCK_T], dtype=tl.float32)
        for j in tl.static_range(K):
            best = tl.max(prob, axis=1)
            idx = tl.min(tl.where(prob == best[:, None], cols[None, :], BLOCK_E), axis=1)
            idx = tl.where(idx < n_experts, idx, 0)  # a NaN row matches nothing: stay in range
            tl.store(w_ptr + rows * K + j, best, mask=row_ok)
            tl.store(ids_ptr + rows * K + j, idx.to(tl.int64), mask=row_ok)
            total += best
            prob = tl.where(cols[None, :] == idx[:, None], -1.0, prob)
        if RENORM:
            inv = 1.0 / total
            for j in tl.static_range(K):
                w = tl.load(w_ptr + rows * K + j, mask=row_ok, other=0.0)
                tl.store(w_ptr + rows * K + j, w * inv, mask=row_ok)


def route_softmax_topk(
    logits: torch.Tensor, top_k: int, *, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen3-MoE routing: softmax over the experts in fp32, top-k, optionally
    renormalized to sum to 1. Returns ``(topk_weights fp32 [T, k], topk_ids int64 [T, k])``,
    the experts in descending order of weight (on CUDA, ties: the lower index first).

    On CUDA one Triton kernel (torch's softmax, top-k, sum and division took six kernels
    and 48 us at 4096 tokens and 128 experts on an H200, the top-k alone 32); under
    ``torch.compile``, off CUDA, and past :data:`ROUTE_MAX_EXPERTS` experts or a top-k of
    :data:`ROUTE_MAX_TOP_K`: :func:`route_softmax_topk_torch` (the weights agree to fp32 rounding: the kernel's
    ``exp`` is not torch's)."""
    e = logits.shape[-1]
    if (logits.is_cuda and triton is not None and logits.dim() == 2 and e <= ROUTE_MAX_EXPERTS
            and 1 <= top_k <= min(e, ROUTE_MAX_TOP_K) and not torch.compiler.is_compiling()):
        return _route_triton(logits, top_k, renormalize)
    return route_softmax_topk_torch(logits, top_k, renormalize=renormalize)


def _route_triton(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`route_softmax_topk` in one Triton launch (``logits [T, E]``, ``E`` at most
    :data:`ROUTE_MAX_EXPERTS`)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    t, e = logits.shape
    w = empty((t, top_k), torch.float32, logits.device)
    ids = torch.full((t, top_k), -1, dtype=torch.int64, device=logits.device)
    if t:
        block_e = max(16, next_power_of_2(e))
        block_t = max(1, min(64, 2048 // block_e))
        with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
            _route_kernel[(-(-t // block_t),)](logits, w, ids, t, e, logits.stride(0), K=top_k, RENORM=renormalize,
                                               BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4)
    return w, ids


def route_softmax_topk_torch(
    logits: torch.Tensor, top_k: int, *, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`route_softmax_topk` in plain torch."""
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
