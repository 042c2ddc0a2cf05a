"""``method="direct"`` (``O_DIRECT`` reads through aligned per-thread buffers) gives the
bytes of the page-cache paths, on cold files, at any offsets and sizes."""

from __future__ import annotations

import fastfp8
import pytest
import torch
from fastfp8.bench import evict_page_cache as evict
from fastfp8.engine import DIRECT_THREADS, reader_threads
from fastfp8.options import LoadOptions
from safetensors.torch import save_file
from test_host_quant import llama, load, same_state


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


def test_direct_reads_are_deep_by_default():
    assert reader_threads(LoadOptions.make(method="direct")) == DIRECT_THREADS
    assert reader_threads(LoadOptions.make(method="direct", threads=4)) == 4
    assert reader_threads(LoadOptions.make()) is None  # the native default
    assert LoadOptions.make().method == "auto"  # resolved per load: tests/test_read_method.py
