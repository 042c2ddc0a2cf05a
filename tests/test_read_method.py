"""``method="auto"`` (the default): ``mmap`` when the reader threads quantize every weight
for a GPU; else ``pread`` when the checkpoint is in the page cache (the faster warm read),
``mmap`` when it is not (the faster cold read), decided once per load from sampled one-byte
``RWF_NOWAIT`` reads; explicit methods are taken as given."""

from __future__ import annotations

import time

import fastfp8
import pytest
from fastfp8 import engine
from fastfp8.bench import evict_page_cache as evict
from fastfp8.engine import CACHED_ENOUGH, resolve_method
from fastfp8.options import LoadOptions
from test_host_quant import llama, load, same_state


class _Probe:
    """A checkpoint whose page-cache share is ``fraction``; counts the probes."""

    def __init__(self, fraction):
        self.fraction = fraction
        self.calls = 0

    def cached_fraction(self, samples: int = 64):
        self.calls += 1
        return self.fraction


@pytest.mark.parametrize(("fraction", "want"), [(0.0, "mmap"), (CACHED_ENOUGH - 0.01, "mmap"),
                                                (CACHED_ENOUGH, "pread"), (1.0, "pread"),
                                                (None, "pread")])  # cannot say: the warm default
def test_auto_picks_by_the_page_cache(fraction, want):
    assert resolve_method(_Probe(fraction), LoadOptions.make()) == want


@pytest.mark.parametrize("fraction", [0.0, 1.0, None])
def test_auto_maps_when_the_host_quantizes_for_a_gpu(fraction):
    """The reader threads quantizing every weight for a GPU read in place in the page cache,
    warm or cold; for a CPU device, or the GPU quantizing, the page cache decides."""
    import torch

    host = LoadOptions.make(quantize_on="host")
    assert resolve_method(_Probe(fraction), host, torch.device("cuda", 0)) == "mmap"
    want = "mmap" if fraction == 0.0 else "pread"
    assert resolve_method(_Probe(fraction), host, torch.device("cpu")) == want
    for where in ("device", "adaptive", "split"):
        options = LoadOptions.make(quantize_on=where)
        assert resolve_method(_Probe(fraction), options, torch.device("cuda", 0)) == want


@pytest.mark.parametrize("method", ["pread", "mmap", "direct"])
def test_an_explicit_method_is_taken_as_given_without_probing(method):
    probe = _Probe(0.0)
    assert resolve_method(probe, LoadOptions.make(method=method)) == method
    assert probe.calls == 0


def settle_evicted(paths: list[str]) -> None:
    """Evicts the files again once the read-ahead that a cache probe may have started has
    landed: pages still being read when ``FADV_DONTNEED`` runs are not dropped."""
    evict(paths)
    time.sleep(0.5)
    evict(paths)


def load_seeing(monkeypatch, path, device, **kw):
    """A load and the page-cache verdicts its own probe gave (:func:`engine.is_warm`): what
    the load decided from, whatever the page cache held when the test last looked."""
    seen: list[bool] = []
    real = engine.is_warm
    monkeypatch.setattr(engine, "is_warm", lambda ckpt: seen.append(real(ckpt)) or seen[-1])
    state, stats = load(path, device, **kw)
    monkeypatch.setattr(engine, "is_warm", real)
    return state, stats, seen


def cold_load(monkeypatch, path, device, tries: int = 3):
    """A default load whose own probe found the checkpoint evicted, or a skip where the page
    cache here keeps (or brings back) the files after ``FADV_DONTNEED`` (a CI machine did, once
    in many runs, between the test's look and the load's)."""
    if fastfp8.open_checkpoint(path).cached_fraction() is None:
        pytest.skip("this kernel or file system has no RWF_NOWAIT: a load cannot see the files cold")
    paths = sorted(str(p) for p in path.glob("*.safetensors"))
    for _ in range(tries):
        settle_evicted(paths)
        state, stats, seen = load_seeing(monkeypatch, path, device)
        assert len(seen) == 1  # one probe per load
        if not seen[0]:
            return state, stats
    pytest.skip("the page cache here keeps the files after FADV_DONTNEED")


def test_a_default_load_reads_warm_with_pread_and_cold_with_mmap(tmp_path, monkeypatch):
    llama(tmp_path / "m")
    warm, stats, seen = load_seeing(monkeypatch, tmp_path / "m", "cpu")
    assert seen == [True]  # just written: in the page cache (or the kernel cannot say)
    assert (stats.method, stats.quantize_on) == ("pread", "host")
    cold, stats = cold_load(monkeypatch, tmp_path / "m", "cpu")
    assert (stats.method, stats.read_ahead) == ("mmap", 0)
    same_state(warm, cold)
    ref, _ = load(tmp_path / "m", "cpu", method="pread")
    same_state(ref, cold)


@pytest.mark.cuda
def test_a_default_load_on_a_gpu_quantizes_warm_on_the_host_and_cold_adaptively(tmp_path, monkeypatch):
    """``quantize_on="auto"`` on one GPU: every weight the host can take quantized by the
    reader threads in place in the page cache when the checkpoint is warm; ``"adaptive"``
    (read with ``mmap``) when it is not. The bytes are the device path's either way."""
    llama(tmp_path / "m")
    ref, _ = load(tmp_path / "m", "cuda", quantize_on="device")
    warm, stats, seen = load_seeing(monkeypatch, tmp_path / "m", "cuda")
    assert seen == [True]
    assert (stats.method, stats.quantize_on, stats.host_quantized) == ("mmap", "host", stats.quantized)
    same_state(warm, ref)
    cold, stats = cold_load(monkeypatch, tmp_path / "m", "cuda")
    assert (stats.method, stats.quantize_on, stats.read_ahead) == ("mmap", "adaptive", 0)
    assert 0 <= stats.host_quantized <= stats.quantized
    same_state(cold, ref)


@pytest.mark.parametrize(("given", "want"), [(0, 0), ("64MiB", 64 << 20), (4096, 4096)])
def test_read_ahead_option_parses_sizes(given, want):
    assert LoadOptions.make(read_ahead=given).read_ahead == want
    assert LoadOptions.make().read_ahead == 0  # off by default


@pytest.mark.parametrize("bad", ["-1", "lots", -5, True, None])
def test_a_bad_read_ahead_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="read_ahead"):
        LoadOptions.make(read_ahead=bad)


@pytest.mark.parametrize("method", ["mmap", "pread"])
def test_a_load_with_read_ahead_gives_the_same_bytes_cold_and_warm(tmp_path, method):
    """A window of one page (its thread a step ahead of the readers) and one past the whole
    checkpoint (everything asked for at once): the bytes of a load without read-ahead."""
    llama(tmp_path / "m")
    paths = sorted(str(p) for p in (tmp_path / "m").glob("*.safetensors"))
    ref, _ = load(tmp_path / "m", "cpu", method=method, read_ahead=0)
    for window in (4096, "1GiB"):
        evict(paths)
        got, stats = load(tmp_path / "m", "cpu", method=method, read_ahead=window)
        assert stats.read_ahead == LoadOptions.make(read_ahead=window).read_ahead
        same_state(ref, got)
