"""Tensor-parallel slicing: which part of each tensor one rank reads and keeps.

Megatron-style, as vLLM shards Llama, Qwen3-MoE, Mixtral and Llama4:

- column-parallel (split the output dim, rows of ``[out, in]``): ``q_proj k_proj v_proj
  qkv_proj gate_proj up_proj gate_up_proj w1 w3`` (and their biases), and the fused experts'
  ``gate_up_proj`` (gate and up halves split separately, so each rank's ``w13`` is
  ``[gate slice; up slice]``);
- row-parallel (split the input dim, columns of ``[out, in]``): ``o_proj down_proj w2`` and
  the fused experts' ``down_proj``; the per-output-channel amax of a row-parallel weight spans
  all ranks, so it is all-reduced (MAX) before the scale is taken, and every rank's bytes
  equal the matching slice of the one-GPU result;
- vocabulary-parallel (rows): ``embed_tokens`` and ``lm_head``;
- everything else (norms, routers, biases of row-parallel layers) is replicated.

A dimension of size ``n`` splits into ``ceil(n / size)`` per rank, the last rank taking
what is left. Column-parallel slices are one contiguous read; row-parallel slices are one
strided read per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

COLUMN = frozenset({"q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj", "w1", "w3"})
ROW = frozenset({"o_proj", "down_proj", "w2"})
VOCAB = frozenset({"embed_tokens", "lm_head"})


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group."""

    rank: int
    size: int
    group: Any = None  # a torch.distributed process group (None: the default group)

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is not in [0, {self.size})")

    def span(self, n: int) -> tuple[int, int]:
        """This rank's ``[start, stop)`` of a dimension of size ``n``."""
        per = -(-n // self.size)
        start = min(n, self.rank * per)
        return start, min(n, start + per)


def split_of(name: str, ndim: int) -> str | None:
    """``"column"``, ``"row"``, ``"vocab"`` or None (replicated) for tensor ``name``."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] == "experts" and ndim == 3:
        return {"gate_up_proj": "fused_column", "down_proj": "fused_row"}.get(parts[-1])
    if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
        return None
    module = parts[-2]
    if module in VOCAB and parts[-1] == "weight" and ndim == 2:
        return "vocab"
    if module in COLUMN:
        return "column"
    if module in ROW and parts[-1] == "weight" and ndim == 2:
        return "row"
    return None


def resolve(tp_rank: int | None, tp_size: int | None, process_group: Any) -> TensorParallel | None:
    """The caller's arguments, completed from torch.distributed where left out."""
    if tp_rank is None and tp_size is None and process_group is None:
        return None
    if tp_rank is None or tp_size is None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("tp_rank and tp_size are needed when torch.distributed is not initialized")
        tp_rank = dist.get_rank(process_group) if tp_rank is None else tp_rank
        tp_size = dist.get_world_size(process_group) if tp_size is None else tp_size
    tp = TensorParallel(tp_rank, tp_size, process_group)
    return None if tp.size == 1 else tp
