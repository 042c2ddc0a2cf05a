"""Shared fixtures. Tests marked ``cuda`` are skipped where no CUDA GPU is present."""

from __future__ import annotations

import json
import os
import stat
import struct
import time
from pathlib import Path

import pytest
import torch


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a test replaced /dev/null with a regular file (a writer that renames a
    temporary file over its target does that): every later reader of /dev/null, rustc's
    target probe among them, would then read what was written to it."""
    if os.path.exists("/dev/null") and not stat.S_ISCHR(os.stat("/dev/null").st_mode):
        print("\nerror: a test replaced /dev/null with a regular file", flush=True)
        session.exitstatus = 1


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


# ---------------------------------------------------------------------------------------
# shared by the fault, concurrency, soak and stream tests


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def threads_back_to(base: int, timeout: float = 5.0) -> int:
    """The process's thread count once it is back to ``base``, or after ``timeout`` seconds:
    a joined thread's task can stay listed in ``/proc/self/task`` for a moment after
    ``join()`` returns (the kernel wakes the joiner before the task is gone), so a count
    taken at once can read one too many. A thread really left running stays counted."""
    deadline = time.monotonic() + timeout
    while native_threads() > base and time.monotonic() < deadline:
        time.sleep(0.01)
    return native_threads()


def reader_threads() -> int:
    """How many of the process's threads are the native readers (named ``fastfp8-read*``)."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += f.read().startswith("fastfp8-read")
        except OSError:  # a thread that just ended
            pass
    return n


def reader_threads_back_to(base: int, timeout: float = 1.0) -> int:
    """:func:`reader_threads` once it is back to ``base``, or after ``timeout`` seconds: as in
    :func:`threads_back_to`, a reader joined by ``close()`` can stay listed for a moment after
    the join returns; one really left running stays counted."""
    deadline = time.monotonic() + timeout
    while reader_threads() > base and time.monotonic() < deadline:
        time.sleep(0.005)
    return reader_threads()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def shard_tensors(s: int, gen: torch.Generator, rows=256, cols=512, n=6) -> dict[str, torch.Tensor]:
    """Shard ``s`` of :func:`make_model`: ``n`` bf16 weights ``[rows, cols]`` and a norm."""
    ts = {f"model.layers.{s}.mlp.p{j}.weight": torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
          for j in range(n)}
    ts[f"model.layers.{s}.norm.weight"] = torch.randn(cols, generator=gen).to(torch.bfloat16)
    return ts


def make_model(root: Path, shards=3, seed=0, **kw) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """A sharded bf16 checkpoint (with an index) of 2-D weights, which load_quantized
    quantizes, and norms; returns its tensors and its shard paths."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    src: dict[str, torch.Tensor] = {}
    paths, weight_map = [], {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        ts = shard_tensors(s, gen, **kw)
        save_file(ts, str(root / name))
        src.update(ts)
        weight_map.update(dict.fromkeys(ts, name))
        paths.append(root / name)
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return src, paths
