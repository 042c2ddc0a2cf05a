"""Issue 11 from Python: a checkpoint replaced by rename, release of what was not delivered,
close while another thread waits, views used after their slot was reused, tiny headers with
huge dimensions, the SIGBUS guard under faulthandler, and every core error kind's class."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import fastfp8
import pytest
import torch
from conftest import reader_threads, reader_threads_back_to, write_raw
from fastfp8 import errors
from fastfp8.checkpoint import ChunkReader
from safetensors.torch import save_file

# --- item 3: get() after the checkpoint was replaced by rename -----------------------------

def test_get_after_replace_by_rename_reads_the_file_it_opened(tmp_path):
    path = tmp_path / "m.safetensors"
    old = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10, 10)}
    save_file(old, str(path))
    ck = fastfp8.open_checkpoint(path)
    # Same layout, other bytes, written the way save_file and convert write: by rename.
    new_path = tmp_path / "m.safetensors.tmp"
    save_file({"a": torch.full((1000,), -5.0), "b": torch.zeros(10, 10)}, str(new_path))
    os.replace(new_path, path)
    assert torch.equal(ck.get("a"), old["a"])
    assert torch.equal(ck.get("b"), old["b"])
    # stream agrees (it always read the opened file)
    got = {n: t.clone() for n, t in ck.stream(memory_budget="1MiB")}
    assert torch.equal(got["a"], old["a"])


# --- item 2: release only a delivered, unreleased chunk ------------------------------------

def test_release_of_anything_but_a_delivered_chunk_is_a_release_error(tmp_path):
    path = tmp_path / "m.safetensors"
    ts = {f"t{i}": torch.full((256,), float(i)) for i in range(4)}  # 1 KiB each
    save_file(ts, str(path))
    ck = fastfp8.open_checkpoint(path)
    infos = ck.file_order()
    items = [(t.name, [(t.shard, t.begin, t.nbytes)]) for t in infos]
    with ChunkReader(ck, items, memory_budget=4096, chunk_bytes=None, threads=1, pin=False) as r:
        item, _, off, n = r.next()
        time.sleep(0.05)  # the threads allocate (and fill) the chunks after it meanwhile
        with pytest.raises(errors.ReleaseError, match="no delivered"):
            r.release(off + n, n)  # the next chunk: allocated, not delivered
        with pytest.raises(errors.ReleaseError, match="bytes long"):
            r.release(off, n // 2)
        assert isinstance(errors.ReleaseError("x"), ValueError)
        r.release(off, n)
        with pytest.raises(errors.ReleaseError):
            r.release(off, n)  # twice
        seen = [item]
        while (d := r.next()) is not None:
            i, _, o, m = d
            assert torch.equal(r.view(o, m).view(torch.float32), ts[infos[i].name])
            r.release(o, m)
            seen.append(i)
    assert seen == [0, 1, 2, 3]


# --- item 8: close joins the threads while another thread is inside next() -----------------

def test_close_joins_the_threads_while_another_thread_is_in_next(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(96 << 20, dtype=torch.uint8)}, str(path))
    ck = fastfp8.open_checkpoint(path)
    t = ck.info("w")
    before = reader_threads()
    for _ in range(3):
        r = ChunkReader(ck, [("w", [(0, t.begin, t.nbytes)])], memory_budget=t.nbytes,
                        chunk_bytes=None, threads=2, piece_bytes=48 << 20, method="pread",
                        pin=False)
        outcome = []
        started = threading.Event()

        def consume(r=r, outcome=outcome, started=started):
            started.set()
            try:
                outcome.append(r.next())
            except BaseException as e:  # recorded and checked below
                outcome.append(e)

        th = threading.Thread(target=consume)
        th.start()
        started.wait()
        time.sleep(0.002)
        r.close()
        assert reader_threads_back_to(before) == before, "close() returned while reader threads still ran"
        th.join(10)
        assert outcome and (isinstance(outcome[0], (fastfp8.CancelledError, tuple))), outcome


# --- item 9: the documented idiom raises on use after the slot's reuse ---------------------

def test_unpacked_tensors_raise_after_their_slot_is_reused(tmp_path):
    path = tmp_path / "m.safetensors"
    ts = {f"t{i}": torch.full((1024,), float(i + 1)) for i in range(3)}
    save_file(ts, str(path))
    ck = fastfp8.open_checkpoint(path)
    kept = {}
    for name, t in ck.stream(memory_budget="8KiB"):
        assert torch.equal(t, ts[name])  # usable while its slot is held
        kept[name] = t
    for name in ts:
        with pytest.raises(fastfp8.SlotReleasedError, match=name):
            kept[name].sum()
        with pytest.raises(fastfp8.SlotReleasedError):
            torch.equal(kept[name], ts[name])
    # the idiom that keeps tensors: copies
    copies = {name: t.clone() for name, t in ck.stream(memory_budget="8KiB")}
    for name in ts:
        assert torch.equal(copies[name], ts[name])
        assert type(copies[name]) is torch.Tensor
    # views of a slot's tensor are bound to it too
    views = [t[:4] for _, t in ck.stream(memory_budget="8KiB")]
    with pytest.raises(fastfp8.SlotReleasedError):
        views[0].tolist()


# --- item 4: dimensions torch cannot represent; zero-size tensors with huge dims ------------

@pytest.mark.parametrize("shape", [[2**64 - 1, 0], [2**63, 0], [0, 2**63], [2**32, 2**32, 0]])
def test_dimensions_beyond_torch_are_header_errors(tmp_path, shape):
    p = write_raw(tmp_path / "h.safetensors",
                  {"t": {"dtype": "BF16", "shape": shape, "data_offsets": [0, 0]}})
    with pytest.raises(fastfp8.HeaderError, match=r"h\.safetensors.*\"t\".*2\^63-1"):
        fastfp8.open_checkpoint(p)


def test_zero_size_tensor_with_huge_dims_costs_nothing(tmp_path):
    p = write_raw(tmp_path / "z.safetensors",
                  {"t": {"dtype": "BF16", "shape": [2**45, 0], "data_offsets": [0, 0]},
                   "u": {"dtype": "F32", "shape": [0, 3_000_000, 2**20], "data_offsets": [0, 0]}})
    ck = fastfp8.open_checkpoint(p)
    t0 = time.monotonic()
    assert ck.get("t").shape == (2**45, 0)
    assert ck.get("u").numel() == 0
    got = {n: tuple(t.shape) for n, t in ck.stream(memory_budget="1MiB")}
    assert got == {"t": (2**45, 0), "u": (0, 3_000_000, 2**20)}
    assert time.monotonic() - t0 < 2


# --- item 5: the SIGBUS guard survives faulthandler.enable() --------------------------------

_GUARD_SCRIPT = textwrap.dedent("""
    import faulthandler, os, sys, threading, time
    import torch, fastfp8
    from safetensors.torch import save_file
    d = sys.argv[1]
    p = os.path.join(d, "w.safetensors")
    save_file({"w": torch.ones(1 << 20)}, p)
    # a first load installs the guard
    for _ in fastfp8.open_checkpoint(p).stream(memory_budget="8MiB"):
        pass
    faulthandler.enable()  # replaces the SIGBUS handler, as torch's elastic launcher does
    n = 64 << 20
    outcomes = {"ok": 0, "error": 0}
    for attempt in range(8):
        save_file({"w": torch.ones(n // 4)}, p)
        ck = fastfp8.open_checkpoint(p)
        size = os.path.getsize(p)
        def cut(delay=0.0005 * attempt):
            time.sleep(delay)
            os.truncate(p, 4096)
        th = threading.Thread(target=cut)
        th.start()
        try:
            for _, t in ck.stream(memory_budget=n, threads=1, method="mmap"):
                assert bool((t == 1).all()), "silent wrong bytes"
            outcomes["ok"] += 1
        except fastfp8.ReadError:
            outcomes["error"] += 1
        th.join()
    print("outcomes", outcomes)
""")


def test_truncation_mid_copy_is_a_read_error_after_faulthandler_enable(tmp_path):
    r = subprocess.run([sys.executable, "-c", _GUARD_SCRIPT, str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    assert "outcomes" in r.stdout and "'error': 0}" not in r.stdout, r.stdout


def test_the_guard_is_reinstalled_over_faulthandler_and_chains_to_it(tmp_path):
    """A SIGBUS outside our copies still reaches faulthandler (its traceback is printed)."""
    script = textwrap.dedent("""
        import faulthandler, os, sys, mmap, torch, fastfp8
        from safetensors.torch import save_file
        p = os.path.join(sys.argv[1], "w.safetensors")
        save_file({"w": torch.ones(1 << 16)}, p)
        faulthandler.enable()
        for _ in fastfp8.open_checkpoint(p).stream(memory_budget="1MiB"):
            pass  # our guard goes in over faulthandler here
        f = open(p, "r+b")
        m = mmap.mmap(f.fileno(), 0)
        os.truncate(p, 0)
        print("touching", flush=True)
        m[100000]  # a fault outside any guarded copy
    """)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "touching" in r.stdout
    assert "Bus error" in r.stderr, r.stderr[-2000:]


# --- every core error kind has its Python class ---------------------------------------------

EXPECTED_CLASSES = {
    "Header": "HeaderError",
    "Checkpoint": "CheckpointError",
    "NotFound": "CheckpointNotFoundError",
    "Read": "ReadError",
    "Budget": "BudgetError",
    "Cancelled": "CancelledError",
    "Release": "ReleaseError",
    "Invalid": "ValueError",
}


def test_every_error_kind_maps_to_its_class():
    from fastfp8 import _native

    got = dict(_native.error_classes())
    assert got == EXPECTED_CLASSES
    for cls in set(got.values()) - {"ValueError"}:
        assert issubclass(getattr(errors, cls), errors.Error)


def test_each_error_kind_arrives_as_its_class(tmp_path):
    ok = tmp_path / "ok.safetensors"
    save_file({"a": torch.ones(4096), "b": torch.ones(4)}, str(ok))
    ck = fastfp8.open_checkpoint(ok)
    a = ck.info("a")
    item = [("a", [(0, a.begin, a.nbytes)])]
    raised: dict[str, type] = {}

    def expect(kind, cls, fn):
        with pytest.raises(cls) as e:
            fn()
        raised[kind] = type(e.value)

    expect("Header", fastfp8.HeaderError, lambda: fastfp8.open_checkpoint(
        write_raw(tmp_path / "bad.safetensors", b"{not json")))
    (tmp_path / "d").mkdir()
    expect("Checkpoint", fastfp8.CheckpointError, lambda: fastfp8.open_checkpoint(tmp_path / "d"))
    expect("NotFound", fastfp8.CheckpointNotFoundError,
           lambda: fastfp8.open_checkpoint(tmp_path / "missing"))
    expect("Budget", fastfp8.BudgetError, lambda: ChunkReader(
        ck, item, memory_budget=1024, chunk_bytes=None, threads=1, pin=False))
    expect("Invalid", ValueError, lambda: ChunkReader(
        ck, [("a", [(0, 0, 10)])], memory_budget=1 << 20, chunk_bytes=None, threads=1, pin=False))

    r = ChunkReader(ck, item, memory_budget=1 << 20, chunk_bytes=None, threads=1, pin=False)
    expect("Release", errors.ReleaseError, lambda: r.release(12345, 10))
    r._native.cancel()
    expect("Cancelled", fastfp8.CancelledError, r.next)
    r.close()

    os.truncate(ok, 100)
    r = ChunkReader(ck, item, memory_budget=1 << 20, chunk_bytes=None, threads=1, pin=False)
    expect("Read", fastfp8.ReadError, r.next)
    r.close()
    assert {k: c.__name__ for k, c in raised.items()} == EXPECTED_CLASSES
