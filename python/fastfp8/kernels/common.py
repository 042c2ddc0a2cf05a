"""What every kernel module shares: the FP8 dtype and the capability check (from
:mod:`fastfp8.fp8`), the optional Triton import, and what the tests and benchmarks check the
kernels with: the poisoned allocations and :func:`sqnr`."""

from __future__ import annotations

import torch

from ..fp8 import FP8, FP8_MAX, capability, cdiv, fp8_supported, next_power_of_2

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the torch references do everything
    triton = None
    tl = None

__all__ = ["FP8", "FP8_MAX", "capability", "cdiv", "fp8_supported", "next_power_of_2", "tl", "triton", "widen"]


#: Tests set this: kernel outputs and intermediate buffers are filled with NaN (fp8: 0x7F)
#: when allocated, so that an element a kernel fails to write shows up in the result.
POISON = False


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, poisoned when :data:`POISON` is set."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON and dtype == FP8:
        t.view(torch.uint8).fill_(0x7F)
    elif POISON and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def fp8_weight(w: torch.Tensor, scale: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight operand of the FP8 kernels, checked: an fp8 ``w [N, k]`` with unit column
    stride (copied otherwise) and its ``N`` per-channel scales as a flat contiguous tensor
    (any float dtype: the caller converts where its kernel needs fp32)."""
    if w.dtype != FP8 or w.dim() != 2 or w.shape[1] != k:
        raise ValueError(f"the weight must be float8_e4m3fn [N, {k}], got {w.dtype} {tuple(w.shape)}")
    if w.stride(1) != 1:
        w = w.contiguous()
    s = scale.reshape(-1)
    if s.numel() != w.shape[0]:
        raise ValueError(f"the weight scale must hold {w.shape[0]} values (one per output channel), "
                         f"got {s.numel()}")
    return w, s.contiguous()


def sqnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` in dB, in float64: NaN
    when ``out`` has a non-finite element, infinite when it equals ``ref``. (Not in
    ``__all__``: a helper of the tests and ``benches/``, not an entry point.)"""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    err = (out - ref).pow(2).sum()
    return float("inf") if err == 0 else float(10 * torch.log10(ref.pow(2).sum() / err))


if triton is not None:
    #: e4m3 -> bf16 for four bytes at a time (one 32-bit register in, two out): each byte's
    #: sign to bit 15 and its exponent and significand, shifted, to bits 4 - 13 of a bf16 lane
    #: give the value times 2^-120 (subnormals included: a zero exponent field stays one), and
    #: one bf16x2 fma by 2^120 (0x7B80; -0.0 added keeps the signs of zeros) makes it exact.
    #: Integer and fp16x2 ALU work where Triton's own conversion goes through fp16 with a
    #: ``cvt`` per element (the W8A16 kernels' weight conversion was their bottleneck).
    _E4M3_TO_BF16 = tl.constexpr("""
    {
    .reg .b32 t0, t1, s0, s1, z, c;
    prmt.b32 t0, $2, 0, 0x1404;
    prmt.b32 t1, $2, 0, 0x3424;
    shr.b32 s0, t0, 4;
    shr.b32 s1, t1, 4;
    and.b32 t0, t0, 0x80008000;
    and.b32 t1, t1, 0x80008000;
    and.b32 s0, s0, 0x07F007F0;
    and.b32 s1, s1, 0x07F007F0;
    or.b32 t0, t0, s0;
    or.b32 t1, t1, s1;
    mov.b32 z, 0x80008000;
    mov.b32 c, 0x7B807B80;
    fma.rn.bf16x2 $0, t0, c, z;
    fma.rn.bf16x2 $1, t1, c, z;
    }
    """)

    @triton.jit
    def widen(w, like):
        """The fp8 e4m3 tensor ``w`` in ``like``'s dtype (bf16 or fp16), exactly (GPU only:
        inline PTX for bf16). e4m3's NaN bytes (0x7f, 0xff), which the quantizer does not
        write for finite weights (loads refuse non-finite ones unless told otherwise), read
        as +-480 on the bf16 path."""
        if like.dtype == tl.bfloat16:
            return tl.inline_asm_elementwise(_E4M3_TO_BF16, "=r,=r,r", [w.to(tl.uint8, bitcast=True)],
                                             dtype=tl.bfloat16, is_pure=True, pack=4)
        else:
            return w.to(like.dtype)
else:
    widen = None
