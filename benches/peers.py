"""Peer loaders for the fastfp8 load benchmark.

Every peer has the same contract::

    load_<peer>(paths, quantize, should_quantize, device="cuda") -> dict[str, Tensor]

It loads every tensor of the given safetensors shard files onto ``device``; a
tensor for which ``should_quantize(name, t)`` holds is replaced by
``name -> quantized weight`` and ``name + "_scale" -> scale`` (so
``x.weight`` gives ``x.weight_scale``), and the bf16 copy on the device is
dropped right after it was quantized, so that peak device memory is
comparable between peers.  Each peer imports its library lazily, and the
function returns only after the device has finished (``torch.cuda.synchronize``).

Peers (see ``PEERS``):

- ``safetensors_load_file``: ``safetensors.torch.load_file(path, device=...)``
  per shard (a whole bf16 shard lands on the device), then quantize.
- ``safetensors_safe_open``: ``safe_open(path, framework="pt", device="cpu")``
  and ``get_tensor(k).to(device)`` per tensor, then quantize.
- ``runai``: runai-model-streamer ``SafetensorsStreamer``: ``stream_files``
  of all shards into its CPU buffer (C++ reader threads), ``.to(device)`` of
  each yielded tensor (the pattern of its README), then quantize.
- ``fastsafetensors``: ``SafeTensorsFileLoader(SingleGroup(), dev,
  nogds=True)`` one shard at a time (``add_filenames`` ->
  ``copy_files_to_device`` -> ``get_tensor`` -> ``close``), as vLLM's
  single-process iterator does.  Its nogds reader opens files with O_DIRECT
  on local disks by default (the page cache is bypassed, so this is a cold
  read even when the files are cached).
- ``fastsafetensors_buffered``: the same with ``FASTSAFETENSORS_ODIRECT=0``
  (buffered reads, served by the page cache: the warm case).
- ``fastsafetensors_pipelined``: fastsafetensors' ``ParallelLoader`` (the
  producer/consumer pipeline vLLM now uses), nogds, zero-copy
  (``borrowed_tensors=True``, ``accumulate_resident=False``), read mode as
  for ``fastsafetensors``.
- ``instanttensor_buffered``: InstantTensor ``safe_open(paths, ...,
  backend=BackendPolicy.BUFFERED, copy=False)``, quantized inline (warm case).
- ``instanttensor_direct``: the same with InstantTensor's default backend
  (``[URING, AIO]``: O_DIRECT reads; the cold case).

Tensors that are kept unquantized are cloned where the peer hands out views
into its own staging memory (fastsafetensors' per-file buffers, InstantTensor's
ring buffer, runai's CPU buffer when ``device`` is the CPU), so that the result
owns its memory and the staging memory can be freed, as when a real loader
copies a weight into its parameter.

Run ``python benches/peers.py CKPT_DIR --check`` for a smoke test that loads
with each available peer and compares the results with ``safetensors_safe_open``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import importlib
import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from fastfp8.bench import evict_page_cache as evict_page_cache  # re-exported for bench_load

if TYPE_CHECKING:
    import torch

QuantizeFn = Callable[["torch.Tensor"], "tuple[torch.Tensor, torch.Tensor]"]
ShouldQuantizeFn = Callable[[str, "torch.Tensor"], bool]
PeerFn = Callable[..., "dict[str, torch.Tensor]"]

# What the last call of a peer chose (backend, buffer sizes, ...); for reports.
LAST_INFO: dict[str, object] = {}

# peer name -> the module whose import tells whether the peer is available
_PEER_MODULES: dict[str, str] = {
    "safetensors_load_file": "safetensors.torch",
    "safetensors_safe_open": "safetensors",
    "runai": "runai_model_streamer",
    "fastsafetensors": "fastsafetensors",
    "fastsafetensors_buffered": "fastsafetensors",
    "fastsafetensors_pipelined": "fastsafetensors",
    "instanttensor_buffered": "instanttensor",
    "instanttensor_direct": "instanttensor",
}
_CUDA_ONLY = {"instanttensor_buffered", "instanttensor_direct"}

#: the pause after emptying torch's cache before a timed load (every loader alike):
#: host-to-device copies issued right after device memory is freed ran at 22 - 35 GB/s for
#: their first 10 ms on an H200, 52 - 54 after a pause (``probe_h2d_ramp.py``), a cost a
#: process's own load does not pay (``bench_load.py --settle-s``)
SETTLE_S = 0.5


# --------------------------------------------------------------------------
# helpers


def _device(device: str | torch.device) -> torch.device:
    """A torch.device with an explicit index for CUDA ("cuda" -> "cuda:N")."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _sync(dev: torch.device) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _put(
    out: dict[str, torch.Tensor],
    name: str,
    t: torch.Tensor,
    quantize: QuantizeFn,
    should_quantize: ShouldQuantizeFn,
    *,
    clone_kept: bool = False,
) -> None:
    """Store ``t`` (already on the device) in ``out``, quantized or as is."""
    if should_quantize(name, t):
        q, s = quantize(t)
        out[name] = q
        out[name + "_scale"] = s
    else:
        out[name] = t.clone() if clone_kept else t


def _to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """``t.to(dev)``; a real copy also when ``t`` already lies on ``dev``.

    Only the CPU smoke test hits the copy branch (the source tensors there are
    views of a reader's buffer or of an mmap that the result must not share).
    """
    if t.device == dev:
        return t.clone()
    return t.to(dev)


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Set (or, for None, leave alone) an environment variable for a block."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# --------------------------------------------------------------------------
# (a) safetensors.torch.load_file


def load_safetensors_load_file(
    paths: list[str],
    quantize: QuantizeFn,
    should_quantize: ShouldQuantizeFn,
    device: str = "cuda",
) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file(path, device=device)`` per shard, then quantize.

    The whole bf16 shard is on the device before its first tensor is
    quantized; each bf16 tensor is dropped right after quantizing it.
    """
    from safetensors.torch import load_file

    dev = _device(device)
    out: dict[str, torch.Tensor] = {}
    for path in paths:
        shard = load_file(path, device=str(dev))
        for name in list(shard):
            t = shard.pop(name)
            _put(out, name, t, quantize, should_quantize, clone_kept=dev.type == "cpu")
            del t
        del shard
    _sync(dev)
    LAST_INFO.clear()
    LAST_INFO.update(peer="safetensors_load_file")
    return out


# --------------------------------------------------------------------------
# (b) safetensors safe_open on the CPU + .to(device)


def load_safetensors_safe_open(
    paths: list[str],
    quantize: QuantizeFn,
    should_quantize: ShouldQuantizeFn,
    device: str = "cuda",
) -> dict[str, torch.Tensor]:
    """``safe_open(path, framework="pt", device="cpu")``, ``get_tensor(k).to(device)``."""
    from safetensors import safe_open

    dev = _device(device)
    out: dict[str, torch.Tensor] = {}
    for path in paths:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is no dict)
                t = _to_device(f.get_tensor(name), dev)
                _put(out, name, t, quantize, should_quantize)
                del t
    _sync(dev)
    LAST_INFO.clear()
    LAST_INFO.update(peer="safetensors_safe_open")
    return out


# --------------------------------------------------------------------------
# (c) runai-model-streamer


def load_runai(
    paths: list[str],
    quantize: QuantizeFn,
    should_quantize: ShouldQuantizeFn,
    device: str = "cuda",
) -> dict[str, torch.Tensor]:
    """runai-model-streamer: ``SafetensorsStreamer().stream_files(paths)``.

    Its C++ threads (``RUNAI_STREAMER_CONCURRENCY``, default 16) read the
    shards into one pageable CPU buffer (up to ``RUNAI_STREAMER_MEMORY_LIMIT``
    bytes, default 40 GB, so all of a 16 GiB checkpoint); ``get_tensors()``
    yields each tensor as soon as it is read, as a view of that buffer, and
    we move it with ``.to(device)`` as its README does.  (Its
    ``stream_files(device="cuda")`` does the same ``.to`` per tensor inside.)
    """
    from runai_model_streamer import SafetensorsStreamer

    dev = _device(device)
    out: dict[str, torch.Tensor] = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(list(paths))
        for name, t_cpu in streamer.get_tensors():
            t = _to_device(t_cpu, dev)
            _put(out, name, t, quantize, should_quantize)
            del t, t_cpu
    _sync(dev)
    LAST_INFO.clear()
    LAST_INFO.update(
        peer="runai",
        concurrency=os.environ.get("RUNAI_STREAMER_CONCURRENCY", "16 (default)"),
        memory_limit=os.environ.get("RUNAI_STREAMER_MEMORY_LIMIT", "40000000000 (default)"),
    )
    return out


# --------------------------------------------------------------------------
# (d) fastsafetensors


def _fst_odirect(odirect: bool | None) -> str | None:
    return None if odirect is None else ("1" if odirect else "0")


def load_fastsafetensors(
    paths: list[str],
    quantize: QuantizeFn,
    should_quantize: ShouldQuantizeFn,
    device: str = "cuda",
    *,
    odirect: bool | None = None,
    files_per_batch: int = 1,
    max_threads: int = 16,
    bbuf_size_kb: int = 16 * 1024,
) -> dict[str, torch.Tensor]:
    """fastsafetensors 0.5 ``SafeTensorsFileLoader`` with ``nogds=True``.

    ``files_per_batch`` shards are read into one device buffer per shard
    (``copy_files_to_device``), their tensors are taken with
    ``fb.get_tensor`` (zero-copy views into that buffer), quantized, and the
    buffers released (``fb.close(); loader.close()``) before the next batch:
    vLLM's single-process loop, with batches of one file.  A larger batch puts
    more bf16 bytes on the device at once.

    ``odirect``: fastsafetensors' nogds reader opens files with O_DIRECT on
    local file systems by default, which bypasses the page cache (a warm run
    then reads the disk).  ``odirect=False`` sets ``FASTSAFETENSORS_ODIRECT=0``
    (buffered reads, served from the page cache); None keeps its default.
    """
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    dev = _device(device)
    out: dict[str, torch.Tensor] = {}
    clone_kept = True  # a kept view would pin its whole file buffer
    with _env("FASTSAFETENSORS_ODIRECT", _fst_odirect(odirect)):
        for i in range(0, len(paths), files_per_batch):
            batch = list(paths[i : i + files_per_batch])
            loader = SafeTensorsFileLoader(
                SingleGroup(),
                str(dev),
                nogds=True,
                max_threads=max_threads,
                bbuf_size_kb=bbuf_size_kb,
            )
            try:
                loader.add_filenames({0: batch})
                fb = loader.copy_files_to_device()
                try:
                    for name in list(fb.key_to_rank_lidx.keys()):
                        t = fb.get_tensor(name)
                        _put(out, name, t, quantize, should_quantize, clone_kept=clone_kept)
                        del t
                    _sync(dev)  # the quantize kernels read the file buffer
                finally:
                    fb.close()
            finally:
                loader.close()
    _sync(dev)
    LAST_INFO.clear()
    LAST_INFO.update(
        peer="fastsafetensors",
        odirect=odirect,  # None: FASTSAFETENSORS_ODIRECT if set, else O_DIRECT on local disks
        files_per_batch=files_per_batch,
        max_threads=max_threads,
    )
    return out


def load_fastsafetensors_pipelined(
    paths: list[str],
    quantize: QuantizeFn,
    should_quantize: ShouldQuantizeFn,
    device: str = "cuda",
    *,
    odirect: bool | None = None,
    queue_size: int = 0,
    max_threads: int = 16,
    borrowed: bool = True,
) -> dict[str, torch.Tensor]:
    """fastsafetensors 0.5 ``ParallelLoader`` (nogds): a producer thread reads
    the next shard while the consumer takes tensors of the current one.

    ``borrowed=True`` passes ``borrowed_tensors=True`` with
    ``accumulate_resident=False``: views into the load buffers (no per-tensor
    clone); each is consumed (quantized, or cloned if kept) and the device
    synchronized before the next one is asked for, as that mode requires.
    ``borrowed=False`` takes its default owning tensors (one device-to-device
    clone per tensor, no synchronization).  ``odirect`` as in
    ``load_fastsafetensors``.
    """
    from fastsafetensors import ParallelLoader

    dev = _device(device)
    out: dict[str, torch.Tensor] = {}
    with _env("FASTSAFETENSORS_ODIRECT", _fst_odirect(odirect)):
        pl = ParallelLoader(
            None,
            list(paths),
            queue_size=queue_size,
            use_tqdm_on_load=False,
            device=str(dev),
            nogds=True,
            max_threads=max_threads,
            accumulate_resident=not borrowed,
            borrowed_tensors=borrowed,
        )
        try:
            it = pl.iterate_weights()
            with contextlib.closing(it):
                for name, t in it:
                    _put(out, name, t, quantize, should_quantize, clone_kept=borrowed)
                    del t
                    if borrowed:
                        # the device work that reads a borrowed view must be
                        # done before the iterator may free its batch
                        _sync(dev)
        finally:
            pl.close()
    _sync(dev)
    LAST_INFO.clear()
    LAST_INFO.update(
        peer="fastsafetensors_pipelined",
        odirect=odirect,
        queue_size=queue_size,
        borrowed=borrowed,
    )
    return out


# --------------------------------------------------------------------------
# (e) InstantTensor


def load_instanttensor(
    paths: list[str],
    quantize: QuantizeFn,
    should_quantize: ShouldQuantizeFn,
    device: str = "cuda",
    *,
    buffered: bool = True,
    copy: bool = False,
    **open_kwargs: object,
) -> dict[str, torch.Tensor]:
    """InstantTensor 0.2 ``safe_open(paths, framework="pt", device=..., copy=...)``.

    All shards go to one ``safe_open`` (its README: better than one call per
    file).  ``buffered=True`` passes ``backend=BackendPolicy.BUFFERED``
    (= ``[URING_BUFFERED, MMAP]``: page-cache reads, the warm case);
    ``buffered=False`` passes ``backend=None``, i.e. ``INSTANTTENSOR_BACKEND``
    if set, else its default ``[URING, AIO]`` (O_DIRECT; ``MMAP`` on tmpfs).
    With ``copy=False`` tensors are views of its GPU ring buffer, which is
    reused after each yield (``tensors()`` synchronizes the current stream
    before the next yield), so they are quantized inline and kept ones cloned.
    Its ring buffer is a cudaMalloc of its own, not PyTorch's allocator:
    ``torch.cuda.max_memory_allocated`` does not see it (``LAST_INFO`` has
    its size).  Extra ``open_kwargs`` (``buffer_size``, ``io_depth``,
    ``chunk_size``, ...) go to ``safe_open``.
    """
    from instanttensor import BackendPolicy, safe_open

    dev = _device(device)
    if dev.type != "cuda":
        raise ValueError("InstantTensor loads to CUDA devices only")
    backend = BackendPolicy.BUFFERED if buffered else None
    out: dict[str, torch.Tensor] = {}
    # safe_open sorts the list it is given in place: hand it a copy.  Its
    # warning that copy=False views are overwritten later is moot here: each
    # tensor is consumed before the next one is asked for.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="copy=False with buffer_size")
        opened = safe_open(list(paths), framework="pt", device=dev, copy=copy, backend=backend, **open_kwargs)
    with opened as f:
        info = {
            "backend": f.backend.name,
            "buffer_size": f.buffer_size,
            "io_depth": f.io_depth,
            "chunk_size": f.chunk_size,
            "total_tensor_size": f.total_tensor_size,
        }
        for name, t in f.tensors():
            _put(out, name, t, quantize, should_quantize, clone_kept=not copy)
            del t
        _sync(dev)
    LAST_INFO.clear()
    LAST_INFO.update(peer="instanttensor", buffered=buffered, copy=copy, **info)
    return out


def load_instanttensor_buffered(
    paths: list[str],
    quantize: QuantizeFn,
    should_quantize: ShouldQuantizeFn,
    device: str = "cuda",
) -> dict[str, torch.Tensor]:
    """InstantTensor, ``backend=BackendPolicy.BUFFERED``, ``copy=False`` (warm case)."""
    return load_instanttensor(paths, quantize, should_quantize, device, buffered=True, copy=False)


def load_instanttensor_direct(
    paths: list[str],
    quantize: QuantizeFn,
    should_quantize: ShouldQuantizeFn,
    device: str = "cuda",
) -> dict[str, torch.Tensor]:
    """InstantTensor, its default direct-I/O backend, ``copy=False`` (cold case)."""
    return load_instanttensor(paths, quantize, should_quantize, device, buffered=False, copy=False)


def load_fastsafetensors_buffered(
    paths: list[str],
    quantize: QuantizeFn,
    should_quantize: ShouldQuantizeFn,
    device: str = "cuda",
) -> dict[str, torch.Tensor]:
    """fastsafetensors per-file loader with buffered reads (FASTSAFETENSORS_ODIRECT=0)."""
    return load_fastsafetensors(paths, quantize, should_quantize, device, odirect=False)


# --------------------------------------------------------------------------
# registry


PEERS: dict[str, PeerFn] = {
    "safetensors_load_file": load_safetensors_load_file,
    "safetensors_safe_open": load_safetensors_safe_open,
    "runai": load_runai,
    "fastsafetensors": load_fastsafetensors,
    "fastsafetensors_buffered": load_fastsafetensors_buffered,
    "fastsafetensors_pipelined": load_fastsafetensors_pipelined,
    "instanttensor_buffered": load_instanttensor_buffered,
    "instanttensor_direct": load_instanttensor_direct,
}


def available_peers(device: str = "cuda") -> list[str]:
    """Names of the peers whose library imports here (and that support ``device``)."""
    dev_type = device.split(":")[0]
    names = []
    for name in PEERS:
        if dev_type != "cuda" and name in _CUDA_ONLY:
            continue
        try:
            importlib.import_module(_PEER_MODULES[name])
        except Exception:  # ImportError, or a broken native library
            continue
        names.append(name)
    return names


def shard_paths(ckpt_dir: str) -> list[str]:
    """The shard files of a HF checkpoint directory, in index order."""
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(ckpt_dir, p) for p in files]
    return sorted(glob.glob(os.path.join(ckpt_dir, "*.safetensors")))


# --------------------------------------------------------------------------
# defaults for the smoke test (the benchmark passes its own functions)


def default_should_quantize(name: str, t: torch.Tensor) -> bool:
    """2-D ``*.weight`` of linear layers; not embeddings, lm_head, norms, routers."""
    if t.dim() != 2 or not name.endswith(".weight"):
        return False
    skip = ("embed_tokens", "lm_head", "norm", "router", "mlp.gate.weight")
    return not any(s in name for s in skip)


def reference_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager per-output-channel FP8 e4m3 (scale math in the weight's dtype, as
    compressed-tensors does; scale shape [out, 1]).  For smoke tests only."""
    import torch

    amax = w.abs().amax(dim=-1, keepdim=True)
    scale = amax / 448.0
    scale = torch.where(scale == 0, torch.finfo(w.dtype).eps, scale)
    q = (w / scale).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale


# --------------------------------------------------------------------------
# smoke test / quick timing


class _PeakSampler:
    """Device-wide used memory, sampled in a thread (sees non-PyTorch
    allocations such as InstantTensor's ring buffer).  NVML if present."""

    def __init__(self, dev: torch.device, period_s: float = 0.002) -> None:
        self.dev = dev
        self.period_s = period_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read: Callable[[], int] | None = None

    def __enter__(self) -> _PeakSampler:
        if self.dev.type != "cuda":
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(self.dev.index or 0)
            self._read = lambda: int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
        except Exception:
            import torch

            def read() -> int:
                free, total = torch.cuda.mem_get_info(self.dev)
                return int(total - free)

            self._read = read
        self.base = self._read()
        self.peak = self.base

        def loop() -> None:
            assert self._read is not None
            while not self._stop.is_set():
                self.peak = max(self.peak, self._read())
                time.sleep(self.period_s)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            assert self._read is not None
            self.peak = max(self.peak, self._read())


def _nbytes(paths: list[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt_dir")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peers", default="all", help="comma-separated names, or 'all'")
    ap.add_argument("--check", action="store_true", help="compare with safetensors_safe_open")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cold", action="store_true", help="evict the page cache before each run")
    args = ap.parse_args(argv)

    paths = shard_paths(args.ckpt_dir)
    nbytes = _nbytes(paths)
    dev = _device(args.device)
    avail = available_peers(args.device)
    names = avail if args.peers == "all" else args.peers.split(",")
    print(f"{len(paths)} shards, {nbytes / 2**30:.2f} GiB; available: {', '.join(avail)}")

    ref = None
    if args.check:
        ref = {
            k: v.cpu()
            for k, v in PEERS["safetensors_safe_open"](
                paths, reference_quantize, default_should_quantize, str(dev)
            ).items()
        }
    failed = False
    for name in names:
        for _ in range(args.repeat):
            if args.cold:
                evict_page_cache(paths)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                time.sleep(SETTLE_S)
                torch.cuda.reset_peak_memory_stats(dev)
            with _PeakSampler(dev) as sampler:
                t0 = time.perf_counter()
                try:
                    res = PEERS[name](paths, reference_quantize, default_should_quantize, str(dev))
                except Exception as e:
                    print(f"{name:28s} FAILED: {type(e).__name__}: {e}")
                    failed = True
                    break
                dt = time.perf_counter() - t0
            line = f"{name:28s} {dt:7.3f} s {nbytes / dt / 1e9:7.2f} GB/s"
            if dev.type == "cuda":
                line += (
                    f"  torch peak {torch.cuda.max_memory_allocated(dev) / 2**30:6.2f} GiB"
                    f"  device peak +{(sampler.peak - sampler.base) / 2**30:6.2f} GiB"
                )
            print(line, dict(LAST_INFO))
            if ref is not None:
                bad = [
                    k
                    for k in ref
                    if k not in res
                    or not torch.equal(
                        ref[k].view(torch.uint8) if ref[k].dtype == torch.float8_e4m3fn else ref[k],
                        res[k].cpu().view(torch.uint8) if res[k].dtype == torch.float8_e4m3fn else res[k].cpu(),
                    )
                ]
                extra = sorted(set(res) - set(ref))
                if bad or extra:
                    failed = True
                    print(f"  MISMATCH: {len(bad)} differ or missing (e.g. {bad[:3]}), extra {extra[:3]}")
                else:
                    print(f"  check ok: {len(ref)} tensors identical")
            del res
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
