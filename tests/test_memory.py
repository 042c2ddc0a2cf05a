"""What a load really keeps resident: RSS (pinned staging memory included: it is touched,
so it counts) measured during a load against its memory budget, and pinned/staging memory
given back after a load unless ``POOL.retain()`` asks to keep it."""

from __future__ import annotations

import gc
import threading

import fastfp8
import pytest
import torch
from conftest import rss
from fastfp8.pinned import POOL
from safetensors.torch import save_file

MiB = 1 << 20


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """8 tensors of 16 MiB: a 128 MiB file, four times the 32 MiB budget used below."""
    path = tmp_path_factory.mktemp("mem") / "m.safetensors"
    save_file({f"t{i}": torch.full((4 * MiB,), float(i + 1)) for i in range(8)}, str(path))
    return path


def _settle() -> None:
    gc.collect()
    POOL.idle_bytes()  # takes queued releases in


class _PeakRss:
    def __init__(self) -> None:
        self.peak = rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.0005):
            self.peak = max(self.peak, rss())

    def __enter__(self) -> _PeakRss:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())


@pytest.mark.parametrize("pin", [False, pytest.param(True, marks=pytest.mark.cuda)])
@pytest.mark.parametrize("method", ["mmap", "pread"])
def test_resident_memory_during_a_load_stays_within_the_budget(big, method, pin):
    budget = 32 * MiB
    ck = fastfp8.open_checkpoint(big)
    if pin:  # the CUDA context (100+ MiB resident) before the baseline, not inside the window
        torch.empty(1, pin_memory=True)
    _settle()
    POOL.reset_peak()
    base = rss()
    from fastfp8.checkpoint import ChunkReader

    infos = ck.file_order()
    items = [(t.name, [(t.shard, t.begin, t.nbytes)]) for t in infos]
    total = 0.0
    with _PeakRss() as peak, ChunkReader(ck, items, memory_budget=budget, chunk_bytes=8 * MiB,
                                         threads=2, method=method, pin=pin) as r:
        while (d := r.next()) is not None:
            _, _, off, n = d
            total += float(r.view(off, n).view(torch.float32).sum())
            r.release(off, n)
    assert total == sum(float(i + 1) * 4 * MiB for i in range(8))
    grown = peak.peak - base
    # The staging buffer (the budget) plus slack for allocator and interpreter noise; the
    # 128 MiB file, read through a mapping or not, must not stay resident in this process.
    assert grown <= budget + 24 * MiB, f"RSS grew by {grown / MiB:.1f} MiB for a {budget // MiB} MiB budget"
    assert POOL.stats()["peak_live"] <= budget + 2 * MiB


def test_staging_memory_is_given_back_after_a_load(big):
    ck = fastfp8.open_checkpoint(big)
    _settle()
    before = POOL.stats()
    base = rss()
    for _, t in ck.stream(memory_budget=48 * MiB, method="pread"):
        float(t.sum())
    _settle()
    after = POOL.stats()
    assert after["live"] == before["live"], after
    assert after["idle"] == 0, after
    # and the memory is really gone from the process (the buffer was 48 MiB, touched)
    assert rss() - base < 16 * MiB, (rss() - base) / MiB


def test_retain_keeps_one_buffer_across_back_to_back_loads(big):
    ck = fastfp8.open_checkpoint(big)
    _settle()
    before = POOL.stats()
    with POOL.retain():
        list(ck.stream(memory_budget=20 * MiB, method="pread"))
        first = POOL.allocated_bytes
        assert POOL.idle_bytes() >= 20 * MiB  # kept for the next load
        for _ in range(2):
            list(ck.stream(memory_budget=20 * MiB, method="pread"))
        assert POOL.allocated_bytes == first  # reused, not allocated again
    _settle()
    assert POOL.stats()["live"] == before["live"] and POOL.idle_bytes() == 0


def test_retain_nests_and_frees_at_the_outermost_exit():
    from fastfp8.pinned import BufferPool

    pool = BufferPool()
    with pool.retain():
        with pool.retain():
            buf = pool.acquire(MiB, pin=False)
            pool.release(buf)
        assert pool.idle_bytes() == 2 * MiB  # rounded to 2 MiB
        assert pool.retaining
    del buf
    gc.collect()
    assert pool.idle_bytes() == 0 and pool.live_bytes() == 0 and not pool.retaining


def test_huge_pages_stay_registered_while_a_view_lives(monkeypatch):
    """The huge-page ring is unregistered when its storage dies, after its last view, and
    while its memory is still mapped: not when the first tensor object goes (a chunk's view
    may still be in a copy then)."""
    from fastfp8 import pinned

    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", ptr, size))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    buf = pinned._huge_registered(2 * MiB)
    ptr = buf.data_ptr()
    assert calls == [("register", ptr, 2 * MiB)] and int(buf.sum()) == 0
    view = buf[MiB:]
    del buf
    gc.collect()
    assert calls == [("register", ptr, 2 * MiB)]
    view.fill_(7)  # still mapped, still ours
    del view
    gc.collect()
    assert calls == [("register", ptr, 2 * MiB), ("unregister", ptr)]


def test_failed_registration_clears_the_cuda_error_and_a_failed_unregistration_keeps_the_mapping(monkeypatch):
    """A registration that fails raises (the caller falls back to torch's pinned memory)
    after clearing the CUDA runtime's last error, which torch's next kernel launch check
    would otherwise raise in an unrelated op; an unregistration that fails clears it too and
    keeps the memory mapped for good (a new mapping there would meet the old registration)."""
    from fastfp8 import pinned

    cleared = []
    monkeypatch.setattr(pinned, "_clear_cuda_error", lambda: cleared.append(1))
    monkeypatch.setattr(pinned, "_STILL_REGISTERED", [])

    class FakeCudart:
        def __init__(self, register, unregister):
            self.results = (register, unregister)

        def cudaHostRegister(self, ptr, size, flags):
            return self.results[0]

        def cudaHostUnregister(self, ptr):
            return self.results[1]

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(712, 0))  # already registered
    with pytest.raises(RuntimeError):
        pinned._huge_registered(2 * MiB)
    assert cleared == [1]
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(0, 1))  # unregistering fails
    buf = pinned._huge_registered(2 * MiB)
    del buf
    gc.collect()
    assert cleared == [1, 1] and len(pinned._STILL_REGISTERED) == 1


@pytest.mark.cuda
def test_failed_registration_leaves_no_cuda_error_behind():
    """Registering a range that is registered already fails, and the runtime keeps that
    error as its last one: torch's next kernel launch raises it (what a later test's
    ``torch.equal`` once met, benches/NOTES.md, session 26). After ``_clear_cuda_error``
    the next launch runs."""
    from fastfp8 import pinned

    buf = pinned._huge_registered(2 * MiB)
    cudart = torch.cuda.cudart()

    def launch():
        x = torch.full((4,), 2.0, device="cuda") * 2
        torch.cuda.synchronize()
        return x.sum().item()

    assert int(cudart.cudaHostRegister(buf.data_ptr(), 2 * MiB, 0)) != 0  # registered already
    with pytest.raises(RuntimeError, match="already"):
        launch()  # the stale error, in an op that has nothing to do with it
    assert int(cudart.cudaHostRegister(buf.data_ptr(), 2 * MiB, 0)) != 0
    pinned._clear_cuda_error()
    assert launch() == 16.0
    del buf
    gc.collect()


def test_pinned_way_is_checked(monkeypatch):
    """``FASTFP8_PINNED`` takes ``thp`` or ``cuda``; anything else is a ValueError naming it,
    before any memory is page-locked."""
    from fastfp8 import pinned

    monkeypatch.setenv("FASTFP8_PINNED", "hugepages")
    with pytest.raises(ValueError, match="FASTFP8_PINNED must be one of thp, cuda, got 'hugepages'"):
        pinned._pinned(2 * MiB)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["thp", "cuda", "thp-fails"])
def test_pinned_staging_by_each_way(monkeypatch, mode):
    """Pinned staging memory: on transparent huge pages registered with CUDA (the default),
    from torch's pinned allocator (``FASTFP8_PINNED=cuda``, or where registering fails):
    page-locked either way, so that copies from it are asynchronous and exact, and freed
    after its release."""
    from fastfp8 import pinned

    calls = []
    real = pinned._huge_registered

    def huge(size):
        calls.append(size)
        if mode == "thp-fails":
            raise RuntimeError("cudaHostRegister: not permitted")
        return real(size)

    monkeypatch.setattr(pinned, "_huge_registered", huge)
    monkeypatch.setenv("FASTFP8_PINNED", "cuda" if mode == "cuda" else "thp")
    _settle()
    before = POOL.stats()["live"]
    buf = POOL.acquire(6 * MiB, pin=True)
    assert buf.is_pinned() and buf.numel() == 6 * MiB
    assert calls == ([] if mode == "cuda" else [6 * MiB])
    buf.copy_(torch.randint(0, 256, (6 * MiB,), dtype=torch.uint8))
    dev = torch.empty(6 * MiB, dtype=torch.uint8, device="cuda")
    dev.copy_(buf, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(dev.cpu(), buf)
    POOL.release(buf)
    del buf
    _settle()
    assert POOL.stats()["live"] == before
