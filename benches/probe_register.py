"""Probe: can the GPU's DMA read a checkpoint straight out of the page cache, with no CPU copy?

A warm load today copies every byte from the page cache into a pinned ring (the reader
threads), then the DMA reads the ring: on the H200 machine the copy, not the bus, sets the
pace (``benches/results/load_h200.json``: 44 GB/s, against 54.8 for a pinned copy). If the
page-cache pages of a read-only file mapping can be page-locked and registered with CUDA
(``cudaHostRegister(..., cudaHostRegisterReadOnly)``) fast enough, the copy disappears.
This measures, on a warm shard (one process, no fastfp8 code):

- ``register_gbps``: ``cudaHostRegister`` of consecutive windows of the mapping (bytes
  registered per second, the pages already cached), and ``unregister_gbps``;
- ``dma_gbps``: ``copy_(non_blocking=True)`` from the registered windows to the GPU;
- ``pipelined_gbps``: a whole shard window by window, registering window i + 1 on a thread
  while window i is copied, each window unregistered once its copy is done;
- the error, where the driver refuses (some kernels refuse long-term pins of file pages).

    python benches/probe_register.py SHARD.safetensors [--window 64MiB] [--out probe_register.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import sys
import threading
import time
import warnings

import numpy as np
import torch

REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly
PAGE = mmap.PAGESIZE


def parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for u, m in units.items():
        if text.endswith(u):
            return int(text[: -len(u)]) * m
    return int(text)


class Registered:
    """cudaHostRegister / cudaHostUnregister of host ranges through torch's cudart binding."""

    def __init__(self, flags: int = REGISTER_READ_ONLY) -> None:
        self.rt = torch.cuda.cudart()
        self.flags = flags

    def register(self, ptr: int, n: int) -> None:
        err = self.rt.cudaHostRegister(ptr, n, self.flags)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister({n} bytes, flags={self.flags}) failed: {err}")

    def unregister(self, ptr: int) -> None:
        err = self.rt.cudaHostUnregister(ptr)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostUnregister failed: {err}")


def probe(path: str, window: int) -> dict:
    out: dict = {"path": path, "window": window}
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size // PAGE * PAGE  # whole pages (the tail is not needed to probe)
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    os.close(fd)
    host = np.frombuffer(mm, dtype=np.uint8)
    base = host.ctypes.data
    with warnings.catch_warnings():  # read-only numpy: torch warns; nothing writes here
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(host)
    windows = [(o, min(window, size - o)) for o in range(0, size, window)]
    out["bytes"] = size
    dst = torch.empty(window, dtype=torch.uint8, device="cuda")
    reg = Registered()
    with open(path, "rb") as f:  # warm the page cache
        while f.read(64 << 20):
            pass

    # 1. register, copy, unregister, each timed alone over the whole file
    t = time.perf_counter()
    for o, n in windows:
        reg.register(base + o, n)
    out["register_gbps"] = size / (time.perf_counter() - t) / 1e9
    out["registered_is_pinned"] = bool(src[:PAGE].is_pinned())
    torch.cuda.synchronize()
    t = time.perf_counter()
    for o, n in windows:
        dst[:n].copy_(src[o : o + n], non_blocking=True)
    torch.cuda.synchronize()
    out["dma_gbps"] = size / (time.perf_counter() - t) / 1e9
    check = torch.empty(n, dtype=torch.uint8)
    check.copy_(dst[:n])
    out["bytes_match"] = bool(torch.equal(check, src[o : o + n]))
    t = time.perf_counter()
    for o, _ in windows:
        reg.unregister(base + o)
    out["unregister_gbps"] = size / (time.perf_counter() - t) / 1e9

    # 2. pipelined: a thread registers ahead (two windows at most), the copies follow
    ready: list[threading.Semaphore] = [threading.Semaphore(0) for _ in windows]
    room = threading.Semaphore(2)
    errors: list[BaseException] = []

    def registrar() -> None:
        try:
            for i, (o, n) in enumerate(windows):
                room.acquire()
                reg.register(base + o, n)
                ready[i].release()
        except BaseException as e:  # reported, and the copier stops
            errors.append(e)
            for s in ready:
                s.release()

    bufs = [torch.empty(window, dtype=torch.uint8, device="cuda") for _ in range(2)]
    torch.cuda.synchronize()
    t = time.perf_counter()
    th = threading.Thread(target=registrar)
    th.start()
    events: list[tuple[torch.cuda.Event, int]] = []
    for i, (o, n) in enumerate(windows):
        ready[i].acquire()
        if errors:
            break
        bufs[i % 2][:n].copy_(src[o : o + n], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        events.append((ev, o))
        if len(events) >= 2:
            done, off = events.pop(0)
            done.synchronize()
            reg.unregister(base + off)
            room.release()
    for done, off in events:
        done.synchronize()
        reg.unregister(base + off)
        room.release()
    th.join()
    if errors:
        raise errors[0]
    out["pipelined_gbps"] = size / (time.perf_counter() - t) / 1e9
    del src, host
    with contextlib.suppress(BufferError):  # a view still alive: the mapping goes with the process
        mm.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shard")
    ap.add_argument("--window", default="64MiB")
    ap.add_argument("--out", default="probe_register.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        res = probe(args.shard, parse_size(args.window))
    except Exception as e:  # the answer may be "the driver refuses": that is a result
        res = {"path": args.shard, "error": f"{type(e).__name__}: {e}"}
    res["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(res, indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
