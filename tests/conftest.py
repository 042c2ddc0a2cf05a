"""Shared fixtures. Tests marked ``cuda`` are skipped where no CUDA GPU is present."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def write_raw(path: Path, header: dict | bytes | str, data: bytes = b"", *, length=None) -> Path:
    """Writes a safetensors-like file by hand: 8-byte length, header, data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


@pytest.fixture
def raw_file(tmp_path):
    def make(header, data=b"", *, name="x.safetensors", length=None):
        return write_raw(tmp_path / name, header, data, length=length)

    return make


def rand_tensor(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Random, never all-zero data of any dtype (bytes drawn at random, NaNs included)."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        return (raw % 2).to(torch.bool).reshape(shape)
    return raw.view(dtype).reshape(shape)
