"""The package's FP8 format and its one GPU capability check.

Torch only (no Triton, no kernels), so that the load path, the planner and the quantization
primitives share them with :mod:`fastfp8.kernels` without importing the kernels.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["FP8", "FP8_MAX", "capability", "fp8_supported"]

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
