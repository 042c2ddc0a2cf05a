"""compressed-tensors itself as the oracle: the channel-strategy FP8 weight quantization
of llm-compressor's FP8_DYNAMIC, computed with compressed-tensors' own functions."""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import quantize
from compressed_tensors.quantization.utils import calculate_qparams

CHANNEL_FP8 = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)


def ct_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 [..., out, in], scale [..., out, 1])`` exactly as compressed-tensors makes
    them on ``weight``'s device (min/max over the input dim, as its min-max observer)."""
    mins = weight.amin(dim=-1, keepdim=True)
    maxs = weight.amax(dim=-1, keepdim=True)
    scale, _ = calculate_qparams(mins, maxs, CHANNEL_FP8)
    q = quantize(weight, scale, None, CHANNEL_FP8, dtype=torch.float8_e4m3fn)
    return q, scale


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte-for-byte equality (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a = a.detach().cpu().contiguous().reshape(-1)
    b = b.detach().cpu().contiguous().reshape(-1)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
