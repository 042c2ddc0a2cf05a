"""The budgeted reader: budget, slot reuse rules, GIL release, prompt stops."""

from __future__ import annotations

import os
import sys
import threading
import time

import fastfp8
import pytest
import torch
from conftest import native_threads, reader_threads_back_to, threads_back_to
from fastfp8.checkpoint import ChunkReader
from safetensors.torch import save_file


@pytest.fixture
def ckpt(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sizes = [(64, 64), (300, 1000), (1, 7), (0, 5), (2048, 512), (1000, 300), (5,)]
    tensors = {f"t{i}": torch.randn(*s, generator=gen) for i, s in enumerate(sizes)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    return fastfp8.open_checkpoint(path), tensors


@pytest.mark.parametrize("method", ["mmap", "pread"])
@pytest.mark.parametrize("budget", [4 << 20, 5 << 20, 16 << 20])
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_peak_in_flight_never_above_budget(ckpt, budget, threads, method):
    ckpt, tensors = ckpt
    with ckpt.stream(memory_budget=budget, threads=threads, method=method) as s:
        for name, t in s:
            assert torch.equal(t, tensors[name])
        stats = s.stats()
    assert 0 < stats["peak_in_flight"] <= budget
    assert stats["bytes_read"] == ckpt.nbytes


def test_chunked_reader_budget_smaller_than_tensors(ckpt):
    ckpt, tensors = ckpt
    names = list(tensors)
    items = [(n, [(0, ckpt.info(n).begin, ckpt.info(n).nbytes)]) for n in names]
    out = {n: bytearray(ckpt.info(n).nbytes) for n in names}
    budget = 300_000  # smaller than most tensors
    with ChunkReader(ckpt, items, memory_budget=budget, chunk_bytes=65_536, threads=4,
                     piece_bytes=10_000) as r:
        while (d := r.next()) is not None:
            item, off, buf, n = d
            out[names[item]][off:off + n] = r.view(buf, n).numpy().tobytes()
            r.release(buf, n)
        assert r.stats()["peak_in_flight"] <= budget
    for n, t in tensors.items():
        assert bytes(out[n]) == t.numpy().tobytes(), n


def test_ready_chunks_merge_for_a_slow_consumer(ckpt):
    """``merge_bytes``: chunks already read when a slow consumer asks come as one delivery
    of up to ``merge_bytes`` (one tensor's, back to back in the buffer); same bytes."""
    ckpt, tensors = ckpt
    names = list(tensors)
    items = [(n, [(0, ckpt.info(n).begin, ckpt.info(n).nbytes)]) for n in names]
    out = {n: bytearray(ckpt.info(n).nbytes) for n in names}
    sizes = []
    with ChunkReader(ckpt, items, memory_budget=300_000, chunk_bytes=16_384, threads=2, piece_bytes=16_384,
                     merge_bytes=65_536) as r:
        while True:
            time.sleep(0.005)  # slower than the threads
            if (d := r.next()) is None:
                break
            item, off, buf, n = d
            sizes.append(n)
            out[names[item]][off:off + n] = r.view(buf, n).numpy().tobytes()
            r.release(buf, n)
    assert max(sizes) > 16_384 and max(sizes) <= 65_536, sizes
    for n, t in tensors.items():
        assert bytes(out[n]) == t.numpy().tobytes(), n


def test_room_wait_counts_threads_idle_for_a_full_ring(ckpt):
    """``room_wait_ns``: the threads' idle time while the ring is full and chunks are left to
    read (a consumer that holds its chunks); none when it releases at once into a ring
    that holds everything."""
    ckpt, _ = ckpt
    items = [(n, [(0, ckpt.info(n).begin, ckpt.info(n).nbytes)]) for n in ("t4", "t5")]
    with ChunkReader(ckpt, items, memory_budget=131_072, chunk_bytes=65_536, threads=2) as r:
        while (d := r.next()) is not None:
            time.sleep(0.01)  # holds the chunk: the other one fits, the next does not
            r.release(d[2], d[3])
        held = r.stats()["room_wait_ns"]
    assert held >= 5_000_000 * 2, held  # most of each 10 ms, on each thread, many times
    with ChunkReader(ckpt, items, memory_budget="16MiB", chunk_bytes=None, threads=2) as r:
        while (d := r.next()) is not None:
            r.release(d[2], d[3])
        assert r.stats()["room_wait_ns"] == 0


def test_chunk_times_follow_each_chunk_through_the_ring(ckpt, tmp_path, monkeypatch):
    """``chunk_times``: each chunk in plan order, allocated, read, delivered and released in
    that order (a consumer holding each chunk 5 ms: released at least that long after its
    delivery); a load with ``engine.TIMELINE`` keeps them in its stats."""
    from fastfp8 import engine

    ckpt, _ = ckpt
    items = [(n, [(0, ckpt.info(n).begin, ckpt.info(n).nbytes)]) for n in ("t4", "t5")]
    with ChunkReader(ckpt, items, memory_budget=131_072, chunk_bytes=65_536, threads=2) as r:
        while (d := r.next()) is not None:
            time.sleep(0.005)
            r.release(d[2], d[3])
        times = r.chunk_times()
    assert sum(t[1] for t in times) == sum(ckpt.info(n).nbytes for n in ("t4", "t5"))
    assert [t[0] for t in times] == sorted(t[0] for t in times)
    for _, _, alloc, read, deliver, release in times:
        assert alloc <= read <= deliver and release >= deliver + 5_000_000
    from test_load import save, tiny

    save(tiny("llama"), tmp_path / "m")
    monkeypatch.setattr(engine, "TIMELINE", True)
    stats = fastfp8.load_quantized(tmp_path / "m", device="cpu", progress=False).stats
    assert stats.timeline and sum(t[1] for t in stats.timeline) == stats.bytes_read


def test_optional_items_are_checked(ckpt):
    """``optional``: an index past the items, or an item the threads cannot quantize (no
    quantization spec), is a ValueError saying which; ``quantized`` says how each item
    comes (a plain item: False)."""
    ckpt, _ = ckpt
    items = [(n, [(0, ckpt.info(n).begin, ckpt.info(n).nbytes)]) for n in ("t0", "t1")]
    with pytest.raises(ValueError, match="optional item 5 out of range"):
        ChunkReader(ckpt, items, memory_budget="2MiB", chunk_bytes=None, optional=[5])
    with pytest.raises(ValueError, match="t1: only an item quantized on the way"):
        ChunkReader(ckpt, items, memory_budget="2MiB", chunk_bytes=None, optional=[1])
    with ChunkReader(ckpt, items, memory_budget="2MiB", chunk_bytes=None) as r:
        while (d := r.next()) is not None:
            r.release(d[2], d[3])
        assert (r.quantized(0), r.quantized(1), r.quantized(2)) == (False, False, None)
        assert r.optional == frozenset()


def test_background_items_are_checked_and_come_between_the_others(ckpt):
    """``background``: an index past the items, or an item quantized on the way, is a
    ValueError saying which; a background item's chunks come between the others' (the
    first item's after the second's first chunk), every item's bytes whole and in order."""
    ckpt, tensors = ckpt
    items = [(n, [(0, ckpt.info(n).begin, ckpt.info(n).nbytes)]) for n in ("t0", "t1")]
    with pytest.raises(ValueError, match="background item 5 out of range"):
        ChunkReader(ckpt, items, memory_budget="2MiB", chunk_bytes=None, background=[5])
    quant = [(items[0][0], items[0][1], ("BF16", 2, "fp32"))]
    with pytest.raises(ValueError, match="t0: only an item read as it is may go out in the background"):
        ChunkReader(ckpt, quant, memory_budget="2MiB", chunk_bytes=None, background=[0])
    sizes = [ckpt.info(n).nbytes for n in ("t0", "t1")]
    got = [bytearray() for _ in items]
    order = []
    with ChunkReader(ckpt, items, memory_budget="64KiB", chunk_bytes=max(1, min(sizes) // 4),
                     background=[0]) as r:
        assert r.background == frozenset({0})
        while (d := r.next()) is not None:
            item, ioff, boff, n = d
            assert ioff == len(got[item])
            got[item] += r.view(boff, n).numpy().tobytes()
            order.append(item)
            r.release(boff, n)
    assert [bytes(g) for g in got] == [tensors[n].numpy().tobytes() for n in ("t0", "t1")]
    assert order[0] == 1 and 0 < order.index(0) < len(order) - 4, order


def test_tensor_over_budget_names_it(ckpt):
    ckpt, _ = ckpt
    with pytest.raises(fastfp8.BudgetError, match=r"\"t1\" needs .* budget"):
        ckpt.stream(memory_budget="1MiB")
    with pytest.raises(fastfp8.BudgetError):
        ckpt.stream(memory_budget=0)
    with pytest.raises(ValueError, match="byte size"):
        ckpt.stream(memory_budget="lots")


def test_auto_release_reuses_slots_and_enforces_it(ckpt):
    ckpt, tensors = ckpt
    s = ckpt.stream(memory_budget="8MiB")
    first = next(s)
    t = first.tensor
    assert torch.equal(t, tensors[first.name])
    second = next(s)
    assert first.released and not second.released
    with pytest.raises(fastfp8.SlotReleasedError, match=first.name):
        _ = first.tensor
    s.close()
    with pytest.raises(fastfp8.SlotReleasedError):
        _ = second.tensor


def test_manual_release(ckpt):
    ckpt, tensors = ckpt
    kept = []
    with ckpt.stream(memory_budget="16MiB", auto_release=False) as s:
        for slot in s:
            if len(kept) < 2:
                kept.append(slot)  # held: the reader works around them
            else:
                with slot:
                    assert torch.equal(slot.tensor, tensors[slot.name])
        for slot in kept:
            assert torch.equal(slot.tensor, tensors[slot.name])
            slot.release()
            slot.release()  # idempotent


def test_holding_too_much_is_an_error_not_a_hang(ckpt):
    ckpt, _ = ckpt
    held = []
    with pytest.raises(fastfp8.BudgetError, match="release slots"), \
            ckpt.stream(memory_budget="5MiB", auto_release=False) as s:
        held.extend(s)


def test_gil_is_released_while_reading(tmp_path):
    """With a huge switch interval the interpreter never hands the GIL over by itself: a
    thread woken just before ``next()`` runs while ``next()`` waits only if the native code
    released the GIL. The woken thread already wants the GIL when the wait begins (no sleep
    to wake from), and a late wake-up is retried, so a busy machine cannot fail it."""
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.randn(32 << 20)}, str(path))  # 128 MiB: tens of ms to copy
    ckpt = fastfp8.open_checkpoint(path)
    items = [("w", [(0, ckpt.info("w").begin, ckpt.info("w").nbytes)])]
    old = sys.getswitchinterval()
    seen: list[bool] = []
    try:
        for _ in range(5):
            inside = [False]
            go = threading.Event()

            def note(inside=inside, go=go):
                go.wait()
                seen.append(inside[0])

            t = threading.Thread(target=note)
            t.start()
            sys.setswitchinterval(1000.0)
            with ChunkReader(ckpt, items, memory_budget="128MiB", chunk_bytes=None,
                             threads=1) as r:
                inside[0] = True
                go.set()
                d = r.next()  # one native thread copies 128 MiB meanwhile
                inside[0] = False
                assert d is not None
            sys.setswitchinterval(old)
            t.join()
            if seen[-1]:
                break
    finally:
        sys.setswitchinterval(old)
    assert any(seen), seen


def test_dropping_a_stream_stops_its_threads(ckpt):
    ckpt, _ = ckpt
    base = native_threads()
    for _ in range(5):
        s = ckpt.stream(memory_budget="8MiB", threads=6)
        next(s)
        assert native_threads() >= base + 6
        s.close()
        assert threads_back_to(base) == base
    s = ckpt.stream(memory_budget="8MiB", threads=6)
    next(s)
    del s
    import gc

    gc.collect()
    assert threads_back_to(base) == base


def test_keyboard_interrupt_stops_the_reader(tmp_path):
    """An interrupt delivered while the consumer waits in next() stops the stream."""
    import signal

    path = tmp_path / "k.safetensors"
    save_file({f"w{i}": torch.randn(1 << 20) for i in range(64)}, str(path))  # 256 MiB
    ckpt = fastfp8.open_checkpoint(path)
    base = native_threads()
    timer = threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        timer.start()
        with ckpt.stream(memory_budget="8MiB", threads=1, auto_release=False) as s:
            for slot in s:
                time.sleep(0.01)
                slot.release()
    timer.cancel()
    timer.join()  # its thread counts too, and its OS thread may outlive join() by a moment:
    # no reader thread is left (joined ones gone within a moment), and the count is back to
    # base once the timer's is gone
    assert reader_threads_back_to(0) == 0
    assert threads_back_to(base) == base


def test_buffers_are_pooled_inside_retain(ckpt):
    from fastfp8.pinned import POOL

    ckpt, _ = ckpt
    with POOL.retain():
        list(ckpt.stream(memory_budget="8MiB"))
        before = POOL.allocated_bytes
        for _ in range(3):
            list(ckpt.stream(memory_budget="8MiB"))
        assert POOL.allocated_bytes == before
    assert POOL.idle_bytes() == 0
