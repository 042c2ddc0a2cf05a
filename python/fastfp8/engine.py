"""The one load engine: reader -> pinned ring -> copy stream -> quantize on the compute
stream -> a sink. Every entry point (``load_quantized``, ``convert``, the vLLM plugin,
``build_quantized_model``) runs a :class:`fastfp8.plan.Plan` through :func:`run`.

On CUDA, all overlapped:

1. The native reader copies the planned byte ranges on its own threads (no GIL) into pinned
   host slots carved from one ``memory_budget``-sized pool buffer, in plan order.
2. Each chunk goes host-to-device on a copy stream, straight into its output (tensors kept
   as they are) or into one of two device staging buffers (tensors to quantize). The slot
   is released once its copy's event has completed.
3. When a job's last chunk has landed, the compute stream waits for that copy and runs the
   fused quantization kernel from staging into the outputs. The copy stream reuses a
   staging buffer only after the quantization that read it is done, so reading the next
   tensor never waits for the previous tensor's quantization.

Outputs come from the sink (:class:`StateSink`: each tensor allocated once at its final
size when its first bytes arrive, so allocation overlaps with reading;
:class:`StreamSink`: fresh tensors per job, handed to the caller). :func:`run` yields
``(job, tensors)`` as each job is done (on CUDA: enqueued, with the caller's stream made
to wait for it), so the caller can write, assign or keep them. Device memory at peak is
the outputs plus two staging buffers of the largest job quantized.

Quantization on the host (``quantize_on="host"``; ``"auto"``: on a CPU device): the reader threads
quantize the rows of every weight whose output rows lie whole in the file (2-D linear
weights, per-expert weights, column-parallel slices, row-parallel slices) as they read them,
with the rounding the device kernel would use, into the pinned slots; FP8 bytes and scales
cross the bus (half the bytes of bf16) straight into the outputs, and no kernel runs. Fused
experts stored ``[in, out]`` (transposed on the device) are quantized on the device.

Tensor parallelism: a row-parallel slice holds some columns of every row, and a row's scale
comes from its amax over every rank. On the device path the slice's per-row amax is
all-reduced (MAX) over the group on the compute stream (NCCL queues it there without
blocking the host). On the host path (:func:`reduced_row_amax`), before the main read,
native threads read every such slice once for its rows' amax, one all-reduce (MAX) over the
group takes them all (on a CUDA device through a CUDA tensor: one host sync per load), and
the reader threads quantize the rows with the reduced amax. Every rank's bytes equal the
matching slice of the one-process result either way.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .checkpoint import Checkpoint, ChunkReader, ItemSpec, row_amax
from .errors import NonFiniteWeightError
from .options import LoadOptions
from .plan import FP8, Job, Plan
from .quant import quantize_channelwise, resolve_rounding
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
    device: str = ""
    non_finite: list[str] = field(default_factory=list)
    #: seconds spent in each phase: "setup" (open, plan, allocate), "read_wait" (waiting
    #: for the reader), "copy_wait" (waiting for host-to-device copies to free slots),
    #: "finish" (draining the streams, the finiteness check)
    phases: dict[str, float] = field(default_factory=dict)

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

    def outputs(self, job: Job) -> list[torch.Tensor]:
        if not job.quantized:
            return [torch.empty(job.shape, dtype=job.dtype, device=self.device)]
        shape = job.quantized_shape()
        return [torch.empty(shape, dtype=FP8, device=self.device),
                torch.empty((shape[0], 1), dtype=job.dtype, device=self.device)]


# ---------------------------------------------------------------------------------------


def progress_bar(total: int, enabled: bool | None, desc: str = "fastfp8"):
    """A tqdm bar in binary units on stderr (default: when stderr is a terminal)."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, smoothing=0.1, **TQDM_BYTES)


_HOST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def host_quant_spec(job: Job, options: LoadOptions, rounding: str, device: torch.device) -> tuple[str, int, str] | None:
    """How the reader threads quantize ``job`` on the way (``(dtype, cols, rounding)``, the
    native reader's spec), or None where the device does it: weights whose rows are not
    whole in the file's order (fused experts stored ``[in, out]``), and every weight when
    ``quantize_on="device"``, or ``"auto"`` on a GPU, or ``allow_non_finite`` (NaN/Inf rows
    keep the kernel's bytes).

    A row-parallel slice (``job.reduce``) gets its spec from what every rank shares (the
    options, the dtype, the layout), never from the rank's own slice, which may be empty
    (``cols`` 0): each rank takes part in the amax all-reduce of the same jobs
    (:func:`reduced_row_amax`)."""
    if not _host_can(job, options, device):
        return None
    dtype = _HOST_DTYPES[job.dtype]
    cols = job.shape[-1]
    if job.reduce:
        # one range of whole (sliced) rows per row, by construction (plan._cols)
        return dtype, cols, rounding
    if cols == 0 or job.nbytes == 0:
        return None
    row = cols * job.dtype.itemsize
    if any(len(seg) != 3 or seg[2] % row for seg in job.segments):
        return None
    return dtype, cols, rounding


def _host_can(job: Job, options: LoadOptions, device: torch.device) -> bool:
    """Whether the host may quantize ``job`` by what every rank shares (the options, the
    dtype, the layout), whatever this rank's slice holds."""
    where = options.quantize_on
    if where == "auto":
        where = "device" if device.type == "cuda" else "host"
    if where == "device" or options.allow_non_finite:
        return False
    return job.quantized and not job.transpose and bool(job.shape) and job.dtype in _HOST_DTYPES


#: reader threads of a direct (cold) read when ``threads`` is not set: each keeps one
#: ``piece_bytes`` request in flight, so more threads make a deeper disk queue
DIRECT_THREADS = 32


def host_quant_specs(jobs: list[Job], options: LoadOptions, rounding: str,
                     device: torch.device, *, tp_size: int = 1) -> list[tuple[str, int, str] | None]:
    """:func:`host_quant_spec` of every job. ``quantize_on="split"``: the host takes enough of
    the weights it can quantize that it quantizes about half of all the quantized bytes, the
    weights only the device can do (fused experts stored ``[in, out]``) counted on the
    device's side; the eligible ones are dealt out in that proportion as they come, so that
    the two sides alternate through the load and both stay busy.

    The split is the same on every tensor-parallel rank (a row-parallel slice on the device
    on one rank and on the host on another would pair collectives wrongly): it weighs each
    job by its share of the whole tensor (:func:`_split_bytes`, ``tp_size`` ranks), never by
    the rank's own slice."""
    host = options.replace(quantize_on="host") if options.quantize_on == "split" else options
    specs = [host_quant_spec(j, host, rounding, device) for j in jobs]
    if options.quantize_on == "split":
        # what every rank shares decides (_host_can, _split_bytes), never the rank's own slice
        can = [_host_can(j, host, device) for j in jobs]
        sizes = [_split_bytes(j, tp_size) for j in jobs]
        eligible = sum(n for n, c in zip(sizes, can, strict=True) if c)
        device_only = sum(n for j, n, c in zip(jobs, sizes, can, strict=True) if j.quantized and not c)
        # the host's share of the eligible bytes: (eligible + device_only) / 2 of them
        share = min(1.0, (eligible + device_only) / (2 * eligible)) if eligible else 0.0
        on = {True: 0, False: 0}
        for i, (n, c) in enumerate(zip(sizes, can, strict=True)):
            if c:
                on_host = on[True] * (1 - share) <= on[False] * share
                on[on_host] += n
                if not on_host:
                    specs[i] = None
    return specs


def _split_bytes(job: Job, tp_size: int) -> int:
    """``job``'s weight in the split: its share of the whole tensor's bytes (the same on every
    rank, unlike the bytes of the rank's own slice)."""
    n = job.dtype.itemsize
    for d in job.full or job.shape:
        n *= d
    return n // tp_size if job.place is not None else n


def reduced_row_amax(ckpt: Checkpoint, plan: Plan, specs, options: LoadOptions,
                     device: torch.device) -> dict[int, torch.Tensor]:
    """The all-reduced per-row amax (float32, on the CPU) of every row-parallel job the host
    quantizes (``job.reduce`` with a spec), by job index.

    Native threads read each rank's slices once, before the main read (:func:`row_amax`),
    and one all-reduce (MAX) over the tensor-parallel group takes every job's vector at once
    (on a CUDA device through a CUDA tensor, for NCCL: one host sync). Every rank has the
    same such jobs with the same rows (:func:`host_quant_spec`), so every rank takes part
    with the same length, an empty slice with zeros. A row holding NaN or Inf has amax +Inf
    on every rank (the load then reports it as non-finite)."""
    jobs = plan.jobs
    idx = [i for i, sp in enumerate(specs) if sp is not None and jobs[i].reduce]
    if not idx:
        return {}
    rows = [jobs[i].shape[0] for i in idx]
    read = [i for i in idx if jobs[i].nbytes]
    local = row_amax(ckpt, [(jobs[i].item_name, jobs[i].segments, specs[i]) for i in read],
                     threads=reader_threads(options), method=options.method)
    amax = torch.zeros(sum(rows), dtype=torch.float32)
    at = got = 0
    for i, r in zip(idx, rows, strict=True):
        if jobs[i].nbytes:
            amax[at : at + r] = local[got : got + r]
            got += r
        at += r
    tp = plan.tp
    if tp is not None and tp.size > 1:
        import torch.distributed as dist

        on = amax.to(device) if device.type == "cuda" else amax
        dist.all_reduce(on, op=dist.ReduceOp.MAX, group=tp.group)
        amax = on.cpu() if on is not amax else amax
    return dict(zip(idx, amax.split(rows), strict=True))


def reader_threads(options: LoadOptions) -> int | None:
    """The reader's thread count: ``options.threads``; else :data:`DIRECT_THREADS` for
    ``method="direct"`` and the native default (the cores but one, at most 16) otherwise."""
    if options.threads is None and options.method == "direct":
        return DIRECT_THREADS
    return options.threads


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


def run(ckpt: Checkpoint, plan: Plan, options: LoadOptions, device: torch.device, sink, stats: LoadStats,
        *, desc: str = "fastfp8") -> Iterator[tuple[Job, list[torch.Tensor]]]:
    """Runs ``plan`` on ``device`` into ``sink``; yields ``(job, tensors)`` per finished job.

    After the last job it checks every scale for NaN/Inf (one device sync) and raises
    :class:`NonFiniteWeightError` unless ``options.allow_non_finite`` (the names are in
    ``stats.non_finite`` either way). Closing the generator early stops the reader."""
    t0 = time.perf_counter()
    rounding = resolve_rounding(options.rounding, device)
    stats.memory_budget, stats.chunk_bytes, stats.device = options.memory_budget, options.chunk_bytes, str(device)
    stats.tensors = len(plan.targets)
    stats.quantized = sum(t.quantized for t in plan.targets)
    specs = host_quant_specs(plan.jobs, options, rounding, device, tp_size=plan.tp.size if plan.tp else 1)
    stats.host_quantized = len({j.target.source.name for j, sp in zip(plan.jobs, specs, strict=True) if sp})
    amax = reduced_row_amax(ckpt, plan, specs, options, device)
    items = [_item(name, segs, job, sp, amax.get(i))
             for i, ((name, segs), job, sp) in enumerate(zip(plan.items, plan.jobs, specs, strict=True))]
    bar = progress_bar(plan.nbytes, options.progress, desc)
    stats.method = options.method
    reader = ChunkReader(ckpt, items, memory_budget=options.memory_budget, chunk_bytes=options.chunk_bytes,
                         threads=reader_threads(options), method=options.method, piece_bytes=options.piece_bytes,
                         pin=device.type == "cuda")
    stats.phases["setup"] = stats.phases.get("setup", 0.0) + time.perf_counter() - t0
    flags: list[tuple[Job, torch.Tensor]] = []
    try:
        if device.type == "cuda":
            yield from _run_cuda(reader, plan, specs, amax, options, device, sink, rounding, bar, stats, flags)
        else:
            yield from _run_host(reader, plan, specs, amax, device, sink, rounding, bar, flags)
        rs = reader.stats()
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
    t = time.perf_counter()
    _fault("finish", None)
    stats.non_finite = _non_finite(flags)
    stats.phases["finish"] = stats.phases.get("finish", 0.0) + time.perf_counter() - t
    stats.bytes_read, stats.peak_in_flight, stats.threads = rs["bytes_read"], rs["peak_in_flight"], rs["threads"]
    if stats.non_finite and not options.allow_non_finite:
        names = ", ".join(stats.non_finite[:5]) + (" ..." if len(stats.non_finite) > 5 else "")
        raise NonFiniteWeightError(
            f"{ckpt.path}: {len(stats.non_finite)} weight(s) hold NaN or Inf and have no valid FP8 scale: "
            f"{names} (pass allow_non_finite=True to load them anyway)")


def _quantize(job: Job, staging: torch.Tensor, outs: list[torch.Tensor], rounding: str, plan: Plan) -> None:
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
        import torch.distributed as dist

        group = plan.tp.group

        def reduce(absmax: torch.Tensor) -> None:
            dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=group)

    if w.numel():
        quantize_channelwise(w, out=q, scale_out=s, check_finite=False, rounding=rounding, reduce_absmax=reduce)
    elif s.numel():
        if reduce is not None:  # an empty slice still takes part in the collective
            zeros = torch.zeros(s.shape, dtype=s.dtype, device=s.device)
            s.copy_(quantize_channelwise(zeros, check_finite=False, rounding=rounding, reduce_absmax=reduce)[1])
        else:
            s.fill_(torch.finfo(s.dtype).eps)


def _item(name: str, segs, job: Job, spec, amax: torch.Tensor | None) -> ItemSpec:
    """The native reader's item of a job: plain, quantized on the way, or quantized with the
    given (all-reduced) row amax; a rank's empty row-parallel slice reads nothing (its scales
    come from the amax: :func:`_empty_slice_scales`)."""
    if spec is None or (job.reduce and not job.nbytes):
        return (name, segs)
    if amax is not None:
        return (name, segs, spec, amax.tolist())
    return (name, segs, spec)


def _empty_slice_scales(job: Job, outs: list[torch.Tensor], amax: torch.Tensor | None, rounding: str) -> None:
    """The scales of a host-quantized row-parallel job whose slice is empty on this rank:
    those of its rows' all-reduced amax, by the device path's own arithmetic."""
    if amax is None or job.nbytes or not outs[1].numel():
        return
    zeros = torch.zeros((amax.numel(), 1), dtype=job.dtype)
    _, s = quantize_channelwise(zeros, check_finite=False, rounding=rounding,
                                reduce_absmax=lambda a: a.copy_(amax.view(-1, 1)))
    outs[1].copy_(s)


def _host_quantized(job: Job, spec: tuple[str, int, str], outs: list[torch.Tensor], ioff: int, n: int):
    """(destinations, sources) of a host-quantized chunk: ``n`` bytes of the slot hold whole
    rows' e4m3 bytes, then their scales; ``ioff`` is the rows' source offset. Returns the
    output byte views to copy into, the slot's (offset, length) pieces, and the source
    bytes the chunk covers."""
    cols, eb = spec[1], job.dtype.itemsize
    rows = n // (cols + eb)
    r0 = ioff // (cols * eb)
    dsts = [_bytes_view(outs[0])[r0 * cols : (r0 + rows) * cols], _bytes_view(outs[1])[r0 * eb : (r0 + rows) * eb]]
    return dsts, [(0, rows * cols), (rows * cols, rows * eb)], rows * cols * eb


def _run_cuda(reader, plan: Plan, specs, amax, options: LoadOptions, dev, sink, rounding, bar, stats, flags):
    jobs = plan.jobs
    copy_stream = torch.cuda.Stream(dev)
    compute_stream = torch.cuda.Stream(dev)
    staging_bytes = max((j.nbytes for j, sp in zip(jobs, specs, strict=True) if j.quantized and sp is None),
                        default=0)
    staging = [torch.empty(staging_bytes, dtype=torch.uint8, device=dev) for _ in range(2)] if staging_bytes else []
    quant_done: list[torch.cuda.Event | None] = [None, None]
    pending: deque[tuple[torch.cuda.Event, int, int]] = deque()
    spare: list[torch.cuda.Event] = []  # events of released chunks, recorded again (no re-creation)
    held = 0
    limit = max(0, options.memory_budget - 2 * options.chunk_bytes)  # room so the reader can always progress
    n_quant = slot = 0
    outs: list[torch.Tensor] = []
    dst: torch.Tensor | None = None
    clock = time.perf_counter
    copy_wait = read_wait = 0.0
    update = None if getattr(bar, "disable", False) else bar.update
    with torch.cuda.device(dev):
        # The copy stream is the current stream inside the loop (a stream switch per chunk
        # costs more than the copy's own launch); outputs are allocated, and jobs handed
        # to the caller, on the caller's stream.
        caller = torch.cuda.current_stream(dev)
        torch.cuda.set_stream(copy_stream)
        try:
            while True:
                while pending and (held > limit or pending[0][0].query()):
                    ev, off, n = pending.popleft()
                    t = clock()
                    ev.synchronize()
                    copy_wait += clock() - t
                    reader.release(off, n)
                    held -= n
                    spare.append(ev)
                t = clock()
                d = reader.next()
                read_wait += clock() - t
                if d is None:
                    break
                item, ioff, boff, n = d
                job = jobs[item]
                spec = specs[item]
                if ioff == 0:
                    torch.cuda.set_stream(caller)
                    _fault("allocate", job)
                    outs = sink.outputs(job)
                    torch.cuda.set_stream(copy_stream)
                    if spec is not None:
                        dst = None
                    elif job.quantized:
                        slot = n_quant % 2
                        n_quant += 1
                        if quant_done[slot] is not None:
                            copy_stream.wait_event(quant_done[slot])
                        dst = staging[slot] if staging else None
                    else:
                        dst = _bytes_view(outs[0])
                src_n = n
                if n:
                    if FAULT_HOOK is not None:
                        _fault("copy", job)
                    if spec is not None:
                        dsts, parts, src_n = _host_quantized(job, spec, outs, ioff, n)
                        for out, (o, m) in zip(dsts, parts, strict=True):
                            out.copy_(reader.view(boff + o, m), non_blocking=True)
                    else:
                        dst[ioff : ioff + n].copy_(reader.view(boff, n), non_blocking=True)
                    ev = spare.pop() if spare else torch.cuda.Event()
                    ev.record(copy_stream)
                    pending.append((ev, boff, n))
                    held += n
                    if update is not None:
                        update(src_n)
                if ioff + src_n < job.nbytes:
                    continue
                done = torch.cuda.Event()
                if job.quantized and spec is None:
                    compute_stream.wait_stream(copy_stream)
                    torch.cuda.set_stream(compute_stream)
                    try:
                        _quantize(job, staging[slot] if staging else torch.empty(0, dtype=torch.uint8, device=dev),
                                  outs, rounding, plan)
                        flags.append((job, (~torch.isfinite(outs[1])).any()))
                    finally:
                        torch.cuda.set_stream(copy_stream)
                    done.record(compute_stream)
                    quant_done[slot] = done
                else:
                    if spec is not None:
                        _fault("quantize", job)
                        _empty_slice_scales(job, outs, amax.get(item), rounding)
                        flags.append((job, (~torch.isfinite(outs[1])).any()))
                    done.record(copy_stream)
                caller.wait_event(done)
                torch.cuda.set_stream(caller)
                _fault("yield", job)
                yield job, outs
                torch.cuda.set_stream(copy_stream)
        finally:
            torch.cuda.set_stream(caller)
        t = clock()
        caller.wait_stream(copy_stream)
        caller.wait_stream(compute_stream)
        torch.cuda.synchronize(dev)
        stats.phases.update(read_wait=read_wait, copy_wait=copy_wait, drain=clock() - t)
    while pending:
        _, off, n = pending.popleft()
        reader.release(off, n)


def _run_host(reader, plan: Plan, specs, amax, dev, sink, rounding, bar, flags):
    jobs = plan.jobs
    staging_bytes = max((j.nbytes for j, sp in zip(jobs, specs, strict=True) if j.quantized and sp is None),
                        default=0)
    staging = torch.empty(staging_bytes, dtype=torch.uint8, device=dev)
    outs: list[torch.Tensor] = []
    while (d := reader.next()) is not None:
        item, ioff, boff, n = d
        job = jobs[item]
        spec = specs[item]
        if ioff == 0:
            _fault("allocate", job)
            outs = sink.outputs(job)
        src_n = n
        if n:
            _fault("copy", job)
            if spec is not None:
                dsts, parts, src_n = _host_quantized(job, spec, outs, ioff, n)
                for out, (o, m) in zip(dsts, parts, strict=True):
                    out.copy_(reader.view(boff + o, m))
            else:
                dst = staging if job.quantized else _bytes_view(outs[0])
                dst[ioff : ioff + n].copy_(reader.view(boff, n))
            reader.release(boff, n)
            bar.update(src_n)
        if ioff + src_n < job.nbytes:
            continue
        if job.quantized:
            if spec is None:
                _quantize(job, staging, outs, rounding, plan)
            else:
                _fault("quantize", job)
                _empty_slice_scales(job, outs, amax.get(item), rounding)
            flags.append((job, (~torch.isfinite(outs[1])).any()))
        _fault("yield", job)
        yield job, outs


def _non_finite(flags: list[tuple[Job, torch.Tensor]]) -> list[str]:
    """Names of the source tensors with a NaN/Inf scale (one device sync)."""
    if not flags:
        return []
    bad = torch.stack([f for _, f in flags]).cpu().tolist()
    names: list[str] = []
    for (job, _), b in zip(flags, bad, strict=True):
        n = job.target.source.name
        if b and n not in names:
            names.append(n)
    return names
