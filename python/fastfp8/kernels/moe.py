"""FP8 mixture-of-experts: routing, tokens sorted per expert, grouped GEMMs.

Expert weights (vLLM's fused-MoE layout, what :func:`fastfp8.load_quantized` produces for
Llama4 and :mod:`fastfp8.model` stacks for per-expert checkpoints):

- ``w13 [E, 2I, H]`` float8_e4m3fn, rows ``[0, I)`` gate, ``[I, 2I)`` up, ``w13_scale [E, 2I, 1]``,
- ``w2 [E, H, I]`` float8_e4m3fn, ``w2_scale [E, H, 1]``,

per output channel. Each token ``t`` goes to ``top_k`` experts ``e`` with weight ``w``:
``out[t] = sum_e w * W2_e(silu(G_e x) * U_e x)`` (or ``W2_e(...(w * x))`` with
``weights_on_input``, Llama4's way).

Backends of :func:`fused_moe` (``"auto"`` picks one per call from the device and the batch):

- ``"triton"``: fused Triton kernels over tokens sorted per expert and padded to the block
  size (vLLM's fused-MoE scheme). Stage 1 computes gate and up tiles together and writes
  ``silu(g) * u``; stage 2 multiplies by ``w2`` and the routing weight. ``a8=False``: the
  activations stay bf16 and the fp8 weights are widened in registers (W8A16; the decode
  case, bound by reading the weights); ``a8=True``: per-token fp8 activations and fp8
  tensor-core dots (W8A8, sm89+).
- ``"grouped"``: ``torch._scaled_grouped_mm`` (sm90, torch >= 2.8), W8A8 rowwise with fast
  accumulation; the activation between the GEMMs is fused with its quantization
  (:func:`fastfp8.kernels.act_quant.triton_act_quant` ``gated=True``).
- ``"reference"``: a loop over the experts that were hit, weights dequantized to the
  activation dtype (the CPU / pre-sm89 fallback, and the tests' oracle).

Nothing here synchronizes with the host on CUDA (buffers are sized by upper bounds), so
every backend can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F

from .act_quant import act_quant, triton_act_quant

FP8 = torch.float8_e4m3fn

__all__ = [
    "align_tokens",
    "align_tokens_torch",
    "fused_moe",
    "grouped_supported",
    "moe_bf16_grouped",
    "moe_bf16_loop",
    "moe_grouped",
    "moe_reference",
    "moe_triton",
    "pick_backend",
    "route_llama4",
    "route_softmax_topk",
    "sort_tokens",
    "sort_tokens_torch",
]

#: ``"auto"`` uses the Triton W8A16 kernels up to this many (token, expert) pairs per
#: expert on average, the W8A8 grouped GEMM (or Triton W8A8 kernel) above.
MOE_SMALL_PAIRS_PER_EXPERT = float(os.environ.get("FASTFP8_MOE_SMALL", "4"))
#: ``use_fast_accum`` of the grouped backend's ``torch._scaled_grouped_mm`` calls
GROUPED_FAST_ACCUM = os.environ.get("FASTFP8_GROUPED_FAST_ACCUM", "1") == "1"
#: tests set this: intermediate buffers are filled with NaN when allocated, so that a row or
#: column a kernel fails to write shows up in the result
POISON = False


def _empty(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON and dtype == FP8:
        t.view(torch.uint8).fill_(0x7F)
    elif POISON:
        t.fill_(float("nan"))
    return t


# ---------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# references and bf16 baselines
# ---------------------------------------------------------------------------------------


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
    order, tok, offs = sort_tokens(topk_ids, w13.shape[0])
    xin = _expert_inputs(x, topk_weights, weights_on_input)
    a = xin[order] if xin is not None else x[tok]
    h13 = torch._grouped_mm(a, w13.transpose(1, 2), offs=offs)
    inter = h13.shape[1] // 2
    act = F.silu(h13[:, :inter]) * h13[:, inter:]
    y = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)
    return _combine(y, order, topk_weights, t, k, weights_on_input)


# ---------------------------------------------------------------------------------------
# sorting (no host synchronization)
# ---------------------------------------------------------------------------------------


def _counts(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    # scatter_add instead of bincount: bincount synchronizes to size its output
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def sort_tokens(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, token_of_sorted_pair, offs)``: pair indices (``t * k + slot``) sorted by
    expert (stable), their tokens, and int32 cumulative END offsets per expert (what
    ``torch._grouped_mm`` / ``torch._scaled_grouped_mm`` take). A two-launch Triton counting
    sort on CUDA (:func:`_sort_triton`), torch elsewhere (:func:`sort_tokens_torch`)."""
    if _use_triton_sort(topk_ids):
        try:
            order, tok, offs, _, _ = _sort_triton(topk_ids, num_experts, 1, pad=False)
            return order, tok, offs
        except Exception as e:  # a Triton problem must not take the MoE down: torch instead
            _triton_sort_failed(e)
    return sort_tokens_torch(topk_ids, num_experts)


def sort_tokens_torch(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sort_tokens` in plain torch (argsort, stable)."""
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(_counts(flat, num_experts), 0).to(torch.int32)
    return order, order // topk_ids.shape[1], offs


def align_tokens(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs sorted per expert, each expert's run padded to a multiple of ``block_m``.

    Returns ``(sorted_ids int32 [S], expert_ids int32 [S // block_m], num_padded int32 [1])``:
    ``sorted_ids`` holds pair indices ``t * k + slot``, ``P = T * k`` marks padding;
    ``S = round_up(P + min(E, P) * (block_m - 1), block_m)`` is an upper bound on the padded
    total ``num_padded``. Entries at or past ``num_padded`` are unspecified on CUDA (the
    kernels skip those blocks); the torch version fills them with ``P`` / ``E - 1``."""
    if _use_triton_sort(topk_ids):
        try:
            sorted_ids, _, _, expert_ids, npad = _sort_triton(topk_ids, num_experts, block_m, pad=True)
            return sorted_ids, expert_ids, npad
        except Exception as e:
            _triton_sort_failed(e)
    return align_tokens_torch(topk_ids, num_experts, block_m)


def _align_size(p: int, num_experts: int, block_m: int) -> int:
    return -(-(p + min(num_experts, p) * (block_m - 1)) // block_m) * block_m


def align_tokens_torch(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`align_tokens` in plain torch."""
    flat = topk_ids.reshape(-1).long()
    p = flat.numel()
    dev = flat.device
    counts = _counts(flat, num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    dest = pad_start[sorted_e] + torch.arange(p, device=dev) - cnt_start[sorted_e]
    size = _align_size(p, num_experts, block_m)
    sorted_ids = torch.full((size,), p, dtype=torch.int32, device=dev)
    sorted_ids.index_copy_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, size, block_m, device=dev)
    expert_ids = torch.searchsorted(pad_end, starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, expert_ids, pad_end[-1:].to(torch.int32)


_TRITON_SORT = os.environ.get("FASTFP8_TRITON_SORT", "1") == "1"


def _use_triton_sort(topk_ids: torch.Tensor) -> bool:
    return _TRITON_SORT and topk_ids.is_cuda and triton is not None and topk_ids.numel() > 0


def _triton_sort_failed(e: Exception) -> None:
    global _TRITON_SORT
    _TRITON_SORT = False
    import warnings

    warnings.warn(f"fastfp8: the Triton token sort failed ({type(e).__name__}: {e}); using torch from now on",
                  stacklevel=3)


def _sort_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int, *, pad: bool):
    """Counting sort by expert in two launches (one program per expert: count, then place
    with a running prefix), stable and deterministic. Returns ``(ids, tok, ends, expert_ids,
    num_padded)``: with ``pad`` the :func:`align_tokens` layout (``ids`` int32 padded,
    ``expert_ids``, ``num_padded``), else :func:`sort_tokens`' (``ids`` = order int64,
    ``tok`` int64, ``ends`` int32 END offsets)."""
    flat = topk_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    p = flat.numel()
    dev = flat.device
    k = topk_ids.shape[-1] if topk_ids.dim() > 1 else 1
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    ends = torch.empty(num_experts, dtype=torch.int32, device=dev)
    block = min(1024, max(16, triton.next_power_of_2(p)))
    switch = dev.index != torch.cuda.current_device() if flat.is_cuda else False
    with torch.cuda.device(dev) if switch else contextlib.nullcontext():
        _count_kernel[(num_experts,)](flat, counts, p, BLOCK=block, num_warps=4)
        if pad:
            size = _align_size(p, num_experts, block_m)
            ids = torch.empty(size, dtype=torch.int32, device=dev)
            tok = ids  # unused
            expert_ids = torch.empty(size // block_m, dtype=torch.int32, device=dev)
            npad = torch.empty(1, dtype=torch.int32, device=dev)
        else:
            ids = torch.empty(p, dtype=torch.int64, device=dev)
            tok = torch.empty(p, dtype=torch.int64, device=dev)
            expert_ids = npad = ends  # unused
        _place_kernel[(num_experts,)](
            flat, counts, ids, tok, expert_ids, ends, npad, p, num_experts, k,
            PAD=pad, BM=block_m, BLOCK=block, BLOCK_E=max(16, triton.next_power_of_2(num_experts)), num_warps=4)
    return ids, (None if pad else tok), ends, (expert_ids if pad else None), (npad if pad else None)


def _combine(y, order, topk_weights, t, k, weights_on_input, out_dtype=None):
    """Sorted expert outputs ``y [P, H]`` -> ``[T, H]``: ``out[t] = sum_j w[t, j] * y[row of
    (t, j)]`` in fp32 (``w = 1`` with ``weights_on_input``). One Triton kernel on CUDA
    (reads ``y`` once), torch elsewhere."""
    out_dtype = out_dtype or y.dtype
    h = y.shape[1]
    if y.is_cuda and triton is not None and t * k:
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        w = topk_weights.reshape(-1)
        if not w.is_contiguous():
            w = w.contiguous()
        out = _empty((t, h), out_dtype, y.device)
        block_h = min(1024, triton.next_power_of_2(max(h, 16)))
        _combine_kernel[(t, triton.cdiv(h, block_h))](
            y, inv, w, out, h, y.stride(0), out.stride(0),
            K=k, HAS_W=not weights_on_input, BLOCK_H=block_h, num_warps=4)
        return out
    yf = y.float()
    if not weights_on_input:
        yf = yf * topk_weights.reshape(-1)[order].float().unsqueeze(1)
    out = torch.zeros((t * k, h), dtype=torch.float32, device=y.device)
    out.index_copy_(0, order, yf)
    return out.view(t, k, h).sum(dim=1).to(out_dtype)


# ---------------------------------------------------------------------------------------
# Triton fused-MoE kernel
# ---------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _count_kernel(ids_ptr, counts_ptr, p, BLOCK: tl.constexpr):
        e = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for p0 in range(0, p, BLOCK):
            offs = p0 + tl.arange(0, BLOCK)
            v = tl.load(ids_ptr + offs, mask=offs < p, other=-1)
            acc += (v == e).to(tl.int32)
        tl.store(counts_ptr + e, tl.sum(acc, axis=0))

    @triton.jit
    def _place_kernel(ids_ptr, counts_ptr, out_ptr, tok_ptr, expert_ids_ptr, ends_ptr, npad_ptr, p, num_experts, k,
                      PAD: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
        e = tl.program_id(0)
        re = tl.arange(0, BLOCK_E)
        c = tl.load(counts_ptr + re, mask=re < num_experts, other=0)
        if PAD:
            c = (c + BM - 1) // BM * BM
        start = tl.sum(tl.where(re < e, c, 0), axis=0)
        mine = tl.sum(tl.where(re == e, c, 0), axis=0)  # this expert's (padded) run
        run = start
        for p0 in range(0, p, BLOCK):
            offs = p0 + tl.arange(0, BLOCK)
            v = tl.load(ids_ptr + offs, mask=offs < p, other=-1)
            hit = (v == e).to(tl.int32)
            pos = run + tl.cumsum(hit, axis=0) - hit
            if PAD:
                tl.store(out_ptr + pos, offs.to(tl.int32), mask=hit != 0)
            else:
                tl.store(out_ptr + pos, offs.to(tl.int64), mask=hit != 0)
                tl.store(tok_ptr + pos, (offs // k).to(tl.int64), mask=hit != 0)
            run += tl.sum(hit, axis=0)
        end = start + mine
        tl.store(ends_ptr + e, end)
        if PAD:
            slot = run + tl.arange(0, BM)  # padding slots after this expert's pairs
            tl.store(out_ptr + slot, tl.full([BM], 0, tl.int32) + p, mask=slot < end)
            b0 = start // BM
            nb = mine // BM
            for j in range(0, nb, BLOCK):
                idx = j + tl.arange(0, BLOCK)
                tl.store(expert_ids_ptr + b0 + idx, tl.full([BLOCK], 0, tl.int32) + e, mask=idx < nb)
            if e == num_experts - 1:
                tl.store(npad_ptr, end)

    @triton.jit
    def _combine_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, h, s_y, s_o, K: tl.constexpr, HAS_W: tl.constexpr,
                        BLOCK_H: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = cols < h
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(inv_ptr + t * K + j).to(tl.int64)
            v = tl.load(y_ptr + row * s_y + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + t * K + j).to(tl.float32)
            acc += v
        tl.store(out_ptr + t * s_o + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fused_moe_kernel(
        a_ptr,
        a_scale_ptr,
        w_ptr,
        w_scale_ptr,
        out_ptr,
        rw_ptr,
        sorted_ids_ptr,
        expert_ids_ptr,
        num_padded_ptr,
        n_out,
        k_dim,
        num_pairs,
        s_am,
        s_we,
        s_wn,
        s_se,
        s_om,
        A_DIV: tl.constexpr,
        GATED: tl.constexpr,
        A_FP8: tl.constexpr,
        MUL_RW: tl.constexpr,
        EMULATE: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pair < num_pairs
        arow = tl.where(valid, pair // A_DIV, 0).to(tl.int64)
        e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < n_out
        rn_safe = tl.where(n_ok, rn, 0).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + arow[:, None] * s_am + rk[None, :]
        w_ptrs = w_ptr + e * s_we + rn_safe[None, :] * s_wn + rk[:, None]  # [BLOCK_K, BLOCK_N]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if GATED:
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            up_off = n_out * s_wn
        for k0 in range(0, k_dim, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
                w = tl.load(w_ptrs)
                if GATED:
                    wu = tl.load(w_ptrs + up_off)
            else:
                k_ok = (k0 + rk) < k_dim
                a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
                if GATED:
                    wu = tl.load(w_ptrs + up_off, mask=k_ok[:, None], other=0.0)
            if EMULATE:  # the interpreter's bf16 dot is broken: fp32
                af = a.to(tl.float32)
                acc += tl.dot(af, w.to(tl.float32), input_precision="ieee")
                if GATED:
                    acc_u += tl.dot(af, wu.to(tl.float32), input_precision="ieee")
            elif A_FP8:
                acc = tl.dot(a, w, acc)
                if GATED:
                    acc_u = tl.dot(a, wu, acc_u)
            else:
                acc = tl.dot(a, w.to(a.dtype), acc)
                if GATED:
                    acc_u = tl.dot(a, wu.to(a.dtype), acc_u)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        ws = tl.load(w_scale_ptr + e * s_se + rn_safe).to(tl.float32)
        acc = acc * ws[None, :]
        if A_FP8:
            a_s = tl.load(a_scale_ptr + arow, mask=valid, other=0.0)
            acc = acc * a_s[:, None]
        if GATED:
            wsu = tl.load(w_scale_ptr + e * s_se + n_out + rn_safe).to(tl.float32)
            acc_u = acc_u * wsu[None, :]
            if A_FP8:
                acc_u = acc_u * a_s[:, None]
            acc = acc * tl.sigmoid(acc) * acc_u
        if MUL_RW:
            rw = tl.load(rw_ptr + pair, mask=valid, other=0.0).to(tl.float32)
            acc = acc * rw[:, None]
        out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * s_om + rn[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


def moe_config(pairs: int, num_experts: int, n: int, k: int, *, a8: bool, gated: bool) -> dict[str, int]:
    """Block sizes by the average rows per expert; ``FASTFP8_MOE_CONFIG="BM,BN,BK,warps,stages"``
    overrides them."""
    env = os.environ.get("FASTFP8_MOE_CONFIG")
    if env:
        bm, bn, bk, nw, ns = (int(v) for v in env.split(","))
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
    avg = pairs / max(1, num_experts)
    bk = 128 if a8 else 64
    if avg <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif avg <= 64:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=bk, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=64 if gated else 128, BLOCK_K=bk, num_warps=4, num_stages=4 if a8 else 3)
    cfg["BLOCK_K"] = max(32 if a8 else 16, min(cfg["BLOCK_K"], triton.next_power_of_2(k)))  # fp8 dots: K >= 32
    return cfg


def _launch_moe(a, a_scale, w, w_scale, out, rw, sorted_ids, expert_ids, num_padded, *, a_div, gated, a8, cfg):
    n_out = out.shape[1]
    k_dim = w.shape[2]
    grid = (sorted_ids.numel() // cfg["BLOCK_M"], triton.cdiv(n_out, cfg["BLOCK_N"]))
    ws = w_scale.reshape(w_scale.shape[0], -1)
    switch = a.is_cuda and a.device.index != torch.cuda.current_device()
    with torch.cuda.device(a.device) if switch else contextlib.nullcontext():
        _fused_moe_kernel[grid](
            a, a_scale if a_scale is not None else ws, w, ws, out, rw if rw is not None else ws,
            sorted_ids, expert_ids, num_padded,
            n_out, k_dim, out.shape[0],
            a.stride(0), w.stride(0), w.stride(1), ws.stride(0), out.stride(0),
            A_DIV=a_div,
            GATED=gated,
            A_FP8=a8,
            MUL_RW=rw is not None,
            EMULATE=not a.is_cuda,
            EVEN_K=k_dim % cfg["BLOCK_K"] == 0,
            **cfg,
        )


@torch.no_grad()
def moe_triton(
    x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, *, weights_on_input=False, a8=False, configs=None
):
    """The Triton backend (see the module docstring). ``configs``: optional ``(stage1, stage2)``
    launch dicts (benchmark sweeps)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    t, h = x.shape
    k = topk_ids.shape[1]
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    p = t * k
    if p == 0:
        return torch.zeros((t, h), dtype=x.dtype, device=x.device)
    cfg1 = (configs or (None, None))[0] or moe_config(p, num_experts, inter, h, a8=a8, gated=True)
    cfg2 = (configs or (None, None))[1] or moe_config(p, num_experts, h, inter, a8=a8, gated=False)
    if w13.stride(2) != 1:
        w13 = w13.contiguous()
    if w2.stride(2) != 1:
        w2 = w2.contiguous()
    xin = _expert_inputs(x, topk_weights, weights_on_input)
    a, a_div = (xin, 1) if xin is not None else (x, k)
    if a.stride(1) != 1:
        a = a.contiguous()
    a_scale = None
    if a8:
        a, a_scale = triton_act_quant(a) if a.is_cuda else act_quant(a)
    sorted1, experts1, npad1 = align_tokens(topk_ids, num_experts, cfg1["BLOCK_M"])
    act = _empty((p, inter), x.dtype, x.device)
    _launch_moe(a, a_scale, w13, w13_scale, act, None, sorted1, experts1, npad1,
                a_div=a_div, gated=True, a8=a8, cfg=cfg1)
    act_scale = None
    if a8:
        act, act_scale = triton_act_quant(act) if act.is_cuda else act_quant(act)
    if cfg2["BLOCK_M"] == cfg1["BLOCK_M"]:
        sorted2, experts2, npad2 = sorted1, experts1, npad1
    else:
        sorted2, experts2, npad2 = align_tokens(topk_ids, num_experts, cfg2["BLOCK_M"])
    y = _empty((p, h), x.dtype, x.device)
    rw = None if weights_on_input else topk_weights.reshape(-1)
    if rw is not None and not rw.is_contiguous():
        rw = rw.contiguous()
    _launch_moe(act, act_scale, w2, w2_scale, y, rw, sorted2, experts2, npad2,
                a_div=1, gated=False, a8=a8, cfg=cfg2)
    return y.view(t, k, h).sum(dim=1) if k > 1 else y.view(t, h)


# ---------------------------------------------------------------------------------------
# torch._scaled_grouped_mm backend
# ---------------------------------------------------------------------------------------


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _cap(device: torch.device) -> tuple[int, int]:
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def grouped_supported(device: torch.device) -> bool:
    """``torch._scaled_grouped_mm`` exists and runs on ``device`` (sm90)."""
    return (
        device.type == "cuda"
        and torch.version.hip is None
        and hasattr(torch, "_scaled_grouped_mm")
        and _cap(device)[0] == 9
        and os.environ.get("FASTFP8_NO_GROUPED", "") != "1"
    )


@torch.no_grad()
def moe_grouped(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, *, weights_on_input=False):
    """W8A8 with ``torch._scaled_grouped_mm`` (see the module docstring)."""
    t = x.shape[0]
    k = topk_ids.shape[1]
    num_experts = w13.shape[0]
    order, tok, offs = sort_tokens(topk_ids, num_experts)
    xin = _expert_inputs(x, topk_weights, weights_on_input)
    if xin is not None:
        aq, sa = triton_act_quant(xin[order])
    else:  # quantize the T tokens once, then gather the k copies (fp8 bytes + scales)
        xq, xs = triton_act_quant(x)
        aq = xq.view(torch.uint8)[tok].view(FP8)
        sa = xs[tok]
    s13 = w13_scale.reshape(num_experts, -1).float()
    s2 = w2_scale.reshape(num_experts, -1).float()
    h13 = torch._scaled_grouped_mm(aq, w13.transpose(1, 2), sa.reshape(-1), s13, offs=offs,
                                   out_dtype=torch.bfloat16, use_fast_accum=GROUPED_FAST_ACCUM)
    act, sact = triton_act_quant(h13, gated=True)
    y = torch._scaled_grouped_mm(act, w2.transpose(1, 2), sact.reshape(-1), s2, offs=offs,
                                 out_dtype=torch.bfloat16, use_fast_accum=GROUPED_FAST_ACCUM)
    return _combine(y, order, topk_weights, t, k, weights_on_input, out_dtype=x.dtype)


# ---------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------


def pick_backend(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, hidden: int, inter: int) -> str:
    """``"auto"`` -> ``"triton"`` (W8A16) for small batches, ``"grouped"`` (sm90) or
    ``"triton_a8"`` (sm89) for large ones, ``"reference"`` off CUDA / before sm89 / without Triton."""
    if not x.is_cuda or triton is None or torch.version.hip is not None or _cap(x.device) < (8, 9):
        return "reference"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return "reference"
    pairs = topk_ids.numel()
    if pairs <= MOE_SMALL_PAIRS_PER_EXPERT * num_experts:
        return "triton"
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
