"""``load_quantized``: stream a bf16 checkpoint into FP8 on the device, never holding the
bf16 model there.

The pipeline, all overlapped:

1. The native reader copies planned byte ranges on its own threads (no GIL) into pinned
   host slots carved from one ``memory_budget``-sized pool buffer, in file order.
2. Each chunk goes host-to-device on a copy stream, straight into its final output (tensors
   kept as they are) or into one of two device staging buffers (tensors to quantize). The
   slot is released once its copy's event has completed.
3. When a tensor's last chunk has landed, the compute stream waits for that copy and runs
   the fused quantization kernel from staging into the final fp8 weight and scale. The
   copy stream reuses a staging buffer only after the quantization that read it is done,
   so reading the next tensor never waits for the previous tensor's quantization.

Each output is allocated once, at its final size, when its first bytes arrive (so the
allocations overlap with the reader's work). Device memory at
peak is therefore the final result plus two staging buffers of the largest tensor
quantized (for fused experts, of one expert).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import Checkpoint, ChunkReader, open_checkpoint
from .errors import NonFiniteWeightError
from .quant import quantize_channelwise, resolve_rounding
from .select import Target, plan_targets
from .tensor_parallel import TensorParallel, split_of
from .tensor_parallel import resolve as resolve_tp
from .units import parse_bytes

FP8 = torch.float8_e4m3fn


@dataclass
class LoadStats:
    """What a load did and how fast."""

    seconds: float = 0.0
    bytes_read: int = 0
    tensors: int = 0
    quantized: int = 0
    memory_budget: int = 0
    peak_in_flight: int = 0
    threads: int = 0
    device: str = ""
    non_finite: list[str] = field(default_factory=list)
    #: seconds spent in each phase: "setup" (open, plan, allocate), "read_wait" (waiting
    #: for the reader), "copy_wait" (waiting for host-to-device copies to free slots),
    #: "finish" (draining the streams, the finiteness check)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0


class QuantizedState(dict):
    """``name -> tensor`` on the device, with the load's :class:`LoadStats` as ``.stats``.

    For each quantized linear weight ``<m>.weight`` holds ``float8_e4m3fn [out, in]`` and
    ``<m>.weight_scale`` ``[out, 1]`` in the source dtype (compressed-tensors FP8_DYNAMIC
    names and layout). Llama4 fused experts ``<p>.experts.gate_up_proj [E, H, 2I]`` become
    ``<p>.experts.w13_weight [E, 2I, H]`` (gate rows first, then up) and
    ``<p>.experts.down_proj [E, I, H]`` becomes ``<p>.experts.w2_weight [E, H, I]``, each with
    ``..._weight_scale [E, out, 1]``. Every other tensor is unchanged.
    """

    stats: LoadStats


Segments = list[tuple[int, int, int]]  # (shard, file offset, nbytes)


@dataclass
class _Job:
    target: Target
    expert: int | None  # fused experts: one item per expert
    nbytes: int
    shape: tuple[int, ...]  # of the item as read (fused experts: [in, out], transposed on the device)
    #: outputs to allocate when this job's first chunk arrives: (name, shape, dtype)
    allocs: list[tuple[str, tuple[int, ...], torch.dtype]] = field(default_factory=list)
    #: row-parallel slice: the per-row amax is all-reduced (MAX) across the group
    reduce: bool = False


def _rows(src, start: int, stop: int) -> Segments:
    """Rows ``[start, stop)`` of the first dimension: one contiguous range."""
    row = src.nbytes // src.shape[0] if src.shape and src.shape[0] else 0
    return [(src.shard, src.begin + start * row, (stop - start) * row)]


def _cols(src, base: int, rows: int, width: int, spans: list[tuple[int, int]]) -> Segments:
    """Column spans of each of ``rows`` rows of ``width`` elements starting at ``base``."""
    es = src.torch_dtype.itemsize
    return [(src.shard, base + (r * width + a) * es, (b - a) * es) for r in range(rows) for a, b in spans if b > a]


def _plan(targets: list[Target], tp: TensorParallel | None = None) -> tuple[list[tuple[str, Segments]], list[_Job]]:
    """Read items (one per tensor, one per expert of fused experts) and their jobs; with
    ``tp``, only this rank's slice of each split tensor (see :mod:`fastfp8.tensor_parallel`)."""
    items: list[tuple[str, Segments]] = []
    jobs: list[_Job] = []
    for tg in targets:
        src = tg.source
        dtype = src.torch_dtype
        split = split_of(src.name, len(src.shape)) if tp else None
        shape, segs, reduce = src.shape, [(src.shard, src.begin, src.nbytes)], False
        if split in ("column", "vocab"):
            a, b = tp.span(src.shape[0])
            shape, segs = (b - a, *src.shape[1:]), _rows(src, a, b)
        elif split == "row":
            rows, cols = src.shape
            a, b = tp.span(cols)
            shape, segs, reduce = (rows, b - a), _cols(src, src.begin, rows, cols, [(a, b)]), True
        if tg.kind in ("copy", "quantize"):
            nbytes = sum(n for _, _, n in segs)
            allocs = [(tg.weight_name, shape, dtype)]
            if tg.kind == "quantize":
                allocs = [(tg.weight_name, shape, FP8), (tg.scale_name, (shape[0], 1), dtype)]
            items.append((src.name, segs))
            jobs.append(_Job(tg, None, nbytes, shape, allocs, reduce))
            continue
        # fused experts [E, in, out] -> [E, out, in], one read item per expert
        n_exp, k, n = src.shape
        per = src.nbytes // n_exp if n_exp else 0
        spans_k, spans_n, reduce = [(0, k)], [(0, n)], False
        if split == "fused_column":  # gate and up halves of `out`, each split
            half = n // 2
            a, b = tp.span(half)
            spans_n = [(a, b), (half + a, half + b)]
        elif split == "fused_row":
            spans_k, reduce = [tp.span(k)], True
        kk = sum(b - a for a, b in spans_k)
        nn = sum(b - a for a, b in spans_n)
        allocs = [(tg.weight_name, (n_exp, nn, kk), FP8), (tg.scale_name, (n_exp, nn, 1), dtype)]
        es = dtype.itemsize
        for e in range(n_exp):
            ka = spans_k[0][0]
            if spans_n == [(0, n)]:  # whole rows: one contiguous range
                segs = [(src.shard, src.begin + e * per + ka * n * es, kk * n * es)]
            else:
                segs = _cols(src, src.begin + e * per + ka * n * es, kk, n, spans_n)
            items.append((f"{src.name}[{e}]", segs))
            jobs.append(_Job(tg, e, kk * nn * es, (kk, nn), allocs if e == 0 else [], reduce))
        if n_exp == 0:
            items.append((src.name, []))
            jobs.append(_Job(tg, None, 0, src.shape, allocs))
    return items, jobs


class _Outputs(dict):
    """The result tensors, each allocated once at its final size when its first chunk
    arrives (so that allocation overlaps with the reader's work), with byte views of the
    tensors that are copied as they are."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.bytes: dict[str, torch.Tensor] = {}

    def allocate(self, job: _Job) -> None:
        for name, shape, dtype in job.allocs:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            self[name] = t
            if not job.target.quantized:
                self.bytes[name] = t.view(-1).view(torch.uint8) if t.numel() else t.view(torch.uint8)


def load_quantized(
    path: str | os.PathLike[str] | Checkpoint,
    *,
    device: str | torch.device = "cuda",
    ignore: Iterable[str] | None = None,
    default_ignore: bool = True,
    memory_budget: int | str = "2GiB",
    chunk_bytes: int | str = "64MiB",
    threads: int | None = None,
    method: str = "mmap",
    piece_bytes: int | str = "4MiB",
    allow_non_finite: bool = False,
    rounding: str = "auto",
    progress: bool | None = None,
    tp_rank: int | None = None,
    tp_size: int | None = None,
    process_group: Any = None,
) -> QuantizedState:
    """Loads a bf16/fp16/fp32 safetensors checkpoint as FP8 e4m3 per-output-channel.

    Args:
        path: a ``.safetensors`` file, a model directory, or an open :class:`Checkpoint`.
        device: where the result goes (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
        ignore: modules to leave unquantized, compressed-tensors style: exact module names
            or ``"re:<pattern>"`` (``re.match``), added to the defaults (lm_head,
            embeddings, MoE routers/gates, vision towers); ``default_ignore=False`` drops
            the defaults.
        memory_budget: pinned host memory for reading (the bytes in flight never exceed it).
        chunk_bytes: the unit of host-to-device copies; at most a quarter of the budget.
        threads: native reader threads (default: the machine's cores, at most 16).
        method: ``"mmap"`` (default: copies out of a file mapping; a file that shrinks during
            the load is caught and reported as :class:`ReadError`) or ``"pread"`` (read
            calls; about 8% slower on the H100 machine).
        piece_bytes: the unit of work of one reader thread.
        allow_non_finite: quantize weights holding NaN/Inf anyway instead of raising
            :class:`NonFiniteWeightError` (their names are in ``stats.non_finite``).
        rounding: ``"auto"`` (default): the bytes compressed-tensors itself produces on that
            device, i.e. ``"fp32"`` (one rounding, its Triton path) on CUDA devices of
            compute capability 9.0+, else ``"eager"`` (its torch path: divide in the weight
            dtype, then round to e4m3).
        progress: a progress bar on stderr (default: when stderr is a terminal).
        tp_rank, tp_size, process_group: tensor-parallel loading (see
            :mod:`fastfp8.tensor_parallel`): this rank reads and keeps only its slice of each
            split tensor; row-parallel scales are all-reduced over ``process_group``
            (torch.distributed, NCCL on GPUs, gloo on CPUs), so every rank's bytes equal the
            matching slice of the one-GPU result. Rank and size default to the group's.

    Returns:
        a :class:`QuantizedState` (a dict of device tensors with ``.stats``).
    """
    t0 = time.perf_counter()
    tp = resolve_tp(tp_rank, tp_size, process_group)
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    rounding = resolve_rounding(rounding, dev)
    budget = parse_bytes(memory_budget)
    chunk = max(1, min(parse_bytes(chunk_bytes), budget // 4))
    targets = plan_targets(ckpt, ignore, default_ignore=default_ignore)
    items, jobs = _plan(targets, tp)
    outputs = _Outputs(dev)
    total = sum(j.nbytes for j in jobs)
    bar = _progress(total, progress)
    stats = LoadStats(memory_budget=budget, device=str(dev), tensors=len(targets),
                      quantized=sum(t.quantized for t in targets))
    reader = ChunkReader(ckpt, items, memory_budget=budget, chunk_bytes=chunk, threads=threads,
                         method=method, piece_bytes=parse_bytes(piece_bytes), pin=dev.type == "cuda")
    phases = stats.phases
    phases["setup"] = time.perf_counter() - t0
    try:
        if dev.type == "cuda":
            _run_cuda(reader, jobs, outputs, dev, budget, chunk, rounding, bar, phases, tp)
        else:
            _run_host(reader, jobs, outputs, dev, rounding, bar, tp)
        rs = reader.stats()
    except BaseException:
        if dev.type == "cuda":
            # Copies and kernels already queued on the loader's streams write into outputs and
            # staging buffers allocated on the current stream, which the caching allocator
            # hands out again as soon as they are freed: let them finish first.
            with contextlib.suppress(Exception):  # a broken context: the first error stands
                torch.cuda.synchronize(dev)
        raise
    finally:
        reader.close()
        bar.close()
    t_fin = time.perf_counter()
    stats.non_finite = _non_finite(targets, outputs)
    phases["finish"] = phases.get("finish", 0.0) + time.perf_counter() - t_fin
    if stats.non_finite and not allow_non_finite:
        names = ", ".join(stats.non_finite[:5]) + (" ..." if len(stats.non_finite) > 5 else "")
        raise NonFiniteWeightError(
            f"{ckpt.path}: {len(stats.non_finite)} weight(s) hold NaN or Inf and have no valid "
            f"FP8 scale: {names} (pass allow_non_finite=True to load them anyway)")
    stats.seconds = time.perf_counter() - t0
    stats.bytes_read = rs["bytes_read"]
    stats.peak_in_flight = rs["peak_in_flight"]
    stats.threads = rs["threads"]
    result = QuantizedState((t.weight_name, outputs[t.weight_name]) for t in targets)
    result.update((t.scale_name, outputs[t.scale_name]) for t in targets if t.quantized)
    result.stats = stats
    return result


def _progress(total: int, enabled: bool | None):
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="fastfp8",
                disable=not enabled, smoothing=0.1)


def _quantize_item(job: _Job, staging: torch.Tensor, outputs: dict[str, torch.Tensor], rounding: str,
                   tp: TensorParallel | None) -> None:
    tg = job.target
    w = staging[: job.nbytes].view(tg.source.torch_dtype).view(job.shape)
    q, s = outputs[tg.weight_name], outputs[tg.scale_name]
    if job.expert is not None:
        # [in, out] as read -> [out, in], on the device, contiguous for the kernel.
        w = w.t().contiguous()
        q, s = q[job.expert], s[job.expert]
    reduce = None
    if job.reduce and tp is not None:
        import torch.distributed as dist

        def reduce(absmax: torch.Tensor) -> None:
            dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=tp.group)

    if w.numel():
        quantize_channelwise(w, out=q, scale_out=s, check_finite=False, rounding=rounding, reduce_absmax=reduce)
    elif s.numel():
        if reduce is not None:  # an empty slice still takes part in the collective
            zeros = torch.zeros(s.shape, dtype=s.dtype, device=s.device)
            s.copy_(quantize_channelwise(zeros, check_finite=False, rounding=rounding, reduce_absmax=reduce)[1])
        else:
            s.fill_(torch.finfo(s.dtype).eps)


def _run_cuda(reader, jobs, outputs, dev, budget, chunk, rounding, bar, phases, tp) -> None:
    copy_stream = torch.cuda.Stream(dev)
    compute_stream = torch.cuda.Stream(dev)
    staging_bytes = max((j.nbytes for j in jobs if j.target.quantized), default=0)
    staging = [torch.empty(staging_bytes, dtype=torch.uint8, device=dev) for _ in range(2)] if staging_bytes else []
    quant_done: list[torch.cuda.Event | None] = [None, None]
    pending: deque[tuple[torch.cuda.Event, int, int]] = deque()
    held = 0
    limit = max(0, budget - 2 * chunk)  # keep room so the reader can always progress
    n_quant = 0
    slot = 0
    clock = time.perf_counter
    copy_wait = read_wait = 0.0
    with torch.cuda.device(dev):
        while True:
            while pending and (held > limit or pending[0][0].query()):
                ev, off, n = pending.popleft()
                t = clock()
                ev.synchronize()
                copy_wait += clock() - t
                reader.release(off, n)
                held -= n
            t = clock()
            d = reader.next()
            read_wait += clock() - t
            if d is None:
                break
            item, ioff, boff, n = d
            job = jobs[item]
            if ioff == 0 and job.allocs:
                outputs.allocate(job)
            quantized = job.target.quantized
            if quantized and ioff == 0:
                slot = n_quant % 2
                n_quant += 1
                if quant_done[slot] is not None:
                    copy_stream.wait_event(quant_done[slot])
            if n:
                dst = staging[slot] if quantized else outputs.bytes[job.target.weight_name]
                with torch.cuda.stream(copy_stream):
                    dst[ioff : ioff + n].copy_(reader.view(boff, n), non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(copy_stream)
                pending.append((ev, boff, n))
                held += n
                bar.update(n)
            if quantized and ioff + n == job.nbytes:
                compute_stream.wait_stream(copy_stream)
                with torch.cuda.stream(compute_stream):
                    _quantize_item(job, staging[slot], outputs, rounding, tp)
                    qe = torch.cuda.Event()
                    qe.record(compute_stream)
                quant_done[slot] = qe
        t = clock()
        torch.cuda.current_stream(dev).wait_stream(copy_stream)
        torch.cuda.current_stream(dev).wait_stream(compute_stream)
        torch.cuda.synchronize(dev)
        phases.update(read_wait=read_wait, copy_wait=copy_wait, finish=clock() - t)
    while pending:
        _, off, n = pending.popleft()
        reader.release(off, n)


def _run_host(reader, jobs, outputs, dev, rounding, bar, tp) -> None:
    staging_bytes = max((j.nbytes for j in jobs if j.target.quantized), default=0)
    staging = torch.empty(staging_bytes, dtype=torch.uint8, device=dev)
    while (d := reader.next()) is not None:
        item, ioff, boff, n = d
        job = jobs[item]
        if ioff == 0 and job.allocs:
            outputs.allocate(job)
        dst = staging if job.target.quantized else outputs.bytes[job.target.weight_name]
        if n:
            dst[ioff : ioff + n].copy_(reader.view(boff, n))
            reader.release(boff, n)
            bar.update(n)
        if job.target.quantized and ioff + n == job.nbytes:
            _quantize_item(job, staging, outputs, rounding, tp)


def _non_finite(targets: list[Target], outputs: dict[str, torch.Tensor]) -> list[str]:
    """Names of quantized tensors whose scales are not all finite (one device sync)."""
    quantized = [t for t in targets if t.quantized]
    if not quantized:
        return []
    flags = torch.stack([(~torch.isfinite(outputs[t.scale_name])).any() for t in quantized]).cpu()
    return [t.source.name for t, bad in zip(quantized, flags.tolist(), strict=True) if bad]
