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


def all_reduce_absmax(absmax: Any, group: Any = None) -> None:
    """All-reduces (MAX, in place) per-row absolute maxima over ``group``. The maxima are
    non-negative, so their float32 bit patterns, sign bit cleared and read as int32, order
    like the values, and a NaN (pattern above +inf's) wins: a NaN in one rank's part of a
    row reaches every rank, which a float MAX does not promise."""
    import torch
    import torch.distributed as dist

    bits = absmax.float().view(torch.int32)
    bits.bitwise_and_(0x7FFFFFFF)  # a NaN from torch's ops may carry a sign bit
    dist.all_reduce(bits, op=dist.ReduceOp.MAX, group=group)
    if bits.data_ptr() != absmax.data_ptr():
        absmax.copy_(bits.view(torch.float32))


def heads_span(heads: int, head_dim: int, tp: TensorParallel) -> tuple[int, int]:
    """This rank's rows of a key/value projection of ``heads`` heads (vLLM's
    QKVParallelLinear): whole heads, each replicated over ``size // heads`` ranks when the
    ranks outnumber them."""
    if tp.size <= heads:
        per = heads // tp.size
        return tp.rank * per * head_dim, (tp.rank + 1) * per * head_dim
    h = tp.rank // (tp.size // heads)
    return h * head_dim, (h + 1) * head_dim


def rank_slice(split: Any, name: str, full: Any, tp: TensorParallel) -> Any:
    """The part of ``full`` (output ``name`` of a one-process load, weight or ``_scale``)
    that rank ``tp`` holds after a tensor-parallel load, for a
    :class:`fastfp8.layouts.Split` (None: replicated). What the benchmarks and tests
    compare each rank's bytes with."""
    kind = split.kind if split is not None else None
    is_scale = name.endswith("_scale")
    if kind in ("column", "vocab"):
        a, b = tp.span(full.shape[0])
        return full[a:b]
    if kind == "heads":
        a, b = heads_span(split.heads, split.head_dim, tp)
        return full[a:b]
    if kind == "halves":
        half = full.shape[0] // 2
        a, b = tp.span(half)
        import torch

        return torch.cat([full[a:b], full[half + a : half + b]])
    if kind == "row":
        if is_scale or full.dim() < 2:
            return full
        a, b = tp.span(full.shape[1])
        return full[:, a:b]
    if kind == "experts_column":  # [E, 2I, H]: gate rows then up rows, each split
        import torch

        half = full.shape[1] // 2
        a, b = tp.span(half)
        return torch.cat([full[:, a:b], full[:, half + a : half + b]], dim=1)
    if kind == "experts_row":  # [E, H, I]: the input dim; scales are whole
        if is_scale:
            return full
        a, b = tp.span(full.shape[2])
        return full[:, :, a:b]
    if kind is None:
        return full
    raise ValueError(f"{name}: no slice rule for split {kind!r}")
