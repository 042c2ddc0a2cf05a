"""Cold loads: ``method="direct"`` (``O_DIRECT`` reads through aligned per-thread buffers)
gives the bytes of the page-cache paths, and ``method="auto"`` picks it when the
checkpoint is not in the page cache."""

from __future__ import annotations

import os

import fastfp8
import pytest
import torch
from fastfp8.engine import resolve_method
from fastfp8.options import LoadOptions
from safetensors.torch import save_file
from test_host_quant import llama, load, same_state


def evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


@pytest.mark.parametrize("quantize_on", ["host", "device"])
def test_direct_reads_give_the_same_bytes(tmp_path, quantize_on):
    llama(tmp_path / "m")
    a, _ = load(tmp_path / "m", "cpu", method="mmap", quantize_on=quantize_on)
    for kw in ({}, {"memory_budget": "64KiB", "chunk_bytes": "3000", "piece_bytes": "5000", "threads": 3}):
        evict(tmp_path.glob("m/*.safetensors"))
        b, stats = load(tmp_path / "m", "cpu", method="direct", **kw)
        assert stats.method == "direct"
        same_state(a, b)


def test_direct_stream_of_odd_sizes_and_offsets(tmp_path):
    gen = torch.Generator().manual_seed(1)
    t = {f"t{i}": torch.randint(0, 255, (n,), generator=gen, dtype=torch.uint8)
         for i, n in enumerate([1, 4095, 4096, 4097, 12345, 1 << 20, 3, 8191])}
    save_file(t, str(tmp_path / "x.safetensors"))
    evict([tmp_path / "x.safetensors"])
    with fastfp8.Checkpoint(tmp_path / "x.safetensors") as ck:
        got = {n: v.clone() for n, v in ck.stream(method="direct", memory_budget="2MiB")}
    assert got.keys() == t.keys()
    for n in t:
        assert torch.equal(got[n], t[n]), n


def test_auto_reads_cold_checkpoints_directly(tmp_path):
    llama(tmp_path / "m")
    files = list(tmp_path.glob("m/*.safetensors"))
    opts = LoadOptions.make()
    assert opts.method == "auto"
    with fastfp8.Checkpoint(tmp_path / "m") as ck:
        evict(files)
        if ck._native.cached_fraction() >= 0.5:
            pytest.skip("this file system keeps the pages cached after POSIX_FADV_DONTNEED")
        assert resolve_method(ck, opts) == ("direct", 32)
        assert resolve_method(ck, opts.replace(threads=4)) == ("direct", 4)
        warm(files)
        assert ck._native.cached_fraction() > 0.9
        assert resolve_method(ck, opts) == ("mmap", None)
        assert resolve_method(ck, opts.replace(method="pread")) == ("pread", None)
