"""The one load engine: reader -> pinned ring -> copy stream -> quantize on the compute
stream -> a sink. Every entry point (``load_quantized``, ``convert``, the vLLM plugin,
``build_quantized_model``) runs a :class:`fastfp8.plan.Plan` through :func:`run`.

On CUDA, all overlapped:

1. The native reader copies the planned byte ranges on its own threads (no GIL) into pinned
   host slots carved from one ``memory_budget``-sized pool buffer, in plan order.
2. Each chunk goes host-to-device on a copy stream (queued through the CUDA driver:
   :mod:`fastfp8.driver_copy`), straight into its output (tensors kept as they are) or into
   one of two device staging buffers (tensors to quantize). The slot is released once its
   copy's event has completed.
3. When a job's last chunk has landed, the compute stream waits for that copy and runs the
   fused quantization kernel from staging into the outputs. The copy stream reuses a
   staging buffer only after the quantization that read it is done, so reading the next
   tensor never waits for the previous tensor's quantization.

Outputs come from the sink (:class:`StateSink`: each tensor allocated once at its final
size when its first bytes arrive, so allocation overlaps with reading, from one segment
the caching allocator holds for them all (:func:`reserve_device_memory`);
:class:`StreamSink`: fresh tensors per job, handed to the caller). :func:`run` yields
``(job, tensors)`` as each job is done (on CUDA: enqueued, with the caller's stream made
to wait for it), so the caller can write, assign or keep them. Device memory at peak is
the outputs plus two staging buffers of the largest job quantized.

Quantization on the host (``quantize_on="host"``, ``"split"``, ``"adaptive"``; ``"auto"`` is
``"host"`` on a CPU device, and on one GPU ``"host"`` for a checkpoint in the page cache and
``"adaptive"`` for one that is not): the reader threads quantize rows as
they read them (:mod:`fastfp8.host_quant` says which and how). Tensor parallelism on the
device path: row-parallel slices all-reduce their per-row amax (MAX) over the group on the
quantization stream (NCCL queues it there without blocking the host).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from . import driver_copy, host
from .checkpoint import Checkpoint, ChunkReader
from .errors import NonFiniteWeightError
from .host_quant import (
    bytes_view,
    chunk_pieces,
    empty_slice_scales,
    host_quant_specs,
    optional_items,
    reader_item,
    reduced_row_amax,
    resolve_quantize_on,
)
from .options import LoadOptions
from .plan import FP8, Job, Plan
from .quant import quantize_channelwise, resolve_rounding
from .tensor_parallel import all_reduce_absmax
from .units import TQDM_BYTES

#: names of points where the tests inject faults (``FAULT_HOOK``): "allocate", "copy",
#: "quantize", "yield", "finish"
FAULT_POINTS = ("allocate", "copy", "quantize", "yield", "finish")
FAULT_HOOK = None  # tests: a callable(point: str, job) raising to simulate a fault there


def _fault(point: str, job: Job | None) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(point, job)


@dataclass
class LoadStats:
    """What a load did and how fast."""

    seconds: float = 0.0
    bytes_read: int = 0
    tensors: int = 0
    quantized: int = 0
    #: of ``quantized``: how many were quantized by the reader threads on the host
    host_quantized: int = 0
    memory_budget: int = 0
    chunk_bytes: int = 0
    peak_in_flight: int = 0
    threads: int = 0
    #: the read method
    method: str = ""
    #: bytes the page cache was asked to read ahead of the reader threads (0: none)
    read_ahead: int = 0
    #: where weights were quantized, ``quantize_on`` resolved ("host", "device", "split",
    #: "adaptive")
    quantize_on: str = ""
    device: str = ""
    non_finite: list[str] = field(default_factory=list)
    #: seconds spent in each phase: "setup" (open, plan, allocate; of it "plan": the
    #: checkpoint opened and the plan made before the engine starts (``load_quantized``), "resolve": the
    #: engine's options resolved (the page cache asked how warm the checkpoint is, the
    #: progress bar), "reader": the reader opened (host quantization's specs, its threads
    #: started, its ring), of that "pin": the pinned ring from the pool, page-locked when
    #: new), "read_wait" (waiting
    #: for the reader), "copy_wait" (waiting for host-to-device copies to free slots),
    #: on CUDA the consumer thread's own work: "issue" (each chunk: outputs allocated, its
    #: copy queued), "job_end" (each job's end: the quantization launched, events), of it
    #: "launch" (the quantization call alone: Triton's launch), "alloc" (of "issue": the
    #: outputs' allocation at each job's first chunk; of it "reserve": the device memory
    #: for all of them, up front), "release" (finished copies' chunks handed back to the
    #: reader, "copy_wait" included), "caller" (the caller's time between jobs); "drain",
    #: "finish" (draining the streams, the finiteness check of the scales the reader
    #: threads did not write; of it "finish_copy" and "finish_sync": queueing their copies
    #: and waiting for them); tensor parallelism: "reduce" (of "launch": the all-reduce
    #: calls of row-parallel maxima); "room_wait": the reader threads' time idle for want of
    #: room in the ring (the consumer had not released enough), per thread
    phases: dict[str, float] = field(default_factory=dict)
    #: with :data:`TIMELINE` on: each chunk's ``(item, src_len, alloc_ns, read_ns, deliver_ns,
    #: release_ns)`` (:meth:`fastfp8.checkpoint.ChunkReader.chunk_times`)
    timeline: list[tuple[int, int, int, int, int, int]] | None = None

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0


def resolve_device(device: str | torch.device) -> torch.device:
    """A concrete device; a CUDA device on a machine without one is a clear error."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            from .errors import Error

            raise Error(f"device={str(device)!r} but torch sees no CUDA GPU on this machine "
                        f"(torch {torch.__version__}); pass device='cpu' to load on the CPU")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# ---------------------------------------------------------------------------------------
# sinks


class StateSink:
    """Outputs of ``load_quantized``: each output tensor allocated once at its final size
    (fused experts ``[E, out, in]``, filled one expert at a time)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.state: dict[str, torch.Tensor] = {}

    def reserve(self, plan: Plan) -> None:
        """On CUDA, before the first output: :func:`reserve_device_memory` for every
        output of ``plan`` that torch's caching allocator takes from its large pool, so that
        the load allocates them from one segment instead of one ``cudaMalloc`` each."""
        if self.device.type == "cuda" and RESERVE_OUTPUTS:
            reserve_device_memory(self.device, [o.nbytes for o in plan.state_outputs()])

    def outputs(self, job: Job) -> list[torch.Tensor]:
        t = job.target
        if job.first:
            if t.quantized:
                self.state[t.weight_name] = torch.empty(job.out_shape, dtype=FP8, device=self.device)
                self.state[t.scale_name] = torch.empty((*job.out_shape[:-1], 1), dtype=job.dtype, device=self.device)
            else:
                self.state[t.weight_name] = torch.empty(job.out_shape, dtype=job.dtype, device=self.device)
        if not t.quantized:
            return [self.state[t.weight_name]]
        q, s = self.state[t.weight_name], self.state[t.scale_name]
        return [q, s] if job.expert is None else [q[job.expert], s[job.expert]]


class StreamSink:
    """Fresh output tensors for every job (the caller keeps or drops them)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reserve(self, plan: Plan) -> None:
        """Nothing: the caller frees each job's tensors as it goes."""

    def outputs(self, job: Job) -> list[torch.Tensor]:
        if not job.quantized:
            return [torch.empty(job.shape, dtype=job.dtype, device=self.device)]
        shape = job.quantized_shape()
        return [torch.empty(shape, dtype=FP8, device=self.device),
                torch.empty((shape[0], 1), dtype=job.dtype, device=self.device)]


#: :meth:`StateSink.reserve` on (tests and ``benches/probe_pipeline.py`` turn it off)
RESERVE_OUTPUTS = True

#: torch's caching allocator serves requests above this from its large pool (``kSmallSize``),
#: in multiples of 512 bytes (``kMinBlockSize``)
_SMALL_POOL_MAX = 1 << 20
_BLOCK = 512


def reserve_device_memory(device: torch.device, sizes: list[int]) -> bool:
    """Makes torch's caching allocator hold one free segment large enough for the tensors
    of ``sizes`` that come from its large pool (one ``cudaMalloc``, freed back into its
    cache on the current stream), so that allocating them one by one finds cached memory
    instead of calling ``cudaMalloc`` for each: on an H200 that took 45 - 50 ms of a 0.34 s
    load of a 16 GB checkpoint (``stats.phases["alloc"]``). Peak memory is unchanged (the
    segment is what the tensors take anyway). Does nothing, and returns False, when torch's
    native allocator is not in use, when its cache already holds that much free memory, or
    when the device has not that much free memory to spare (the tensors are then allocated
    one by one as before)."""
    total = sum(-(-n // _BLOCK) * _BLOCK for n in sizes if n > _SMALL_POOL_MAX)
    if not total:
        return False
    try:
        if torch.cuda.memory.get_allocator_backend() != "native":
            return False
        cached_free = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if cached_free >= total:
            return False
        free, _ = torch.cuda.mem_get_info(device)
        if free < total + RESERVE_HEADROOM:
            return False
        block = torch.empty(total, dtype=torch.uint8, device=device)
    except (RuntimeError, torch.cuda.OutOfMemoryError):
        return False
    del block
    return True


#: device memory :func:`reserve_device_memory` leaves free beside its segment
RESERVE_HEADROOM = 1 << 30


# ---------------------------------------------------------------------------------------


class _NoBar:
    """What :func:`progress_bar` gives when no bar is shown: a disabled tqdm costs about a
    millisecond to make on a process's first load (its locks, its monitor thread)."""

    disable = True

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool | None, desc: str = "fastfp8"):
    """A tqdm bar in binary units on stderr (default: when stderr is a terminal)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, smoothing=0.1, **TQDM_BYTES)


#: reader threads of a direct (cold) read when ``threads`` is not set: each keeps one
#: ``piece_bytes`` request in flight, so more threads make a deeper disk queue
DIRECT_THREADS = 32


#: chunks of one tensor that are read before the consumer asks for them come as one
#: delivery of up to ``memory_budget // MERGE_SHARE`` bytes: one copy and one event instead
#: of several (0: never merge). Off: on H200 machines, loads without merging were faster in
#: two runs (48.7 against 44.5 GB/s, medians of 5, round robin; 50.2 - 52.5 against 43.3 -
#: 47.5 in bench_load.py): a merged delivery holds its whole span of the ring until its last
#: byte has crossed the bus (benches/NOTES.md)
MERGE_SHARE = 0

#: the consumer queues each chunk's copy through the CUDA driver (:mod:`fastfp8.driver_copy`)
#: instead of ``Tensor.copy_``: its copies took 32 instead of 72 ms of a 0.33 s load on an
#: H200 machine (tests and ``benches/probe_pipeline.py`` compare the two)
DRIVER_COPY = True

#: keep each chunk's course through the ring in ``LoadStats.timeline`` (probes:
#: ``benches/probe_pipeline.py --timeline``)
TIMELINE = False

#: ``method="auto"`` reads with ``pread`` when at least this share of the checkpoint is cached
CACHED_ENOUGH = 0.5


def is_warm(ckpt: Checkpoint) -> bool:
    """Whether at least :data:`CACHED_ENOUGH` of ``ckpt`` is in the page cache (True where
    the kernel cannot say)."""
    cached = ckpt.cached_fraction()
    return cached is None or cached >= CACHED_ENOUGH


def resolve_method(ckpt: Checkpoint, options: LoadOptions, device: torch.device | None = None, *,
                   warm: bool | None = None) -> str:
    """The read method of a load: ``options.method``, or for ``"auto"``: ``"mmap"`` when the
    reader threads quantize every weight they can for a GPU (``options.quantize_on`` resolved
    to ``"host"``: they quantize in place in the page cache, no copy, and a cold read takes
    the page cache's read-ahead; on four H200 machines 60.4 against 51.2 GB/s with ``pread``
    on one, within 3% on two, 12% behind on one); else ``"pread"`` when the checkpoint is
    warm (:func:`is_warm`, unless ``warm`` says) and ``"mmap"`` when it is not: with the GPU
    quantizing, pread was the faster warm read on the H200 machine (40.1 against 33.3 GB/s)
    and mmap the faster cold one (1.70 against 1.50 GB/s)."""
    if options.method != "auto":
        return options.method
    if options.quantize_on == "host" and device is not None and device.type == "cuda":
        return "mmap"
    return "pread" if (is_warm(ckpt) if warm is None else warm) else "mmap"


#: ``quantize_on="adaptive"`` on CUDA: the reader weighs each weight's side by the balance of
#: its threads' work and the bus's (:func:`bus_bytes_per_s`; ``FASTFP8_ADAPTIVE_BALANCE=1``)
#: instead of by the threads' idle time alone (the default). Off: on two H200 machines the
#: balance kept more weights on the device and loaded slower (49.7 against 53.4 GB/s, medians
#: of 5, round robin; 49.6 against 51.5 in bench_load.py): the model counts the threads' and
#: the bus's time, not the pipeline's waits between them (``benches/NOTES.md``)
ADAPTIVE_BALANCE = os.environ.get("FASTFP8_ADAPTIVE_BALANCE", "0") == "1"

#: of the bus's measured host-to-device rate, what the consumer moves on (copying only, an
#: H200 machine's load moved 49.6 GB/s where its bus measured 55.4)
BUS_SHARE = 0.9
BUS_PROBE_BYTES = 32 << 20


@functools.cache
def _bus_rate(index: int) -> float:
    dev = torch.device("cuda", index)
    src = torch.empty(BUS_PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(BUS_PROBE_BYTES, dtype=torch.uint8, device=dev)
    stream = torch.cuda.Stream(dev)
    best = float("inf")
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    return BUS_PROBE_BYTES / best


def bus_bytes_per_s(device: torch.device) -> float:
    """The rate at which a load moves bytes from the pinned ring to ``device``: its bus's
    host-to-device rate (pinned copies of 32 MiB, best of 3, measured once per process and
    device) times :data:`BUS_SHARE`; ``FASTFP8_BUS_GBPS`` sets it instead (GB/s)."""
    env = os.environ.get("FASTFP8_BUS_GBPS")
    if env:
        try:
            gbps = float(env)
        except ValueError:
            gbps = float("nan")
        if not 0 < gbps < float("inf"):
            raise ValueError(f"FASTFP8_BUS_GBPS must be a positive number of GB/s, got {env!r}")
        return gbps * 1e9
    return _bus_rate(device.index if device.index is not None else torch.cuda.current_device()) * BUS_SHARE


def reader_threads(options: LoadOptions) -> int | None:
    """The reader's thread count: ``options.threads``; else :data:`DIRECT_THREADS` for
    ``method="direct"`` and the native default (the cores but one, at most 16) otherwise."""
    if options.threads is None and options.method == "direct":
        return DIRECT_THREADS
    return options.threads


def open_reader(ckpt: Checkpoint, plan: Plan, options: LoadOptions, device: torch.device,
                rounding: str, *, interleave: bool = False) -> tuple[ChunkReader, list, dict[int, torch.Tensor]]:
    """The reader of ``plan`` for ``device`` (``options.method`` resolved): which jobs the
    reader threads quantize (``specs``, one per job, None for the device's; ``"auto"``
    resolved by :func:`~fastfp8.host_quant.resolve_quantize_on`), the all-reduced
    row maxima of row-parallel ones (``amax``, by job index), and the :class:`ChunkReader`
    over every item, the caller's to close (a job with a spec that the threads may leave to
    the device, ``quantize_on="adaptive"``: ``reader.quantized(i)`` says, before its first
    chunk). ``interleave`` (a consumer that takes them): the kept tensors that
    :func:`background_items` names come spread between the others' chunks. :func:`run`
    consumes it; ``benches/bench_load.py`` drains one with no copy or kernel behind it, to
    measure what the readers alone deliver."""
    tp_size = plan.tp.size if plan.tp else 1
    # on the GPU's NUMA node: the reader threads (which inherit the mask, and whose default
    # count follows it) and the pinned ring (first touched here)
    with host.on_cpus(host.reader_cpus(device)):
        options = resolve_quantize_on(options, device, tp_size).staged()
        specs = host_quant_specs(plan.jobs, options, rounding, device, tp_size=tp_size)
        amax = reduced_row_amax(ckpt, plan, specs, options, device, reader_threads(options))
        items = [reader_item(name, segs, job, sp, amax.get(i))
                 for i, ((name, segs), job, sp) in enumerate(zip(plan.items, plan.jobs, specs, strict=True))]
        optional = optional_items(specs, options)
        bus = bus_bytes_per_s(device) if optional and device.type == "cuda" and ADAPTIVE_BALANCE else 0.0
        background = background_items(plan, specs, options, device) if interleave else []
        reader = ChunkReader(ckpt, items, memory_budget=options.memory_budget, chunk_bytes=options.chunk_bytes,
                             threads=reader_threads(options), method=options.method, piece_bytes=options.piece_bytes,
                             pin=device.type == "cuda",
                             merge_bytes=options.memory_budget // MERGE_SHARE if MERGE_SHARE else 0,
                             optional=optional, bus_bytes_per_s=bus, read_ahead=options.read_ahead,
                             background=background)
    return reader, specs, amax


#: a kept tensor of at least this many bytes goes out in the background (:func:`background_items`)
BACKGROUND_MIN = 64 << 20


def background_items(plan: Plan, specs: list, options: LoadOptions, device: torch.device) -> list[int]:
    """The jobs whose chunks the reader spreads between the other jobs' chunks: on a GPU,
    with every weight quantized by the reader threads (``quantize_on="host"``, the warm
    default) and no read-ahead, the tensors kept as they are of at least
    :data:`BACKGROUND_MIN` bytes (a model's embeddings and lm_head: their bytes cross the bus
    at full size, and in their place in the plan they hold the ring while the threads wait;
    spread out, they cross it while the threads quantize and the bus has room)."""
    if device.type != "cuda" or options.quantize_on != "host" or options.read_ahead or not BACKGROUND:
        return []
    return [i for i, (j, sp) in enumerate(zip(plan.jobs, specs, strict=True))
            if sp is None and not j.quantized and j.nbytes >= BACKGROUND_MIN]


#: :func:`background_items` on (``FASTFP8_BACKGROUND=0``: every job at its place in the plan)
BACKGROUND = os.environ.get("FASTFP8_BACKGROUND", "1") != "0"


def run(ckpt: Checkpoint, plan: Plan, options: LoadOptions, device: torch.device, sink, stats: LoadStats,
        *, desc: str = "fastfp8") -> Iterator[tuple[Job, list[torch.Tensor]]]:
    """Runs ``plan`` on ``device`` into ``sink``; yields ``(job, tensors)`` per finished job.

    After the last job it checks every scale for NaN/Inf and raises
    :class:`NonFiniteWeightError` unless ``options.allow_non_finite`` (the names are in
    ``stats.non_finite`` either way): the reader threads check the scales they write as they
    write them; the device's are copied back once (one device sync, only where the device
    quantized). Closing the generator early stops the reader."""
    t0 = time.perf_counter()
    clock = time.perf_counter
    rounding = resolve_rounding(options.rounding, device)
    warm = is_warm(ckpt) if options.quantize_on == "auto" or options.method == "auto" else True
    options = resolve_quantize_on(options, device, plan.tp.size if plan.tp else 1, warm=warm)
    options = options.replace(method=resolve_method(ckpt, options, device, warm=warm)).staged()
    stats.memory_budget, stats.chunk_bytes, stats.device = options.memory_budget, options.chunk_bytes, str(device)
    stats.quantize_on = options.quantize_on
    stats.tensors = len(plan.targets)
    stats.quantized = sum(t.quantized for t in plan.targets)
    bar = progress_bar(plan.nbytes, options.progress, desc)
    t_reader = clock()
    reader, specs, amax = open_reader(ckpt, plan, options, device, rounding, interleave=isinstance(sink, StateSink))
    t = clock()
    stats.method, stats.read_ahead = options.method, options.read_ahead if options.method != "direct" else 0
    stats.phases["resolve"] = stats.phases.get("resolve", 0.0) + t_reader - t0
    stats.phases["reader"] = stats.phases.get("reader", 0.0) + t - t_reader
    stats.phases["setup"] = stats.phases.get("setup", 0.0) + t - t0
    stats.phases["pin"] = stats.phases.get("pin", 0.0) + reader.acquire_seconds
    flags: list[tuple[Job, torch.Tensor]] = []  # (job, its scales)
    try:
        if device.type == "cuda":
            yield from _run_cuda(reader, plan, specs, amax, options, device, sink, rounding, bar, stats, flags)
        else:
            yield from _run_host(reader, plan, specs, amax, device, sink, rounding, bar, flags)
        rs = reader.stats()
        if TIMELINE:
            stats.timeline = reader.chunk_times()
        # the reader's choice for the jobs it could quantize (all made: every job was read)
        stats.host_quantized = len({j.target.source.name for i, (j, sp) in enumerate(zip(plan.jobs, specs, strict=True))
                                    if sp and (i not in reader.optional or reader.quantized(i))})
        t = time.perf_counter()
        _fault("finish", None)
        bad = _non_finite(flags, stats.phases) | {id(plan.jobs[i]) for i in reader.non_finite()}
        if bad:  # the source names, each once, in plan order
            stats.non_finite = list(dict.fromkeys(j.target.source.name for j in plan.jobs if id(j) in bad))
        stats.phases["finish"] = stats.phases.get("finish", 0.0) + time.perf_counter() - t
    except BaseException:
        if device.type == "cuda":
            # Copies and kernels already queued on the engine's streams write into outputs and
            # staging buffers allocated on the current stream, which the caching allocator
            # hands out again as soon as they are freed: let them finish first.
            with contextlib.suppress(Exception):  # a broken context: the first error stands
                torch.cuda.synchronize(device)
        raise
    finally:
        reader.close()
        bar.close()
    stats.bytes_read, stats.peak_in_flight, stats.threads = rs["bytes_read"], rs["peak_in_flight"], rs["threads"]
    stats.phases["room_wait"] = rs["room_wait_ns"] / 1e9 / max(1, rs["threads"])
    if stats.non_finite and not options.allow_non_finite:
        names = ", ".join(stats.non_finite[:5]) + (" ..." if len(stats.non_finite) > 5 else "")
        raise NonFiniteWeightError(
            f"{ckpt.path}: {len(stats.non_finite)} weight(s) hold NaN or Inf and have no valid FP8 scale: "
            f"{names} (pass allow_non_finite=True to load them anyway)")


@dataclass
class _Lane:
    """Where the device quantizes: a stream and two staging buffers (sized for the largest
    job it quantizes) used in turn; the copy stream refills one only after the quantization
    that read it (``done``) has run."""

    stream: torch.cuda.Stream
    staging: list[torch.Tensor]
    done: list[torch.cuda.Event | None]
    count: int = 0

    @classmethod
    def of(cls, dev: torch.device, jobs: list[Job]) -> _Lane:
        size = max((j.nbytes for j in jobs), default=0)
        staging = [torch.empty(size, dtype=torch.uint8, device=dev) for _ in range(2)] if size else []
        return cls(torch.cuda.Stream(dev), staging, [None, None])

    def take(self, copy_stream: torch.cuda.Stream) -> int:
        """The next staging slot, the copy stream made to wait until it is free."""
        slot = self.count % 2
        self.count += 1
        if self.done[slot] is not None:
            copy_stream.wait_event(self.done[slot])
        return slot


def _quantize(job: Job, staging: torch.Tensor, outs: list[torch.Tensor], rounding: str, plan: Plan,
              phases: dict[str, float] | None = None) -> None:
    """Quantizes ``job`` from ``staging`` into ``outs`` on the current stream; a row-parallel
    slice's maxima all-reduced over the group first (``phases["reduce"]``: the time the
    collective's call took on this thread)."""
    _fault("quantize", job)
    w = staging[: job.nbytes].view(job.dtype)
    if job.transpose:  # [in, out] as read (in column blocks) -> [out, in], contiguous for the kernel
        k, n = job.shape
        w = w.view(job.blocks, k, n // job.blocks).transpose(1, 2).reshape(n, k)
    else:
        w = w.view(job.shape)
    q, s = outs
    reduce = None
    if job.reduce and plan.tp is not None:
        group = plan.tp.group

        def reduce(absmax: torch.Tensor) -> None:
            t = time.perf_counter()
            all_reduce_absmax(absmax, group)
            if phases is not None:
                phases["reduce"] = phases.get("reduce", 0.0) + time.perf_counter() - t

    if w.numel():
        quantize_channelwise(w, out=q, scale_out=s, check_finite=False, rounding=rounding, reduce_absmax=reduce)
    elif s.numel():
        if reduce is not None:  # an empty slice still takes part in the collective
            zeros = torch.zeros(s.shape, dtype=s.dtype, device=s.device)
            s.copy_(quantize_channelwise(zeros, check_finite=False, rounding=rounding, reduce_absmax=reduce)[1])
        else:
            s.fill_(torch.finfo(s.dtype).eps)


def _run_cuda(reader, plan: Plan, specs, amax, options: LoadOptions, dev, sink, rounding, bar, stats, flags):
    jobs = plan.jobs
    copy_stream = torch.cuda.Stream(dev)
    # the jobs the device may quantize: those with no host spec, and those the reader may
    # leave to it (quantize_on="adaptive")
    optional = reader.optional
    lane = _Lane.of(dev, [j for i, (j, sp) in enumerate(zip(jobs, specs, strict=True))
                          if j.quantized and (sp is None or i in optional)])
    pending: deque[tuple[torch.cuda.Event, int, int]] = deque()
    spare: list[torch.cuda.Event] = []  # events of released chunks, recorded again (no re-creation)
    held = 0
    limit = max(0, options.memory_budget - 2 * options.chunk_bytes)  # room so the reader can always progress
    slot = 0
    outs: list[torch.Tensor] = []
    spec = None  # the current job's host spec, set at its first chunk
    dst: torch.Tensor | None = None
    out_spans: list[tuple[int, int]] = []  # a host-quantized job's outputs: (address, bytes)
    # each unfinished job's (spec, outs, dst, out_spans, slot): the reader's background jobs
    # (reader.background) come in chunks between the others'
    open_jobs: dict[int, tuple] = {}
    clock = time.perf_counter
    # chunks queued through the driver (raw addresses, bounds checked here), or by torch
    copy = driver_copy.h2d_copier() if DRIVER_COPY else None
    ring, ring_len, stream_handle = reader.buffer.data_ptr(), reader.buffer.numel(), copy_stream.cuda_stream
    # the consumer's own time (this thread), by part: issuing each chunk's copy, the work
    # at each job's end (quantization launch, events), and the caller's time between jobs
    copy_wait = read_wait = issue = job_end = caller_time = launch = alloc = release = 0.0
    update = None if getattr(bar, "disable", False) else bar.update
    with torch.cuda.device(dev):
        # The copy stream is the current stream inside the loop (a stream switch per chunk
        # costs more than the copy's own launch); outputs are allocated, and jobs handed
        # to the caller, on the caller's stream.
        caller = torch.cuda.current_stream(dev)
        t = clock()
        sink.reserve(plan)
        reserve = clock() - t
        alloc += reserve
        issue += alloc  # the outputs' allocation, done up front (alloc is a part of issue)
        torch.cuda.set_stream(copy_stream)
        try:
            while True:
                t_release = clock()
                while pending and (held > limit or pending[0][0].query()):
                    ev, off, n = pending.popleft()
                    t = clock()
                    ev.synchronize()
                    copy_wait += clock() - t
                    reader.release(off, n)
                    held -= n
                    spare.append(ev)
                t = clock()
                release += t - t_release
                d = reader.next()
                read_wait += clock() - t
                if d is None:
                    break
                t_chunk = clock()
                item, ioff, boff, n = d
                job = jobs[item]
                if ioff == 0:
                    # how the reader reads it: an optional job's side was decided by now
                    spec = specs[item] if item not in optional or reader.quantized(item) else None
                    torch.cuda.set_stream(caller)
                    _fault("allocate", job)
                    outs = sink.outputs(job)
                    torch.cuda.set_stream(copy_stream)
                    alloc += clock() - t_chunk
                    if spec is not None:
                        dst = None
                        if not all(o.is_contiguous() for o in outs):
                            raise AssertionError(f"{job.item_name}: outputs not contiguous")
                        out_spans = [(o.data_ptr(), o.numel() * o.element_size()) for o in outs]
                    elif job.quantized:
                        slot = lane.take(copy_stream)
                        dst = lane.staging[slot] if lane.staging else None
                    else:
                        dst = bytes_view(outs[0])
                    open_jobs[item] = (spec, outs, dst, out_spans, slot)
                else:  # a later chunk, maybe after another job's chunks (background_items)
                    spec, outs, dst, out_spans, slot = open_jobs[item]
                src_n = n
                if n:
                    if FAULT_HOOK is not None:
                        _fault("copy", job)
                    if spec is not None:
                        pieces, src_n = chunk_pieces(job, spec, ioff, n)
                        for i, dst_off, o, m in pieces:
                            if copy is None:
                                bytes_view(outs[i])[dst_off : dst_off + m].copy_(reader.view(boff + o, m),
                                                                                non_blocking=True)
                            elif m:
                                ptr, size = out_spans[i]
                                if dst_off + m > size or boff + o + m > ring_len:
                                    raise AssertionError(f"{job.item_name}: chunk piece out of bounds")
                                copy(ptr + dst_off, ring + boff + o, m, stream_handle)
                    elif copy is None:
                        dst[ioff : ioff + n].copy_(reader.view(boff, n), non_blocking=True)
                    else:
                        if ioff + n > dst.numel() or boff + n > ring_len:
                            raise AssertionError(f"{job.item_name}: chunk out of bounds")
                        copy(dst.data_ptr() + ioff, ring + boff, n, stream_handle)
                    ev = spare.pop() if spare else torch.cuda.Event()
                    ev.record(copy_stream)
                    pending.append((ev, boff, n))
                    held += n
                    if update is not None:
                        update(src_n)
                t = clock()
                issue += t - t_chunk
                if ioff + src_n < job.nbytes:
                    continue
                del open_jobs[item]
                done = torch.cuda.Event()
                if job.quantized and spec is None:
                    lane.stream.wait_stream(copy_stream)
                    torch.cuda.set_stream(lane.stream)
                    try:
                        t_launch = clock()
                        _quantize(job, lane.staging[slot] if lane.staging else torch.empty(0, dtype=torch.uint8,
                                                                                            device=dev),
                                  outs, rounding, plan, stats.phases)
                        launch += clock() - t_launch
                        flags.append((job, outs[1]))
                    finally:
                        torch.cuda.set_stream(copy_stream)
                    done.record(lane.stream)
                    lane.done[slot] = done
                else:
                    if spec is not None:
                        _fault("quantize", job)
                        empty_slice_scales(job, outs, amax.get(item), rounding)
                        if not job.nbytes:  # scales made here (else the reader checks them)
                            flags.append((job, outs[1]))
                    done.record(copy_stream)
                caller.wait_event(done)
                torch.cuda.set_stream(caller)
                _fault("yield", job)
                t_yield = clock()
                job_end += t_yield - t
                yield job, outs
                caller_time += clock() - t_yield
                torch.cuda.set_stream(copy_stream)
        finally:
            torch.cuda.set_stream(caller)
        t = clock()
        caller.wait_stream(copy_stream)
        caller.wait_stream(lane.stream)
        torch.cuda.synchronize(dev)
        stats.phases.update(read_wait=read_wait, copy_wait=copy_wait, issue=issue, alloc=alloc, reserve=reserve,
                            job_end=job_end, launch=launch, release=release, caller=caller_time, drain=clock() - t)
    while pending:
        _, off, n = pending.popleft()
        reader.release(off, n)


def _run_host(reader, plan: Plan, specs, amax, dev, sink, rounding, bar, flags):
    jobs = plan.jobs
    optional = reader.optional
    staging_bytes = max((j.nbytes for i, (j, sp) in enumerate(zip(jobs, specs, strict=True))
                         if j.quantized and (sp is None or i in optional)), default=0)
    staging = torch.empty(staging_bytes, dtype=torch.uint8, device=dev)
    outs: list[torch.Tensor] = []
    spec = None
    while (d := reader.next()) is not None:
        item, ioff, boff, n = d
        job = jobs[item]
        if ioff == 0:
            spec = specs[item] if item not in optional or reader.quantized(item) else None
            _fault("allocate", job)
            outs = sink.outputs(job)
        src_n = n
        if n:
            _fault("copy", job)
            if spec is not None:
                pieces, src_n = chunk_pieces(job, spec, ioff, n)
                for i, dst_off, o, m in pieces:
                    bytes_view(outs[i])[dst_off : dst_off + m].copy_(reader.view(boff + o, m))
            else:
                dst = staging if job.quantized else bytes_view(outs[0])
                dst[ioff : ioff + n].copy_(reader.view(boff, n))
            reader.release(boff, n)
            bar.update(src_n)
        if ioff + src_n < job.nbytes:
            continue
        if job.quantized:
            if spec is None:
                _quantize(job, staging, outs, rounding, plan)
                flags.append((job, outs[1]))
            else:
                _fault("quantize", job)
                empty_slice_scales(job, outs, amax.get(item), rounding)
                if not job.nbytes:  # scales made here (else the reader checks them)
                    flags.append((job, outs[1]))
        _fault("yield", job)
        yield job, outs


#: the exponent bits of a float dtype, all set in an Inf or NaN: (integer view, mask)
_EXPONENT = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
             torch.float32: (torch.int32, 0x7F800000)}


def _finite(buf: torch.Tensor) -> np.ndarray:
    """Which values of the CPU tensor ``buf`` are finite, in numpy on its bit patterns (one
    thread: torch's ``isfinite`` and ``all`` ran on its intra-op pool, which took 70 - 90 ms
    of each load with two tensor-parallel ranks on one host)."""
    view, mask = _EXPONENT.get(buf.dtype, (None, 0))
    if view is None:
        return torch.isfinite(buf).numpy()
    bits = buf.view(view).numpy()
    return (bits & mask) != mask


def _non_finite(flags: list[tuple[Job, torch.Tensor]], phases: dict[str, float] | None = None) -> set[int]:
    """The jobs (by ``id``) among ``flags`` with a NaN/Inf scale: the scales of every job not
    quantized by the reader threads (those check their own as they write them, the reader's
    ``non_finite()``), kept by reference as each job ends (no kernel per job on the consumer
    thread's path), checked once when the load has finished, on the host: a device's scales
    come over in plain copies into pinned memory, one buffer per dtype (no kernel, so none
    to load on a process's first load), then one sync, then :func:`_finite` on the host."""
    flags = [(job, s) for job, s in flags if s.numel()]
    bad_jobs: set[int] = set()
    if not flags:
        return bad_jobs
    by_dtype: dict[torch.dtype, list[tuple[Job, torch.Tensor]]] = {}
    for job, s in flags:
        by_dtype.setdefault(s.dtype, []).append((job, s))
    for dtype, group in by_dtype.items():
        sizes = [s.numel() for _, s in group]
        on_cuda = group[0][1].is_cuda
        buf = torch.empty(sum(sizes), dtype=dtype, pin_memory=on_cuda)
        t = time.perf_counter()
        for dst, (_, s) in zip(torch.split(buf, sizes), group, strict=True):
            dst.copy_(s.reshape(-1), non_blocking=on_cuda)
        if phases is not None:
            phases["finish_copy"] = phases.get("finish_copy", 0.0) + time.perf_counter() - t
        if on_cuda:
            t = time.perf_counter()
            torch.cuda.synchronize(group[0][1].device)
            if phases is not None:
                phases["finish_sync"] = phases.get("finish_sync", 0.0) + time.perf_counter() - t
        finite = _finite(buf)
        if finite.all():
            continue
        for (job, _), f in zip(group, np.split(finite, np.cumsum(sizes)[:-1]), strict=True):
            if not f.all():
                bad_jobs.add(id(job))
    return bad_jobs
