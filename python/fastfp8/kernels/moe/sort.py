"""Tokens sorted per expert, without host synchronization: a two-launch Triton counting sort
on CUDA (torch elsewhere), the block-padded layout of the fused-MoE kernel
(:func:`align_tokens`) and the weighted combination of the sorted expert outputs."""

from __future__ import annotations

import contextlib
import os

import torch

from ..common import cdiv, empty, next_power_of_2, tl, triton

__all__ = ["align_tokens", "align_tokens_torch", "sort_tokens", "sort_tokens_torch"]


def _counts(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    # scatter_add instead of bincount: bincount synchronizes to size its output
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def sort_tokens(topk_ids: torch.Tensor, num_experts: int, *, with_inverse: bool = False) -> tuple[torch.Tensor, ...]:
    """``(order, token_of_sorted_pair, offs)``: pair indices (``t * k + slot``) sorted by
    expert (stable), their tokens, and int32 cumulative END offsets per expert (what
    ``torch._grouped_mm`` / ``torch._scaled_grouped_mm`` take); ``with_inverse``: and a
    fourth, each pair's sorted position (int64, ``inv[order] = arange``). A two-launch
    Triton counting sort on CUDA (:func:`_sort_triton`), torch elsewhere
    (:func:`sort_tokens_torch`)."""
    if _use_triton_sort(topk_ids):
        try:
            order, tok, offs, _, _, inv = _sort_triton(topk_ids, num_experts, 1, pad=False)
            return (order, tok, offs, inv) if with_inverse else (order, tok, offs)
        except Exception as e:  # a Triton problem must not take the MoE down: torch instead
            _triton_sort_failed(e)
    order, tok, offs = sort_tokens_torch(topk_ids, num_experts)
    return (order, tok, offs, _inverse(order)) if with_inverse else (order, tok, offs)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


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
            sorted_ids, _, _, expert_ids, npad, _ = _sort_triton(topk_ids, num_experts, block_m, pad=True)
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
#: the most segments the pairs are split into (programs per expert in the sort's two launches;
#: ``FASTFP8_SORT_SEGMENTS`` for probes)
_SEGMENTS_MAX = int(os.environ.get("FASTFP8_SORT_SEGMENTS", "8"))


def _use_triton_sort(topk_ids: torch.Tensor) -> bool:
    return _TRITON_SORT and topk_ids.is_cuda and triton is not None and topk_ids.numel() > 0


def _triton_sort_failed(e: Exception) -> None:
    global _TRITON_SORT
    _TRITON_SORT = False
    import warnings

    warnings.warn(f"fastfp8: the Triton token sort failed ({type(e).__name__}: {e}); using torch from now on",
                  stacklevel=3)


def _sort_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int, *, pad: bool):
    """Counting sort by expert in two launches (a program per expert and segment of the
    pairs: count, then place after the counts of the expert's earlier segments, with a
    running prefix inside the segment), stable and deterministic. Returns ``(ids, tok, ends,
    expert_ids, num_padded, inv)``: with ``pad`` the :func:`align_tokens` layout (``ids``
    int32 padded, ``expert_ids``, ``num_padded``), else :func:`sort_tokens`' (``ids`` = order
    int64, ``tok`` int64, ``ends`` int32 END offsets, ``inv`` each pair's sorted position)."""
    flat = topk_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    p = flat.numel()
    dev = flat.device
    k = topk_ids.shape[-1] if topk_ids.dim() > 1 else 1
    block = min(1024, max(16, next_power_of_2(p)))
    # segments of the pairs, each counted and placed by its own program per expert (one
    # program walking all the pairs took 49 us at 32768 pairs on an H200)
    seg = max(block, cdiv(cdiv(p, _SEGMENTS_MAX), block) * block)
    nseg = cdiv(p, seg)
    counts = torch.empty((num_experts, nseg), dtype=torch.int32, device=dev)
    ends = torch.empty(num_experts, dtype=torch.int32, device=dev)
    switch = dev.index != torch.cuda.current_device() if flat.is_cuda else False
    with torch.cuda.device(dev) if switch else contextlib.nullcontext():
        _count_kernel[(num_experts, nseg)](flat, counts, p, seg, NSEG=nseg, BLOCK=block, num_warps=4)
        if pad:
            size = _align_size(p, num_experts, block_m)
            ids = torch.empty(size, dtype=torch.int32, device=dev)
            tok = inv = ids  # unused
            expert_ids = torch.empty(size // block_m, dtype=torch.int32, device=dev)
            npad = torch.empty(1, dtype=torch.int32, device=dev)
        else:
            ids = torch.empty(p, dtype=torch.int64, device=dev)
            tok = torch.empty(p, dtype=torch.int64, device=dev)
            inv = torch.empty(p, dtype=torch.int64, device=dev)
            expert_ids = npad = ends  # unused
        _place_kernel[(num_experts, nseg)](
            flat, counts, ids, tok, inv, expert_ids, ends, npad, p, num_experts, k, seg,
            PAD=pad, BM=block_m, NSEG=nseg, BLOCK=block, BLOCK_E=max(16, next_power_of_2(num_experts)),
            BLOCK_S=max(2, next_power_of_2(nseg)), num_warps=4)
    if pad:
        return ids, None, ends, expert_ids, npad, None
    return ids, tok, ends, None, None, inv


def _combine(y, order, topk_weights, t, k, weights_on_input, out_dtype=None, inv=None):
    """Sorted expert outputs ``y [P, H]`` -> ``[T, H]``: ``out[t] = sum_j w[t, j] * y[row of
    (t, j)]`` in fp32 (``w = 1`` with ``weights_on_input``). One Triton kernel on CUDA
    (reads ``y`` once), torch elsewhere. ``inv``: the sort's inverse, when it has it."""
    out_dtype = out_dtype or y.dtype
    h = y.shape[1]
    if y.is_cuda and triton is not None and t * k:
        if inv is None:
            inv = _inverse(order)
        w = topk_weights.reshape(-1)
        if not w.is_contiguous():
            w = w.contiguous()
        out = empty((t, h), out_dtype, y.device)
        block_h = min(1024, next_power_of_2(max(h, 16)))
        _combine_kernel[(t, cdiv(h, block_h))](
            y, inv, w, out, h, y.stride(0), out.stride(0),
            K=k, HAS_W=not weights_on_input, BLOCK_H=block_h, num_warps=4)
        return out
    yf = y.float()
    if not weights_on_input:
        yf = yf * topk_weights.reshape(-1)[order].float().unsqueeze(1)
    out = torch.zeros((t * k, h), dtype=torch.float32, device=y.device)
    out.index_copy_(0, order, yf)
    return out.view(t, k, h).sum(dim=1).to(out_dtype)


if triton is not None:

    @triton.jit
    def _count_kernel(ids_ptr, counts_ptr, p, seg, NSEG: tl.constexpr, BLOCK: tl.constexpr):
        """``counts[e, s]``: the pairs of expert ``e`` in segment ``s`` (``seg`` pairs)."""
        e = tl.program_id(0)
        s = tl.program_id(1)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        hi = tl.minimum(s * seg + seg, p)
        for p0 in range(s * seg, hi, BLOCK):
            offs = p0 + tl.arange(0, BLOCK)
            v = tl.load(ids_ptr + offs, mask=offs < hi, other=-1)
            acc += (v == e).to(tl.int32)
        tl.store(counts_ptr + e * NSEG + s, tl.sum(acc, axis=0))

    @triton.jit
    def _place_kernel(ids_ptr, counts_ptr, out_ptr, tok_ptr, inv_ptr, expert_ids_ptr, ends_ptr, npad_ptr, p,
                      num_experts, k,
                      seg, PAD: tl.constexpr, BM: tl.constexpr, NSEG: tl.constexpr, BLOCK: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr):
        """Program ``(e, s)`` places expert ``e``'s pairs of segment ``s`` after those of the
        earlier segments; the last segment's program also writes the expert's end, its
        padding and its blocks' expert ids."""
        e = tl.program_id(0)
        s = tl.program_id(1)
        re = tl.arange(0, BLOCK_E)
        rs = tl.arange(0, BLOCK_S)
        cs = tl.load(counts_ptr + re[:, None] * NSEG + rs[None, :],
                     mask=(re[:, None] < num_experts) & (rs[None, :] < NSEG), other=0)
        c = tl.sum(cs, axis=1)  # per expert
        before = tl.sum(tl.sum(tl.where((re[:, None] == e) & (rs[None, :] < s), cs, 0), axis=1), axis=0)
        if PAD:
            c = (c + BM - 1) // BM * BM
        start = tl.sum(tl.where(re < e, c, 0), axis=0)
        mine = tl.sum(tl.where(re == e, c, 0), axis=0)  # this expert's (padded) run
        run = start + before
        hi = tl.minimum(s * seg + seg, p)
        for p0 in range(s * seg, hi, BLOCK):
            offs = p0 + tl.arange(0, BLOCK)
            v = tl.load(ids_ptr + offs, mask=offs < hi, other=-1)
            hit = (v == e).to(tl.int32)
            pos = run + tl.cumsum(hit, axis=0) - hit
            if PAD:
                tl.store(out_ptr + pos, offs.to(tl.int32), mask=hit != 0)
            else:
                tl.store(out_ptr + pos, offs.to(tl.int64), mask=hit != 0)
                tl.store(tok_ptr + pos, (offs // k).to(tl.int64), mask=hit != 0)
                tl.store(inv_ptr + offs, pos.to(tl.int64), mask=hit != 0)
            run += tl.sum(hit, axis=0)
        end = start + mine
        if s == NSEG - 1:
            tl.store(ends_ptr + e, end)
        if PAD and s == NSEG - 1:
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
