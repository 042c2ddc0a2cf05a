"""The Triton fused-MoE backend (vLLM's scheme): tokens sorted per expert and padded to the
block size, stage 1 computes the gate and up tiles together and writes ``silu(g) * u``,
stage 2 multiplies by ``w2`` and the routing weight. ``a8=False``: bf16 activations, fp8
weights widened in registers (W8A16, the decode case); ``a8=True``: per-token fp8
activations and fp8 tensor-core dots (W8A8, sm89+)."""

from __future__ import annotations

import contextlib
import os

import torch

from ..act_quant import act_quant, triton_act_quant
from ..common import cdiv, empty, next_power_of_2, tl, triton
from .routing import _expert_inputs
from .sort import align_tokens

__all__ = ["moe_config", "moe_triton"]


if triton is not None:

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
    cfg["BLOCK_K"] = max(32 if a8 else 16, min(cfg["BLOCK_K"], next_power_of_2(k)))  # fp8 dots: K >= 32
    return cfg


def _launch_moe(a, a_scale, w, w_scale, out, rw, sorted_ids, expert_ids, num_padded, *, a_div, gated, a8, cfg):
    n_out = out.shape[1]
    k_dim = w.shape[2]
    grid = (sorted_ids.numel() // cfg["BLOCK_M"], cdiv(n_out, cfg["BLOCK_N"]))
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
    act = empty((p, inter), x.dtype, x.device)
    _launch_moe(a, a_scale, w13, w13_scale, act, None, sorted1, experts1, npad1,
                a_div=a_div, gated=True, a8=a8, cfg=cfg1)
    act_scale = None
    if a8:
        act, act_scale = triton_act_quant(act) if act.is_cuda else act_quant(act)
    if cfg2["BLOCK_M"] == cfg1["BLOCK_M"]:
        sorted2, experts2, npad2 = sorted1, experts1, npad1
    else:
        sorted2, experts2, npad2 = align_tokens(topk_ids, num_experts, cfg2["BLOCK_M"])
    y = empty((p, h), x.dtype, x.device)
    rw = None if weights_on_input else topk_weights.reshape(-1)
    if rw is not None and not rw.is_contiguous():
        rw = rw.contiguous()
    _launch_moe(act, act_scale, w2, w2_scale, y, rw, sorted2, experts2, npad2,
                a_div=1, gated=False, a8=a8, cfg=cfg2)
    return y.view(t, k, h).sum(dim=1) if k > 1 else y.view(t, h)
