"""The package's FP8 format, its one GPU capability check, and the integer arithmetic of the
kernels' launch geometry.

Torch only (no Triton, no kernels), so that the load path, the planner and the quantization
primitives share them with :mod:`fastfp8.kernels` without importing the kernels.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["FP8", "FP8_MAX", "capability", "cdiv", "fp8_supported", "next_power_of_2"]

#: The fp8 format of fastfp8's weights and activations (e4m3, no infinities, max 448).
FP8 = torch.float8_e4m3fn
#: Largest finite e4m3 value; the quantization range is [-448, 448].
FP8_MAX = 448.0


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


# The launch geometry in plain Python: ``triton.cdiv`` and ``triton.next_power_of_2`` are
# Triton constexpr functions, about 8 us a call from the host (2026-11-30, Triton 3.6 and
# 3.9), several per launch: most of an eager FP8 linear's host time beside Triton's own.


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers, ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << max(0, (n - 1).bit_length())
