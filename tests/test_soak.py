"""Soak: consecutive load-and-quantize cycles of a small checkpoint in one process (200 by
default, ``FASTFP8_SOAK_CYCLES`` to change). RSS, the staging pool, native threads and, on
CUDA, pinned and GPU memory must stay flat between cycle 20 (after warm-up) and the last.
Run with ``-s`` to see the figures."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import conftest
import fastfp8
import pytest
import torch
from conftest import native_threads, rss
from fastfp8.pinned import POOL

CYCLES = int(os.environ.get("FASTFP8_SOAK_CYCLES", "200"))
WARM = 20
MiB = 1 << 20


def make_model(root: Path) -> int:
    """About 4.6 MiB of bf16 in 3 shards; returns its size."""
    src, _ = conftest.make_model(root)
    return sum(t.numel() * t.element_size() for t in src.values())


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].cpu().view(-1).view(torch.uint8), b[k].cpu().view(-1).view(torch.uint8)) for k in a)


def sample(extra=None) -> dict:
    gc.collect()
    s = {"rss": rss(), "threads": native_threads(), "pool": POOL.stats()}
    if extra:
        s.update(extra())
    return s


def soak(root: Path, device: str, extra=None) -> tuple[dict, dict, float]:
    samples: dict[int, dict] = {}
    gc.collect()
    live_before = POOL.stats()["live"]
    t0 = time.perf_counter()
    # Back-to-back loads that keep their staging buffer (POOL.retain()): nothing may grow,
    # not even the pool's allocations; after the block the buffer is given back.
    with POOL.retain():
        _cycles(root, device, extra, samples)
    gc.collect()
    assert POOL.stats()["live"] == live_before and POOL.stats()["idle"] == 0, POOL.stats()
    return samples[WARM], samples[CYCLES], time.perf_counter() - t0


def _cycles(root: Path, device: str, extra, samples: dict) -> None:
    first = None
    for i in range(1, CYCLES + 1):
        method = "mmap" if i % 2 else "pread"  # both read paths, alternately
        state = fastfp8.load_quantized(root, device=device, memory_budget="1MiB", chunk_bytes="128KiB",
                                       method=method)
        if first is None:
            first = {k: v.cpu().clone() for k, v in state.items()}
        elif i == CYCLES:
            assert same(state, first), "the last cycle's result differs from the first's"
        del state
        if i in (WARM, CYCLES):
            samples[i] = sample(extra)


def report(title: str, nbytes: int, a: dict, b: dict, seconds: float) -> str:
    lines = [f"\n{title}: {CYCLES} cycles of {nbytes / MiB:.1f} MiB in {seconds:.1f} s "
             f"({seconds / CYCLES * 1e3:.1f} ms each)",
             f"  RSS        cycle {WARM}: {a['rss'] / MiB:.1f} MiB, cycle {CYCLES}: {b['rss'] / MiB:.1f} MiB "
             f"({(b['rss'] - a['rss']) / MiB:+.2f} MiB)",
             f"  threads    {a['threads']} -> {b['threads']}",
             f"  pool       live {a['pool']['live'] / MiB:.0f} -> {b['pool']['live'] / MiB:.0f} MiB, "
             f"in use {a['pool']['in_use'] / MiB:.0f} -> {b['pool']['in_use'] / MiB:.0f} MiB, "
             f"allocated in total {a['pool']['allocated'] / MiB:.0f} -> {b['pool']['allocated'] / MiB:.0f} MiB"]
    for key in ("cuda_allocated", "cuda_reserved", "host_pinned"):
        if key in a:
            lines.append(f"  {key:<10} {a[key] / MiB:.1f} -> {b[key] / MiB:.1f} MiB")
    return "\n".join(lines)


def check_flat(a: dict, b: dict) -> None:
    assert b["rss"] - a["rss"] < 16 * MiB, (a["rss"], b["rss"])
    assert b["threads"] == a["threads"]
    for key in ("live", "in_use", "allocated"):
        assert b["pool"][key] == a["pool"][key], (key, a["pool"], b["pool"])


def test_soak_cpu(tmp_path):
    nbytes = make_model(tmp_path / "m")
    a, b, seconds = soak(tmp_path / "m", "cpu")
    print(report("soak, cpu", nbytes, a, b, seconds))
    check_flat(a, b)


def _cuda_figures() -> dict:
    torch.cuda.synchronize()
    out = {"cuda_allocated": torch.cuda.memory_allocated(), "cuda_reserved": torch.cuda.memory_reserved()}
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is not None:
        out["host_pinned"] = stats().get("allocated_bytes.current", stats().get("allocated_bytes", 0))
    return out


@pytest.mark.cuda
def test_soak_cuda(tmp_path):
    nbytes = make_model(tmp_path / "m")
    a, b, seconds = soak(tmp_path / "m", "cuda", _cuda_figures)
    print(report("soak, cuda", nbytes, a, b, seconds))
    check_flat(a, b)
    assert b["cuda_allocated"] == a["cuda_allocated"]
    assert b["cuda_reserved"] - a["cuda_reserved"] <= 20 * MiB  # at most one more cached segment
    if "host_pinned" in a:
        assert b["host_pinned"] == a["host_pinned"]
