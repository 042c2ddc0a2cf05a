"""fastfp8: load bf16 safetensors checkpoints straight into FP8 on the GPU.

Public API (everything else, ``fastfp8._native`` included, is private):

- :func:`open_checkpoint` -> :class:`Checkpoint`: validated headers, ``get``, ``stream``.
- The exceptions in :mod:`fastfp8.errors`, all subclasses of :class:`Error`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .checkpoint import Checkpoint, Slot, TensorInfo, TensorStream, open_checkpoint
from .errors import (
    BudgetError,
    CancelledError,
    CheckpointError,
    CheckpointNotFoundError,
    Error,
    HeaderError,
    NonFiniteWeightError,
    ReadError,
    SlotReleasedError,
    UnsupportedDtypeError,
)

try:
    __version__ = version("fastfp8")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

__all__ = [
    "BudgetError",
    "CancelledError",
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "Error",
    "HeaderError",
    "NonFiniteWeightError",
    "ReadError",
    "Slot",
    "SlotReleasedError",
    "TensorInfo",
    "TensorStream",
    "UnsupportedDtypeError",
    "__version__",
    "open_checkpoint",
]
