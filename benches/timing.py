"""GPU timing shared by the kernel benchmarks (``bench_modules``, ``tune_linear``, ``bench_quant``)
and the probes.

A benchmark makes several copies of a call's weights and inputs, together larger than L2
(:data:`ROTATE_BYTES`, or its own multiple of the L2 size), and hands :func:`timeit` one call
per copy, so that each call reads its operands from HBM. The SQNR check that precedes the
timing is :func:`fastfp8.kernels.common.sqnr` (the tests use it too).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

#: What the rotated copies of a call's operands should span together: > 2x the H100's 50 MB L2.
ROTATE_BYTES = 120 << 20


def timeit(fns: Sequence[Callable[[], Any]], *, rep_ms: int, graph: bool = True, warmup_ms: int = 25) -> float:
    """Median microseconds of one call (``triton.testing.do_bench``, ``warmup_ms`` and
    ``rep_ms`` its ``warmup`` and ``rep``); ``fns`` are the rotated calls, one per copy.

    ``graph``: ``fns`` run once on a side stream (compilation, allocator warm-up), are then
    captured back to back in one CUDA graph, and the graph's replay time is divided by
    ``len(fns)`` (GPU time, no launch overhead). Otherwise each timed call is the next of
    ``fns`` in turn, launched eagerly.
    """
    from triton.testing import do_bench

    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        ms = do_bench(g.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return ms * 1e3 / len(fns)
    i = [0]

    def call():
        fns[i[0] % len(fns)]()
        i[0] += 1

    return do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


def per_call_us(fn: Callable[[], Any], calls: int = 2000, warmup: int = 20) -> tuple[float, float]:
    """``(host, wall)`` microseconds per call of ``fn`` queued ``calls`` times back to back,
    no sync inside: the host's cost of queueing one (a launch's overhead floor), and the
    time until the GPU has run them all, per call. Where host >= wall, the host bounds it."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6
