"""Several loads at once, in threads and in processes; one staging pool shared by all of
them, safely (also from finalizers); and a process-wide limit on the pool's total."""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import random
import signal
import threading
import time
from pathlib import Path

import conftest
import fastfp8
import pytest
import torch
from conftest import native_threads, threads_back_to
from fastfp8.checkpoint import ChunkReader
from fastfp8.pinned import POOL, BufferPool

MiB = 1 << 20


def make_model(root: Path) -> dict[str, torch.Tensor]:
    return conftest.make_model(root)[0]


def digest(state: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
            for k, v in state.items()}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("conc") / "m"
    src = make_model(root)
    return root, src


@pytest.fixture
def limit():
    """Sets a process-wide limit on the pool for one test, restoring it after."""
    old = POOL.limit

    def set_(n):
        POOL.clear()
        POOL.set_limit(n, timeout=30)
        POOL.reset_peak()

    yield set_
    POOL.set_limit(old, timeout=600)


def run_threads(fns, timeout=120):
    """Runs each fn in its own thread, started together; returns their results in order and
    re-raises the first exception."""
    start = threading.Barrier(len(fns))
    results: list = [None] * len(fns)
    errors: list[BaseException] = []

    def body(i, fn):
        try:
            start.wait()
            results[i] = fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a load hangs"
    if errors:
        raise errors[0]
    return results


# ---------------------------------------------------------------------------------------
# threads


def test_loads_in_threads(model):
    root, _ = model
    want = digest(fastfp8.load_quantized(root, device="cpu"))
    shared = fastfp8.open_checkpoint(root)  # one Checkpoint object used by several loads at once
    gc.collect()
    base_threads, base_in_use = native_threads(), POOL.stats()["in_use"]
    configs = [
        dict(path=root, memory_budget="512KiB", chunk_bytes="64KiB", threads=2, method="pread"),
        dict(path=root, memory_budget="1MiB", chunk_bytes="128KiB", threads=3, method="mmap"),
        dict(path=root, memory_budget="4MiB", threads=1),
        dict(path=shared, memory_budget="512KiB", chunk_bytes="64KiB", threads=2, method="mmap"),
        dict(path=shared, memory_budget="2MiB", threads=4, method="pread"),
        dict(path=shared, memory_budget="768KiB", chunk_bytes="32KiB", threads=2),
    ]

    def load(cfg):
        cfg = dict(cfg)
        return digest(fastfp8.load_quantized(cfg.pop("path"), device="cpu", **cfg))

    for _ in range(3):
        for got in run_threads([lambda c=c: load(c) for c in configs]):
            assert got == want
    gc.collect()
    assert threads_back_to(base_threads) == base_threads
    assert POOL.stats()["in_use"] <= base_in_use


def test_streams_and_chunk_readers_in_threads(model):
    root, src = model
    want = digest(src)
    ckpt = fastfp8.open_checkpoint(root)

    def stream(auto_release, method):
        out = {}
        with ckpt.stream(memory_budget="1MiB", threads=2, auto_release=auto_release, method=method) as s:
            for slot in s:
                out[slot.name] = slot.tensor.clone()
                if not auto_release:
                    slot.release()
        return digest(out)

    def chunks():
        infos = ckpt.file_order()
        items = [(t.name, [(t.shard, t.begin, t.nbytes)]) for t in infos]
        raw = {t.name: bytearray(t.nbytes) for t in infos}
        with ChunkReader(ckpt, items, memory_budget="300KiB", chunk_bytes=50_000, threads=3,
                         piece_bytes=7_000) as r:
            while (d := r.next()) is not None:
                item, off, buf, n = d
                raw[infos[item].name][off:off + n] = r.view(buf, n).numpy().tobytes()
                r.release(buf, n)
        return {k: hashlib.sha256(bytes(v)).hexdigest() for k, v in raw.items()}

    fns = [lambda: stream(True, "mmap"), lambda: stream(False, "pread"), chunks, lambda: stream(True, "pread"),
           chunks, lambda: stream(False, "mmap")]
    for got in run_threads(fns):
        assert got == want


# ---------------------------------------------------------------------------------------
# processes


def _load_in_child(args: tuple[str, str, str]) -> dict[str, str]:
    path, method, budget = args
    return digest(fastfp8.load_quantized(path, device="cpu", method=method, memory_budget=budget))


def test_loads_in_processes(model):
    root, _ = model
    want = digest(fastfp8.load_quantized(root, device="cpu"))
    ctx = multiprocessing.get_context("spawn")
    args = [(str(root), "mmap", "1MiB"), (str(root), "pread", "512KiB"), (str(root), "mmap", "4MiB")]
    with ctx.Pool(len(args)) as pool:
        results = pool.map(_load_in_child, args, chunksize=1)
    for got in results:
        assert got == want


# ---------------------------------------------------------------------------------------
# one pool, many threads


def test_pool_shared_by_many_threads():
    """16 threads acquire and release at random; no buffer is ever held by two at once, and
    every buffer ends up idle or freed."""
    gc.collect()
    before = POOL.stats()
    owner: dict[int, int] = {}
    guard = threading.Lock()
    clashes = []

    def hammer(seed):
        rng = random.Random(seed)
        for _ in range(150):
            buf = POOL.acquire(rng.randint(1, 6 * MiB), pin=False)
            with guard:
                if buf.data_ptr() in owner:
                    clashes.append((seed, owner[buf.data_ptr()]))
                owner[buf.data_ptr()] = seed
            buf[0] = seed
            buf[-1] = seed
            time.sleep(rng.random() * 1e-4)
            assert int(buf[0]) == int(buf[-1]) == seed
            with guard:
                del owner[buf.data_ptr()]
            POOL.release(buf)

    run_threads([lambda s=s: hammer(s) for s in range(16)])
    assert not clashes
    gc.collect()
    after = POOL.stats()
    assert after["in_use"] <= before["in_use"]
    assert after["idle"] <= 8 << 30
    assert after["live"] - before["live"] <= 16 * 6 * MiB * 2, after


def test_release_from_a_finalizer_inside_a_pool_section_does_not_deadlock(model):
    """The garbage collector may finalize a ChunkReader (whose __del__ releases its buffer
    to the pool) while the same thread is inside one of the pool's critical sections."""
    root, _ = model
    ckpt = fastfp8.open_checkpoint(root)
    done = threading.Event()
    bufs = []

    def body():
        r = ChunkReader(ckpt, [], memory_budget="3MiB", chunk_bytes=None)
        bufs.append(r.buffer)
        r.cycle = r  # only the cyclic collector can free it
        del r
        with POOL._lock:  # as if the collection had been triggered inside acquire()
            gc.collect()
        done.set()

    with POOL.retain():  # released buffers stay idle, so the release can be seen
        t = threading.Thread(target=body, daemon=True)
        t.start()
        t.join(10)
        assert done.is_set(), "deadlock: a release from a finalizer inside a pool section"
        POOL.idle_bytes()  # the next section takes the queued release in
        assert any(b is bufs[0] for b in POOL._idle)


def test_a_second_release_of_an_idle_buffer_is_a_no_op():
    pool = BufferPool()
    with pool.retain():
        buf = pool.acquire(MiB, pin=False)
        pool.release(buf)
        pool.release(buf)
        assert pool.acquire(MiB, pin=False) is buf
        assert pool.acquire(MiB, pin=False) is not buf


def test_pool_figures_follow_storage_not_tensor_objects():
    pool = BufferPool()
    buf = pool.acquire(3 * MiB, pin=False)
    assert pool.stats()["in_use"] == pool.stats()["live"] == 4 * MiB
    view = buf[10:20]
    del buf
    gc.collect()
    assert pool.stats()["in_use"] == 4 * MiB  # a view keeps the memory alive
    del view
    gc.collect()
    assert pool.stats()["live"] == 0


# ---------------------------------------------------------------------------------------
# the process-wide limit


def test_total_within_the_limit_across_concurrent_loads(model, limit):
    root, _ = model
    want = digest(fastfp8.load_quantized(root, device="cpu"))
    limit(8 * MiB)
    seen_waiting = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen_waiting.append(POOL.stats()["waiting"])
            time.sleep(0.001)

    w = threading.Thread(target=watch)
    w.start()
    try:
        # 6 loads of 4 MiB budgets (4 MiB buffers): at most 2 at once fit the 8 MiB limit.
        for got in run_threads([lambda: digest(fastfp8.load_quantized(root, device="cpu", memory_budget="4MiB",
                                                                       threads=2))] * 6):
            assert got == want
    finally:
        stop.set()
        w.join()
    st = POOL.stats()
    print(f"\npeak live {st['peak_live'] / MiB:.0f} MiB of a {st['limit'] / MiB:.0f} MiB limit; "
          f"most waiting at once {max(seen_waiting)}")
    assert st["peak_live"] <= 8 * MiB
    assert st["waiting"] == 0


def test_limit_waits_times_out_and_refuses(limit):
    limit(8 * MiB)
    held = POOL.acquire(6 * MiB, pin=False)
    got = []
    t = threading.Thread(target=lambda: got.append(POOL.acquire(4 * MiB, pin=False)))
    t.start()
    time.sleep(0.3)
    assert not got and POOL.stats()["waiting"] == 1  # waits for room
    POOL.release(held)  # idle now: 6 MiB serves the 4 MiB request
    t.join(5)
    assert got and got[0].numel() == 6 * MiB
    held = got.pop()
    with pytest.raises(fastfp8.BudgetError, match="timed out"):
        POOL.acquire(4 * MiB, pin=False, timeout=0.2)
    with pytest.raises(fastfp8.BudgetError, match="larger than the process-wide limit"):
        POOL.acquire(9 * MiB, pin=False)
    POOL.release(held)
    del held
    # An idle buffer that cannot serve a request is freed to make room for it.
    big = POOL.acquire(8 * MiB, pin=False)
    st = POOL.stats()
    assert big.numel() == 8 * MiB and st["live"] == 8 * MiB and st["idle"] == 0
    POOL.release(big)


def test_load_over_the_limit_is_a_budget_error_and_leaks_nothing(model, limit):
    root, _ = model
    limit(4 * MiB)
    gc.collect()
    threads = native_threads()
    with pytest.raises(fastfp8.BudgetError, match="process-wide limit"):
        fastfp8.load_quantized(root, device="cpu", memory_budget="16MiB")
    assert threads_back_to(threads) == threads


def test_interrupt_while_waiting_for_the_pool(limit):
    limit(4 * MiB)
    held = POOL.acquire(4 * MiB, pin=False)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    t0 = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        POOL.acquire(4 * MiB, pin=False, timeout=20)
        time.sleep(5)  # not reached unless acquire returned
    timer.join()
    assert time.perf_counter() - t0 < 3
    st = POOL.stats()
    assert st["waiting"] == 0 and not POOL._lock._is_owned()
    assert st["live"] == 4 * MiB
    POOL.release(held)


def test_limit_from_the_environment(tmp_path):
    import subprocess
    import sys

    code = ("import fastfp8\nfrom fastfp8.pinned import POOL\nprint(POOL.limit)\n"
            "try:\n POOL.acquire(5 << 20, pin=False)\nexcept fastfp8.BudgetError:\n print('refused')")
    env = dict(os.environ, FASTFP8_PINNED_LIMIT="4MiB", FASTFP8_PINNED_TIMEOUT="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == [str(4 * MiB), "refused"], r.stderr


# ---------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
def test_cuda_loads_in_threads_within_a_pinned_limit(model, limit):
    root, _ = model
    want = digest(fastfp8.load_quantized(root, device="cuda"))
    torch.cuda.synchronize()
    gc.collect()
    threads = native_threads()
    limit(8 * MiB)
    results = run_threads([lambda: digest(fastfp8.load_quantized(root, device="cuda", memory_budget="4MiB",
                                                                  chunk_bytes="512KiB"))] * 6)
    for got in results:
        assert got == want
    st = POOL.stats()
    assert st["peak_live"] <= 8 * MiB
    gc.collect()
    assert threads_back_to(threads) == threads


def test_a_freed_buffer_leaves_the_count_without_running_python_code():
    """A buffer's reservation ends through its storage's weak reference, whose callback is
    ``dict.pop`` itself: C code, which a Ctrl-C cannot cut short. (A ``weakref.finalize``
    runs Python code, which takes a pending KeyboardInterrupt and drops the rest: CI once
    saw a freed 4 MiB buffer stay counted as live that way.)"""
    import types
    import weakref

    pool = BufferPool(max_total_bytes=None, timeout=1)
    buf = pool.acquire(1 << 20, pin=False)
    refs = [r for r in weakref.getweakrefs(buf.untyped_storage()) if r.__callback__ is not None]
    assert refs and all(isinstance(r.__callback__, types.BuiltinMethodType) for r in refs)
    assert pool.stats()["live"] == 2 << 20  # one 2 MiB-aligned buffer
    del buf, refs
    gc.collect()
    assert pool.stats()["live"] == 0
