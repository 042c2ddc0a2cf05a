"""W8A8 FP8 GEMM with per-token and per-channel scales in the epilogue (Triton, Hopper first).

``y = (a_q [M, K] * a_scale [M, 1]) @ (w [N, K] * w_scale [N, 1]).T + bias``, fp8 e4m3
operands, fp32 accumulation, the two scales and the bias applied once per output tile,
stored in ``out_dtype`` (bf16 by default). ``a_q``/``a_scale`` come from the fused per-token
activation quantization (:func:`fastfp8.kernels.act_quant.triton_act_quant`); ``w`` is the
per-output-channel weight, row-major, so both operands are K-major as fp8 ``wgmma`` wants.

Two kernels (the selection table, :mod:`fastfp8.kernels.linear_table`, says which one and
which tile for a shape), and a W8A16 variant of the first:

- ``"tile"``: one program per output tile (grouped ordering for L2 reuse), pointer loads
  that Triton pipelines (``num_stages``), optional split-K (``SPLIT_K > 1``: each split stores
  its scaled fp32 partial, the last to arrive adds them in split order, the bias and the cast
  in the same launch; :mod:`.splitk`). The small and mid-M case, where the grid would
  otherwise be too small to fill the GPU.
- ``"tma"``: persistent (one program per SM walking the tiles), operands through TMA
  descriptors (host-side ``TensorDescriptor``), the large-M case.
- ``"w16"`` (:func:`w16_gemm`): the ``"tile"`` kernel on the bf16/fp16 activations
  themselves, the fp8 weight widened in registers: no activation quantization kernel, for
  the mid-M shapes where that second kernel costs more than the fp8 dot saves.

Under ``TRITON_INTERPRET=1`` (CPU tensors) the ``"tile"`` kernel widens the operands to fp32
(the interpreter has no fp8 dot); ``"tma"`` is GPU only.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from . import common, splitk
from .common import FP8, cdiv, tl, triton, widen

__all__ = ["GemmConfig", "default_config", "fp8_gemm", "fp8_gemm_reference", "tma_supported", "w16_gemm"]


@torch.no_grad()
def fp8_gemm_reference(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """fp32 reference: ``(a_q.float() @ w.float().T) * a_scale * w_scale.T + bias``."""
    y = a_q.float() @ w.float().t()
    y = y * a_scale.float().reshape(-1, 1) * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


#: ``(kernel, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K, num_warps, num_stages)``
GemmConfig = tuple[str, int, int, int, int, int, int, int]


if triton is not None:

    @triton.jit
    def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """This program's output tile in grouped order (``GROUP_M`` row blocks walk the column
        blocks together, for L2 reuse): its rows and columns, their in-range masks, and
        int64 copies clamped to row/column 0 so that loads stay unpredicated."""
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_pid_n
        first_m = (pid // in_group) * GROUP_M
        size_m = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % in_group) % size_m)
        pid_n = (pid % in_group) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        rm_s = tl.where(m_ok, rm, 0).to(tl.int64)
        rn_s = tl.where(n_ok, rn, 0).to(tl.int64)
        return rm, rn, m_ok, n_ok, rm_s, rn_s

    @triton.jit
    def _fp8_gemm_tile_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, p_ptr, cnt_ptr,
        M, N, K, s_am, s_bn, s_cm,
        HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        EMULATE: tl.constexpr,
        A16: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """``A16``: ``a`` holds the bf16/fp16 activations themselves (W8A16, ``"w16"``): the
        fp8 weight tile is widened to their dtype in registers (exact, :func:`.common.widen`)
        and is the dot's first operand (``W @ a.T``, which Hopper's wgmma takes from registers;
        as the second it went back through shared memory); no activation scale (``as_ptr``
        is not read)."""
        pid_k = tl.program_id(1)
        rm, rn, m_ok, n_ok, rm_s, rn_s = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm_s[:, None] * s_am + rk[None, :]
        b_ptrs = b_ptr + rn_s[None, :] * s_bn + rk[:, None]  # [BLOCK_K, BLOCK_N], K-major
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if A16:  # W8A16 on a GPU: (W @ a.T).T, the widened weight the dot's register operand
            acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_ok = (k0 - pid_k * BLOCK_K + rk) < K
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            if EMULATE:
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            elif A16:
                acc_t = tl.dot(widen(tl.trans(b), a), tl.trans(a), acc_t)
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * SPLIT_K
            b_ptrs += BLOCK_K * SPLIT_K
        if A16 and not EMULATE:
            acc = tl.trans(acc_t)
        sb = tl.load(bs_ptr + rn, mask=n_ok, other=0.0)
        if A16:
            acc = acc * sb[None, :]
        else:
            sa = tl.load(as_ptr + rm, mask=m_ok, other=0.0)
            acc = acc * sa[:, None] * sb[None, :]
        c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * s_cm + rn[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K > 1:
            # Each split stores its scaled partial; the last of this tile's splits to arrive
            # (the counter, released by every split and acquired by the last) adds them in
            # split order, so the bits do not depend on the arrival order, finishes the tile
            # and sets the counter back to zero for the next launch (kernels/splitk.py).
            part = rm_s[:, None] * N + rn[None, :]
            tl.store(p_ptr + pid_k * M * N + part, acc, mask=mask)
            arrived = tl.atomic_add(cnt_ptr + tl.program_id(0), 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for sk in range(SPLIT_K):
                    acc += tl.load(p_ptr + sk * M * N + part, mask=mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tl.program_id(0), 0)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fp8_gemm_tma_kernel(
        a_desc, b_desc, c_desc, as_ptr, bs_ptr, bias_ptr,
        M, N, K,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        NUM_SMS: tl.constexpr,
    ):
        start = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        num_tiles = num_pid_m * num_pid_n
        in_group = GROUP_M * num_pid_n
        for tile in tl.range(start, num_tiles, NUM_SMS):
            first_m = (tile // in_group) * GROUP_M
            size_m = min(num_pid_m - first_m, GROUP_M)
            pid_m = first_m + ((tile % in_group) % size_m)
            pid_n = (tile % in_group) // size_m
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for ki in range(k_tiles):
                a = a_desc.load([off_m, ki * BLOCK_K])
                b = b_desc.load([off_n, ki * BLOCK_K])
                acc = tl.dot(a, b.T, acc)
            rm = off_m + tl.arange(0, BLOCK_M)
            rn = off_n + tl.arange(0, BLOCK_N)
            sa = tl.load(as_ptr + rm, mask=rm < M, other=0.0)
            sb = tl.load(bs_ptr + rn, mask=rn < N, other=0.0)
            acc = acc * sa[:, None] * sb[None, :]
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


def default_config(m: int, n: int, k: int, kernel: str = "tile") -> GemmConfig:
    """A reasonable tile for ``M`` rows where the selection table names none (Hopper-sized:
    at most 64 KiB of operands per pipeline stage)."""
    if kernel == "w16":  # bf16 activations: twice the bytes of an fp8 A tile, and B widened
        return ("w16", 16, 64, 128, 8, 1, 4, 4) if m <= 16 else \
            ("w16", 64, 64, 128, 8, 1, 4, 4) if m <= 64 else ("w16", 128, 128, 64, 8, 1, 8, 3)
    if kernel == "tma":
        return ("tma", 128, 128, 128, 8, 1, 8, 3) if m > 64 else ("tma", 64, 128, 128, 8, 1, 4, 4)
    if m <= 16:
        return ("tile", 16, 64, 128, 8, 1, 4, 4)
    if m <= 64:
        return ("tile", 64, 64, 128, 8, 1, 4, 4)
    return ("tile", 128, 128, 128, 8, 1, 8, 3)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _tensor_descriptor():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def tma_supported(device: torch.device) -> bool:
    """The ``"tma"`` kernel runs on ``device`` (sm90+, a Triton with host tensor descriptors)."""
    from .common import capability

    return device.type == "cuda" and triton is not None and _tensor_descriptor() is not None \
        and capability(device) >= (9, 0)


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@torch.no_grad()
def fp8_gemm(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: GemmConfig,
    out_dtype: torch.dtype = torch.bfloat16,
    fresh_counters: bool = False,
) -> torch.Tensor:
    """``a_q [M, K]`` fp8 (row stride any, unit column stride) with fp32 ``a_scale`` (``M``
    values) times the fp8 ``w [N, K]`` with ``w_scale`` (``N`` values, fp32), plus ``bias [N]``.
    Returns ``[M, N]`` in ``out_dtype``. ``config``: a :data:`GemmConfig`. ``fresh_counters``:
    a split-K launch counts its arrivals in zeros of the call's own (torch.compile's CUDA
    graphs; :mod:`.splitk`)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    m, k = a_q.shape
    if a_q.dtype != FP8:
        raise ValueError(f"a_q [M, K] must be float8_e4m3fn, got {a_q.dtype} {tuple(a_q.shape)}")
    w, sb = common.fp8_weight(w, w_scale, k)
    n = w.shape[0]
    kernel, bm, bn, bk, gm, _, nw, ns = config
    if a_q.stride(1) != 1:
        a_q = a_q.contiguous()
    sa = a_scale.reshape(-1)
    if sa.numel() != m:
        raise ValueError(f"a_scale must hold {m} values (one per row), got {sa.numel()}")
    sa = sa.float().contiguous()
    sb = sb.float()
    if m == 0 or n == 0 or k == 0:
        y = torch.zeros((m, n), dtype=out_dtype, device=a_q.device)
        return y + bias.to(out_dtype) if bias is not None and m else y
    switch = a_q.is_cuda and a_q.device.index != torch.cuda.current_device()
    with torch.cuda.device(a_q.device) if switch else contextlib.nullcontext():
        if kernel == "tma":
            return _launch_tma(a_q, sa, w, sb, bias, out_dtype, bm, bn, bk, gm, nw, ns)
        if kernel != "tile":
            raise ValueError(f"unknown GEMM kernel {kernel!r}")
        return _launch_tile(a_q, sa, w, sb, bias, out_dtype, config, a16=False, fresh_counters=fresh_counters)


@torch.no_grad()
def w16_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: GemmConfig,
    fresh_counters: bool = False,
) -> torch.Tensor:
    """W8A16: ``x [M, K]`` bf16/fp16 (row stride any, unit column stride) times the fp8
    ``w [N, K]`` widened to ``x``'s dtype in registers (exact: every e4m3 value is one of
    theirs), fp32 accumulation, ``w_scale`` (``N`` values) and ``bias [N]`` in the epilogue.
    No activation quantization: one kernel, and the activations keep their precision.
    Returns ``[M, N]`` in ``x.dtype``. ``config``: a :data:`GemmConfig` of kernel ``"w16"``
    (the ``"tile"`` kernel's shape: tiles, split-K, warps, stages). ``fresh_counters``: as
    :func:`fp8_gemm`'s."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x [M, K] must be bf16 or fp16, got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    w, sb = common.fp8_weight(w, w_scale, k)
    n = w.shape[0]
    if config[0] != "w16":
        raise ValueError(f"a W8A16 config names kernel 'w16', got {config[0]!r}")
    if x.stride(1) != 1:
        x = x.contiguous()
    sb = sb.float()
    if m == 0 or n == 0 or k == 0:
        y = torch.zeros((m, n), dtype=x.dtype, device=x.device)
        return y + bias.to(x.dtype) if bias is not None and m else y
    switch = x.is_cuda and x.device.index != torch.cuda.current_device()
    with torch.cuda.device(x.device) if switch else contextlib.nullcontext():
        return _launch_tile(x, sb, w, sb, bias, x.dtype, config, a16=True, fresh_counters=fresh_counters)


def _launch_tile(a, sa, w, sb, bias, out_dtype, config, *, a16: bool, fresh_counters: bool) -> torch.Tensor:
    """The ``"tile"`` kernel on checked operands (``a16``: ``a`` is bf16/fp16, ``sa`` unused)."""
    _, bm, bn, bk, gm, split, nw, ns = config
    m, k = a.shape
    n = w.shape[0]
    if split < 1 or split * m * n >= 2**31:
        raise ValueError(f"SPLIT_K={split} is out of range for {m} x {n}")
    c = common.empty((m, n), out_dtype, a.device)
    grid = (cdiv(m, bm) * cdiv(n, bn), split)
    if split > 1:
        partials = common.empty((split, m, n), torch.float32, a.device)
        counters = splitk.for_launch(a.device, grid[0], fresh_counters)
    else:
        partials = counters = c  # unused
    _fp8_gemm_tile_kernel[grid](
        a, w, c, sa, sb, bias if bias is not None else sb, partials, counters,
        m, n, k, a.stride(0), w.stride(0), c.stride(0),
        HAS_BIAS=bias is not None,
        SPLIT_K=split,
        EVEN_K=k % (bk * split) == 0,
        EMULATE=not a.is_cuda,
        A16=a16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
        num_warps=nw, num_stages=ns,
    )
    return c


def _launch_tma(a_q, sa, w, sb, bias, out_dtype, bm, bn, bk, gm, nw, ns):
    desc = _tensor_descriptor()
    if desc is None:
        raise RuntimeError("this Triton has no host tensor descriptors")
    m, k = a_q.shape
    n = w.shape[0]
    if (a_q.stride(0) * a_q.element_size()) % 16 or (w.stride(0) % 16) or (n * torch.finfo(out_dtype).bits // 8) % 16:
        raise ValueError("the TMA kernel needs 16-byte aligned row strides (K and N multiples of 16 / 8)")
    c = common.empty((m, n), out_dtype, a_q.device)
    a_d = desc.from_tensor(a_q, [bm, bk])
    b_d = desc.from_tensor(w, [bn, bk])
    c_d = desc.from_tensor(c, [bm, bn])
    sms = _num_sms(_device_index(a_q))
    tiles = cdiv(m, bm) * cdiv(n, bn)
    grid = (min(sms, tiles),)
    _fp8_gemm_tma_kernel[grid](
        a_d, b_d, c_d, sa, sb, bias if bias is not None else sb, m, n, k,
        HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, NUM_SMS=sms,
        num_warps=nw, num_stages=ns,
    )
    return c
