"""Tensor parallelism: this process's place in the group. How each tensor splits is the
model layout's business (:class:`fastfp8.layouts.Split`, applied in :mod:`fastfp8.plan`).

A dimension of size ``n`` splits into ``ceil(n / size)`` per rank, the last rank taking
what is left (key/value heads split in whole heads, replicated when the ranks outnumber
them, as vLLM does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
