"""Cold reads of a checkpoint's files in different orders: does the disk give more to
readers spread over the files than to readers walking them in order?

fastfp8's reader threads take the plan's pieces in order (16 threads on neighbouring 4 MiB
pieces); runai-model-streamer gives each of its 16 threads a contiguous sixteenth of the
bytes, read sequentially in 2 MiB reads. This reads the same files each way, the page cache
evicted before every pass, round robin, and reports GB/s per pattern:

- ``inorder_pread``: 16 threads, 4 MiB pieces in file order from one queue, ``pread``;
- ``inorder_mmap``: the same through a mapping, ``MADV_POPULATE_READ`` per piece (what a
  cold fastfp8 load does);
- ``striped_pread``: 16 threads, each its own contiguous sixteenth, 2 MiB ``pread`` in order;
- ``striped_mmap``: the same through a mapping, 4 MiB ``MADV_POPULATE_READ`` steps.

    python benches/probe_disk_order.py CKPT_DIR --rounds 2 --out probe_disk_order.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import threading
import time
from pathlib import Path

from fastfp8.bench import evict_page_cache

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MADV_POPULATE_READ = 22
MADV_DONTNEED = 4
PAGE = mmap.PAGESIZE
PATTERNS = ("inorder_pread", "inorder_mmap", "striped_pread", "striped_mmap")


def _pieces(files, piece):
    return [(i, off, min(piece, size - off)) for i, (_, size) in enumerate(files) for off in range(0, size, piece)]


def _stripes(files, n):
    """n contiguous ranges of the files' bytes laid end to end, as (file, offset, length) lists."""
    total = sum(s for _, s in files)
    per = -(-total // n)
    out, cur = [], []
    room = per
    for i, (_, size) in enumerate(files):
        off = 0
        while off < size:
            take = min(room, size - off)
            cur.append((i, off, take))
            off += take
            room -= take
            if room == 0:
                out.append(cur)
                cur, room = [], per
    if cur:
        out.append(cur)
    return out


def run_pattern(name, files, threads):
    fds = [os.open(p, os.O_RDONLY) for p, _ in files]
    maps = []
    if name.endswith("mmap"):
        for fd, (_, size) in zip(fds, files, strict=True):
            addr = LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), "mmap failed")
            maps.append((addr, size))

    local = threading.local()

    def touch(i, off, n):
        if maps:
            start = (maps[i][0] + off) & ~(PAGE - 1)
            length = maps[i][0] + off + n - start
            LIBC.madvise(start, length, MADV_POPULATE_READ)
            LIBC.madvise(start, length, MADV_DONTNEED)
        else:
            buf = local.__dict__.setdefault("buf", bytearray(8 << 20))
            view = memoryview(buf)[:n]
            while n:
                got = os.preadv(fds[i], [view], off)
                if got <= 0:
                    raise OSError(f"short read of {files[i][0]} at {off}")
                off, n, view = off + got, n - got, view[got:]

    if name.startswith("inorder"):
        work = _pieces(files, 4 << 20)
        lock, nxt = threading.Lock(), [0]

        def worker():
            while True:
                with lock:
                    k = nxt[0]
                    nxt[0] += 1
                if k >= len(work):
                    return
                touch(*work[k])
    else:
        step = (2 << 20) if name.endswith("pread") else (4 << 20)
        stripes = iter(_stripes(files, threads))
        lock = threading.Lock()

        def worker():
            with lock:
                mine = next(stripes, [])
            for i, off, n in mine:
                for o in range(off, off + n, step):
                    touch(i, o, min(step, off + n - o))

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    for addr, size in maps:
        LIBC.munmap(addr, size)
    for fd in fds:
        os.close(fd)
    return sum(s for _, s in files) / dt / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--patterns", default="inorder_mmap,striped_pread,inorder_pread,striped_mmap",
                    help=f"comma list, run in this order each round: {', '.join(PATTERNS)}")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="probe_disk_order.json")
    args = ap.parse_args()
    unknown = [p for p in args.patterns.split(",") if p not in PATTERNS]
    if unknown:
        ap.error(f"unknown pattern(s) {', '.join(unknown)}; known: {', '.join(PATTERNS)}")
    paths = sorted(str(p) for p in Path(args.ckpt).glob("*.safetensors"))
    if not paths:
        ap.error(f"no *.safetensors files in {args.ckpt}")
    files = [(p, os.path.getsize(p)) for p in paths]
    rates = {p: [] for p in args.patterns.split(",")}
    for r in range(args.rounds):
        for name in rates:
            evict_page_cache(paths)
            gbps = run_pattern(name, files, args.threads)
            rates[name].append(gbps)
            print(f"round {r} {name:14s} {gbps:.3f} GB/s", flush=True)
    doc = {"bytes": sum(s for _, s in files), "threads": args.threads, "rounds": rates,
           "median_gbps": {k: statistics.median(v) for k, v in rates.items()}}
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["median_gbps"]))


if __name__ == "__main__":
    main()
