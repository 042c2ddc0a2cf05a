"""Small-batch (decode) FP8 linear: ``y = x @ (w * scale).T + bias`` for ``M`` up to
:data:`MAX_ROWS` rows, as a Triton kernel that streams the fp8 weight once at HBM speed.

Weight-only FP8 (W8A16): the fp8 weight ``[N, K]`` is widened in registers (exactly: every
e4m3 value is a bf16/fp16 value) and multiplied with the bf16/fp16 activations, fp32
accumulation, then one per-output-channel scale and the bias in the epilogue. At these
sizes the work is bound by reading the weight, so skipping the activation quantization
costs nothing and is more accurate than the W8A8 ``torch._scaled_mm`` path.

Each program owns ``BLOCK_N`` output channels and walks the whole ``K`` in ``BLOCK_K``
steps (rows of the weight are contiguous, so every load is a run of ``BLOCK_K`` bytes).
``M == 1`` accumulates elementwise products in a ``[BLOCK_N, BLOCK_K]`` fp32 tile and
reduces once at the end; ``M > 1`` pads the rows to 16, 32, 64 or 128 and uses ``tl.dot``
(one kernel, no activation quantization: where the weight's bytes bound the time, this beats
the two-kernel W8A8 paths up to a few dozen rows; the selection table measures where). The
weight tile is the dot's first operand (``W @ x.T``): on Hopper the wgmma's A operand may
come from registers, where the weight is widened by :func:`.common.widen`, while the
activations go to shared memory as they are; the other way round the widened weight made a
trip back through shared memory.

Split-K (``SPLIT_K > 1``, for narrow weights whose ``N / BLOCK_N`` programs would leave SMs
idle): the programs of one column block divide the K tiles among them and store fp32
partials; the last one to arrive (an arrival counter per column block) adds the partials in
split order, applies the scale and bias and resets the counter. Still one launch, and the
result is the same bits whoever arrives last. The counters: :mod:`.splitk`.

Under ``TRITON_INTERPRET=1`` (CPU tensors) the dot runs in fp32 (the interpreter's bf16
dot is broken); on a GPU it runs in the activation dtype.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from . import common, splitk
from .common import cdiv, next_power_of_2, tl, triton, widen
from .linear_table import GEMV_MAX_ROWS as MAX_ROWS

__all__ = ["MAX_ROWS", "block_m", "config_of", "fp8_gemv", "fp8_gemv_reference", "gemv_config"]


def block_m(m: int, use_dot: bool) -> int:
    """Rows per program: 1 for the elementwise variant, else ``M`` padded to 16, 32, 64 or 128."""
    return max(16, next_power_of_2(m)) if use_dot else 1


@torch.no_grad()
def fp8_gemv_reference(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 reference: ``(x.float() @ weight.float().T) * scale.T + bias``, cast to ``x.dtype``."""
    y = x.float() @ weight.float().t()
    y = y * scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


if triton is not None:

    @triton.jit
    def _fp8_gemv_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        b_ptr,
        y_ptr,
        p_ptr,
        c_ptr,
        M,
        N,
        K,
        sx_m,
        sw_n,
        sy_m,
        HAS_BIAS: tl.constexpr,
        USE_DOT: tl.constexpr,
        EMULATE: tl.constexpr,
        EVEN_K: tl.constexpr,
        INT64: tl.constexpr,
        SPLIT_K: tl.constexpr,
        LOAD_STAGES: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        m_ok = rm < M
        rn_safe = tl.where(n_ok, rn, 0)  # clamp rows instead of masking: loads stay unpredicated
        if INT64:
            rn_safe = rn_safe.to(tl.int64)
        if SPLIT_K == 1:
            k_lo = 0
            k_hi = K
        else:  # this program's share of the K tiles
            per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
            k_lo = tl.program_id(1) * per
            k_hi = tl.minimum(k_lo + per, K)
        w_ptrs = w_ptr + rn_safe[:, None] * sw_n + (k_lo + rk)[None, :]
        x_ptrs = x_ptr + rm[:, None] * sx_m + (k_lo + rk)[None, :]
        if USE_DOT:  # the weight is the dot's first operand (from registers, widened there)
            acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        # LOAD_STAGES > 1: the weight tiles arrive through a ring of that many shared-memory
        # buffers by asynchronous copies (Triton pipelines a loop's loads only where they feed
        # a dot, or where the loop asks for it); 1: each step loads straight into registers
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOAD_STAGES):
            if EVEN_K:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            else:
                k_ok = (k0 + rk) < K
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if USE_DOT:
                if EMULATE:
                    acc_t += tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
                else:
                    acc_t = tl.dot(widen(w, x), tl.trans(x), acc_t)
            else:
                acc2 += w.to(tl.float32) * x.to(tl.float32)  # [BLOCK_N, BLOCK_K] * [1, BLOCK_K]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if USE_DOT:  # noqa: SIM108 (a constexpr branch: each side's tensor exists only there)
            acc = tl.trans(acc_t)
        else:
            acc = tl.sum(acc2, axis=1)[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K > 1:
            # Each split stores its partial sums; the last of this column block's splits to
            # arrive (the counter, released by every split and acquired by the last) adds
            # them in split order, so the result does not depend on the arrival order, and
            # sets the counter back to zero for the next launch.
            part = rm[:, None] * N + rn[None, :]
            tl.store(p_ptr + tl.program_id(1) * M * N + part, acc, mask=mask)
            arrived = tl.atomic_add(c_ptr + pid, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for sk in range(SPLIT_K):
                    acc += tl.load(p_ptr + sk * M * N + part, mask=mask, other=0.0, cache_modifier=".cg")
                scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
                acc = acc * scale[None, :]
                if HAS_BIAS:
                    acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + rm[:, None] * sy_m + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(c_ptr + pid, 0)
        else:
            scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            acc = acc * scale[None, :]
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rm[:, None] * sy_m + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemv_config(m: int, n: int, k: int, num_sms: int = 132) -> dict[str, int | bool]:
    """Launch parameters (from an H100 sweep, ``benches/bench_modules.py --only probe``):
    M == 1: the widest ``BLOCK_N`` in {64, 32, 16, 8} that still gives >= 4 programs per SM,
    8 KiB of weight per step; M > 1: 32 x 256 tiles (16 x 256 for narrow N); no split-K.
    ``FASTFP8_GEMV_CONFIG="BLOCK_N,BLOCK_K,num_warps,num_stages[,SPLIT_K[,LOAD_STAGES]]"`` overrides
    them."""
    use_dot = m > 1
    env = os.environ.get("FASTFP8_GEMV_CONFIG")
    if env:
        return config_of([int(v) for v in env.split(",")], m)
    kp = next_power_of_2(max(k, 1))
    if use_dot:
        bn = 32 if cdiv(n, 32) >= num_sms // 2 else 16
        return dict(BLOCK_N=bn, BLOCK_K=max(32, min(256, kp)), num_warps=4, num_stages=3, USE_DOT=True)
    bn = 64
    while bn > 8 and cdiv(n, bn) < 4 * num_sms:
        bn //= 2
    bk = max(32, min(8192 // bn, 1024, kp))
    return dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=3, USE_DOT=False)


def config_of(cfg, m: int) -> dict[str, int | bool]:
    """A selection-table config ``[BLOCK_N, BLOCK_K, num_warps, num_stages(, SPLIT_K(,
    LOAD_STAGES))]`` as launch parameters for ``M`` rows (the dot variant, ``M > 1``, needs 16
    columns; ``LOAD_STAGES``, default 1, is the M == 1 loop's ring of asynchronous weight
    copies: 1 loads each tile straight into registers)."""
    if len(cfg) not in (4, 5, 6):
        raise ValueError("a GEMV config is [BLOCK_N, BLOCK_K, num_warps, num_stages(, SPLIT_K(, LOAD_STAGES))], "
                         f"got {cfg}")
    bn, bk, nw, ns, *rest = cfg
    out: dict[str, int | bool] = dict(BLOCK_N=max(bn, 16) if m > 1 else bn, BLOCK_K=bk, num_warps=nw,
                                      num_stages=ns, USE_DOT=m > 1)
    if rest and rest[0] > 1:
        out["SPLIT_K"] = rest[0]
    if len(rest) > 1 and rest[1] > 1:
        out["LOAD_STAGES"] = rest[1]
    return out


@torch.no_grad()
def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    fresh_counters: bool = False,
) -> torch.Tensor:
    """``x [M, K]`` (bf16/fp16, ``M <= MAX_ROWS``) times the fp8 ``weight [N, K]`` with per-channel
    ``scale`` (``N`` values: ``[N, 1]`` or ``[1, N]``, any float dtype), plus ``bias [N]``.
    Returns ``[M, N]`` in ``x.dtype`` (written into ``out`` when given).

    ``fresh_counters``: a split-K launch counts its arrivals in zeros made for the call
    instead of the stream's persistent counters (what torch.compile's CUDA graphs need; see
    :mod:`.splitk`)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    m, k = x.shape
    weight, scale = common.fp8_weight(weight, scale, k)
    n = weight.shape[0]
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"fp8_gemv takes bf16/fp16 activations, got {x.dtype}")
    if m > MAX_ROWS:
        raise ValueError(f"fp8_gemv serves at most {MAX_ROWS} rows, got {m}")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = out if out is not None else common.empty((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        y.copy_(bias.to(y.dtype).expand(m, n) if bias is not None else torch.zeros_like(y))
        return y
    sms = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device()) if x.is_cuda else 132
    cfg = dict(config) if config else gemv_config(m, n, k, sms)
    use_dot = cfg.pop("USE_DOT", m > 1)
    split = int(cfg.pop("SPLIT_K", 1))
    load_stages = int(cfg.pop("LOAD_STAGES", 1))
    if use_dot:  # the dot variant's loads feed the dot: num_stages pipelines them
        load_stages = cfg["num_stages"]
    bm = block_m(m, use_dot)
    if not use_dot and m != 1:
        raise ValueError("the elementwise (no-dot) variant serves M == 1 only")
    if split < 1 or split * m * n >= 2**31:
        raise ValueError(f"SPLIT_K={split} is out of range for {m} x {n}")
    int64 = n * weight.stride(0) + cfg["BLOCK_K"] >= 2**31 - 1
    grid = (cdiv(n, cfg["BLOCK_N"]), split)
    switch = x.is_cuda and x.device.index != torch.cuda.current_device()
    with torch.cuda.device(x.device) if switch else contextlib.nullcontext():
        if split > 1:
            partials = common.empty((split, m, n), torch.float32, x.device)
            counters = splitk.for_launch(x.device, grid[0], fresh_counters)
        else:
            partials = counters = y  # unused
        _fp8_gemv_kernel[grid](
            x, weight, scale, bias if bias is not None else scale, y, partials, counters,
            m, n, k, x.stride(0), weight.stride(0), y.stride(0),
            HAS_BIAS=bias is not None,
            USE_DOT=use_dot,
            EMULATE=not x.is_cuda,
            EVEN_K=k % cfg["BLOCK_K"] == 0,
            INT64=int64,
            SPLIT_K=split,
            LOAD_STAGES=load_stages,
            BLOCK_M=bm,
            **cfg,
        )
    return y
