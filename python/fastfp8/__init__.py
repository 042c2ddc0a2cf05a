"""fastfp8: load bf16 safetensors checkpoints straight into FP8 on the GPU.

Public API (everything else, ``fastfp8._native`` included, is private):

- :func:`load_quantized`: a bf16 checkpoint -> FP8 e4m3 per-channel weights + scales on
  the device, streamed (the bf16 model is never on the GPU); :class:`LoadOptions`, every
  knob of a load in one place.
- :func:`open_checkpoint` -> :class:`Checkpoint`: validated headers, ``get``, ``stream``.
- :func:`quantize_channelwise`: the FP8 quantization primitive (Triton on CUDA, torch
  elsewhere), byte-identical to compressed-tensors.
- :class:`Fp8Linear`, :class:`Fp8MoE`: modules that run the result;
  :func:`build_quantized_model` / :func:`quantize_model`: a transformers model (Llama,
  Qwen3-MoE, Mixtral, Llama4 text) built on the meta device with them in place, its
  weights streamed straight in.
- The exceptions in :mod:`fastfp8.errors`, all subclasses of :class:`Error`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from .errors import (
    BudgetError,
    CancelledError,
    CheckpointError,
    CheckpointNotFoundError,
    Error,
    HeaderError,
    LayoutError,
    NonFiniteWeightError,
    ReadError,
    ReleaseError,
    SlotReleasedError,
    UnsupportedDtypeError,
)

if TYPE_CHECKING:
    from .checkpoint import Checkpoint, Slot, TensorInfo, TensorStream, open_checkpoint
    from .layouts import DEFAULT_IGNORE
    from .loader import LoadStats, QuantizedState, load_quantized
    from .model import build_quantized_model, quantize_model
    from .modules import Fp8Linear, Fp8MoE
    from .options import LoadOptions
    from .quant import quantize_channelwise

# The names that need torch are imported on first use (PEP 562), so that ``fastfp8 --help``
# and ``import fastfp8.cli`` do not pay the seconds torch takes to import.
_LAZY = {
    "Checkpoint": "checkpoint", "Slot": "checkpoint", "TensorInfo": "checkpoint", "TensorStream": "checkpoint",
    "open_checkpoint": "checkpoint",
    "LoadStats": "loader", "QuantizedState": "loader", "load_quantized": "loader",
    "build_quantized_model": "model", "quantize_model": "model",
    "Fp8Linear": "modules", "Fp8MoE": "modules",
    "quantize_channelwise": "quant",
    "DEFAULT_IGNORE": "layouts", "LoadOptions": "options",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastfp8' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


try:
    __version__ = version("fastfp8")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

__all__ = [
    "DEFAULT_IGNORE",
    "BudgetError",
    "CancelledError",
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "Error",
    "Fp8Linear",
    "Fp8MoE",
    "HeaderError",
    "LayoutError",
    "LoadOptions",
    "LoadStats",
    "NonFiniteWeightError",
    "QuantizedState",
    "ReadError",
    "ReleaseError",
    "Slot",
    "SlotReleasedError",
    "TensorInfo",
    "TensorStream",
    "UnsupportedDtypeError",
    "__version__",
    "build_quantized_model",
    "load_quantized",
    "open_checkpoint",
    "quantize_channelwise",
    "quantize_model",
]
