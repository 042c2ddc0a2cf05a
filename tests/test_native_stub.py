"""The native module's stub (``python/fastfp8/_native.pyi``) matches the built module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_stubtest_passes():
    pytest.importorskip("mypy.stubtest")
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", "fastfp8._native"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_the_package_is_typed():
    import fastfp8

    pkg = Path(fastfp8.__file__).parent
    assert (pkg / "py.typed").is_file()
    assert (pkg / "_native.pyi").is_file()


def test_native_rows_are_named():
    """checkpoint.py reads attributes, not positions; the shapes the engine consumes stay."""
    from fastfp8 import _native

    assert {"path", "size", "data_start"} <= set(dir(_native.ShardInfo))
    assert {"name", "dtype", "shape", "shard", "begin", "end"} <= set(dir(_native.TensorEntry))
    assert {"budget", "peak_in_flight", "bytes_read", "threads"} <= set(dir(_native.ReaderStats))
