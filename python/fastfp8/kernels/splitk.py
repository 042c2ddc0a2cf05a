"""Arrival counters of the split-K kernels (the GEMV and the tiled GEMMs).

A split-K launch divides each output tile's K among ``SPLIT_K`` programs; each stores its
fp32 partial and counts its arrival in the tile's counter, and the last one to arrive adds the
partials in split order (the same bits whoever arrives last), applies the epilogue, stores
the output and sets the counter back to zero. One launch: no zeroed buffer before it, no cast
after it.

The counters live per device and stream, zero between launches: launches on one stream never
overlap, so they can share them, and a CUDA graph captured on that stream keeps using the
same ones. Retired (too small) buffers stay alive, since a captured graph may still point at
them. Under torch.compile's CUDA graphs (cudagraph trees) such a buffer, made while they warm
up or record, is a live allocation in their pool that they refuse; there a call takes
:func:`fresh`: zeros of its own, freed with the call (one fill kernel in the graph).
"""

from __future__ import annotations

import torch

__all__ = ["COUNTERS", "counters", "for_launch", "fresh"]

COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` int32 counters, zero, for launches on ``device``'s current stream."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    c = COUNTERS.get(key)
    if c is None or c.numel() < n:
        if c is not None:
            _RETIRED.append(c)
        c = torch.zeros(max(n, 8192), dtype=torch.int32, device=device)
        COUNTERS[key] = c
    return c


def fresh(device: torch.device, n: int) -> torch.Tensor:
    """``n`` int32 zeros of the call's own (inside torch.compile's CUDA graphs)."""
    return torch.zeros(n, dtype=torch.int32, device=device)


def for_launch(device: torch.device, n: int, fresh_counters: bool) -> torch.Tensor:
    """The counters a split-K launch of ``n`` tiles takes (see the module's text)."""
    return (fresh if fresh_counters else counters)(device, n)
