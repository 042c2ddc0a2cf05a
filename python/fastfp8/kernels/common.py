"""What every kernel module shares: the FP8 dtype, the optional Triton import and the one
GPU capability check of the package."""

from __future__ import annotations

import functools

import torch

#: The fp8 format of fastfp8's weights and activations (e4m3, no infinities, max 448).
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the torch references do everything
    triton = None
    tl = None

__all__ = ["FP8", "FP8_MAX", "capability", "fp8_supported", "tl", "triton"]


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` of a CUDA ``device`` (cached per index); ``(0, 0)`` for other devices
    and for ROCm."""
    if device.type != "cuda" or torch.version.hip is not None:
        return (0, 0)
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def fp8_supported(device: torch.device) -> bool:
    """fp8 conversions and tensor-core dots on ``device``: NVIDIA sm89+ (Ada, Hopper, Blackwell)."""
    return capability(device) >= (8, 9)


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
