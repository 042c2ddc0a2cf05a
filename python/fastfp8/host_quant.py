"""Quantization on the host: which weights the native reader threads quantize as they read
them (the engine, :mod:`fastfp8.engine`, runs the load), and what they need for it.

With ``quantize_on="host"`` (``"auto"`` on a CPU device) the reader threads quantize the
rows of every weight whose output rows lie whole in the file (2-D linear weights, per-expert
weights, column-parallel slices, row-parallel slices) as they read them, with the rounding
the device kernel would use, into the pinned slots; FP8 bytes and scales cross the bus (half
the bytes of bf16) straight into the outputs, and no kernel runs. Fused experts stored
``[in, out]`` (transposed on the device) are quantized on the device. With
``quantize_on="split"`` the host takes ``host_share`` of the quantized bytes and the device
the rest (:func:`host_quant_specs`). With ``quantize_on="adaptive"`` the reader threads
decide weight by weight as they reach each one: on the host when the time they spent
waiting for room in the ring covers its cost, else on the device (:func:`optional_items`).
``"auto"`` on one GPU is ``"host"`` for a checkpoint in the page cache and ``"adaptive"``
for one that is not, the device with tensor parallelism (:func:`resolve_quantize_on`). With
``"host"`` on a GPU, ``method="auto"`` reads with ``mmap``: the rows are quantized in place
in the page cache, no copy.

Tensor parallelism: a row-parallel slice holds some columns of every row, and a row's scale
comes from its amax over every rank. On the device path the slice's per-row amax (fp32, from
the quantization kernel's first pass) is all-reduced (MAX) over the group on the
quantization stream, NCCL queueing it there without blocking the host
(:func:`fastfp8.tensor_parallel.all_reduce_absmax`: as int32 bit patterns, so that a NaN in
one rank's part of a row reaches every rank). On the host path (:func:`reduced_row_amax`),
before the main read, native threads read every such slice once for its rows' amax, one
all-reduce (MAX) over the group takes them all (on a CUDA device through a CUDA tensor: one host sync per load), and
the reader threads quantize the rows with the reduced amax. Every rank's bytes equal the
matching slice of the one-process result either way.
"""

from __future__ import annotations

import torch

from .checkpoint import Checkpoint, ItemSpec, row_amax
from .options import LoadOptions
from .plan import Job, Plan
from .quant import quantize_channelwise
from .tensor_parallel import all_reduce_absmax

__all__ = ["bytes_view", "chunk_pieces", "empty_slice_scales", "host_quant_spec", "host_quant_specs", "optional_items",
           "reader_item", "reduced_row_amax", "resolve_quantize_on"]


def bytes_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes, flat (an empty uint8 tensor for an empty ``t``)."""
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


_HOST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def host_quant_spec(job: Job, options: LoadOptions, rounding: str, device: torch.device) -> tuple[str, int, str] | None:
    """How the reader threads quantize ``job`` on the way (``(dtype, cols, rounding)``, the
    native reader's spec), or None where the device does it: weights whose rows are not
    whole in the file's order (fused experts stored ``[in, out]``), and every weight when
    ``quantize_on="device"`` or ``allow_non_finite`` (NaN/Inf rows keep the kernel's bytes).
    ``options.quantize_on`` is resolved (:func:`resolve_quantize_on`), never ``"auto"``.

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


#: ``quantize_on="split"``'s host share when ``host_share`` is not given. On three H200
#: machines of one kind (16 cores), against the GPU alone: 52.8 against 47.3 GB/s, 52.7
#: against 49.8, 46.4 against 46.6 (medians of 5); on a fourth 38.6 against 43.7; larger
#: shares lost on the third (44.3 at 0.4, 44.2 at 0.5), where the reader threads had no time
#: to spare: benches/results/logs/probe_consumer_h200*.json, probe_split_h200.json,
#: benches/NOTES.md. ``"adaptive"`` finds the share as it goes.
DEFAULT_HOST_SHARE = 0.3


def resolve_quantize_on(options: LoadOptions, device: torch.device, tp_size: int = 1, *,
                        warm: bool = True) -> LoadOptions:
    """``options`` with ``quantize_on`` made explicit for a load onto ``device``: ``"auto"``
    is ``"host"`` on the CPU; on one GPU ``"host"`` when the checkpoint is ``warm`` (mostly
    in the page cache: the reader threads outrun the bus and FP8 crosses it, half the bytes)
    and ``"adaptive"`` when it is not (the disk sets the pace); ``"device"`` on every rank
    of a tensor-parallel load (``tp_size > 1``).

    Warm, every weight on the host read with ``mmap`` against ``"adaptive"``: ahead in eight
    of twelve H200 runs (by 3 - 20%; 60.9 against 58.2 GB/s in session 17's bench_load, 64.5
    against 53.6 in session 16's), 1 - 8% behind in four (benches/NOTES.md, sessions 13, 16
    and 17). Cold, ``"adaptive"`` keeps the disk's pace (1.04x its direct read). At tp 2 the
    host has not been measured since the tensor-parallel fixes."""
    if options.quantize_on == "auto":
        if device.type != "cuda":
            return options.replace(quantize_on="host")
        if tp_size > 1:
            return options.replace(quantize_on="device")
        return options.replace(quantize_on="host" if warm else "adaptive")
    return options


def optional_items(specs: list, options: LoadOptions) -> list[int]:
    """The jobs the reader threads may quantize or leave to the device, deciding as they
    reach each one (``quantize_on="adaptive"``: on the host when the threads' idle time,
    waiting for room in the ring, covers the host's cost of quantizing it, the native
    reader's ``Shared::decide``): every one with a host spec. Row-parallel slices have none
    there (:func:`_host_can`): their side decides which collectives each rank joins, so it
    is fixed alike on every rank, the device."""
    if options.quantize_on != "adaptive":
        return []
    return [i for i, sp in enumerate(specs) if sp is not None]


def _host_can(job: Job, options: LoadOptions, device: torch.device) -> bool:
    """Whether the host may quantize ``job`` by what every rank shares (the options, the
    dtype, the layout), whatever this rank's slice holds."""
    where = options.quantize_on
    if where == "auto":
        raise ValueError('quantize_on="auto" is resolved first (resolve_quantize_on)')
    if where == "device" or options.allow_non_finite or (where == "adaptive" and job.reduce):
        return False
    return job.quantized and not job.transpose and bool(job.shape) and job.dtype in _HOST_DTYPES


def host_quant_specs(jobs: list[Job], options: LoadOptions, rounding: str,
                     device: torch.device, *, tp_size: int = 1) -> list[tuple[str, int, str] | None]:
    """:func:`host_quant_spec` of every job. ``quantize_on="split"``: the host takes enough of
    the weights it can quantize that it quantizes ``options.host_share`` (None:
    :data:`DEFAULT_HOST_SHARE`) of all the quantized bytes, the weights only the device can
    do (fused experts stored ``[in, out]``) counted on the device's side; the eligible ones
    are dealt out in that proportion as they come, so that the two sides alternate through
    the load and both stay busy.

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
        # the host's share of the eligible bytes: host_share x (eligible + device_only) of them
        wanted = options.host_share if options.host_share is not None else DEFAULT_HOST_SHARE
        share = min(1.0, wanted * (eligible + device_only) / eligible) if eligible else 0.0
        on = {True: 0, False: 0}
        for i, (n, c) in enumerate(zip(sizes, can, strict=True)):
            if c:
                on_host = share > 0 and on[True] * (1 - share) <= on[False] * share
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
                     device: torch.device, threads: int | None) -> dict[int, torch.Tensor]:
    """The all-reduced per-row amax (float32, on the CPU) of every row-parallel job the host
    quantizes (``job.reduce`` with a spec), by job index.

    Native threads read each rank's slices once, before the main read (:func:`row_amax`),
    and one all-reduce (MAX) over the tensor-parallel group takes every job's vector at once
    (on a CUDA device through a CUDA tensor, for NCCL: one host sync). Every rank has the
    same such jobs with the same rows (:func:`host_quant_spec`), so every rank takes part
    with the same length, an empty slice with zeros. A row holding NaN or Inf has amax +Inf
    on every rank (the load then reports it as non-finite).

    A group of one reads nothing ahead: each row's amax is its own, which the reader threads
    take as they quantize anyway; only an empty slice gets its (zero) amax here."""
    jobs = plan.jobs
    idx = [i for i, sp in enumerate(specs) if sp is not None and jobs[i].reduce]
    tp = plan.tp
    if tp is None or tp.size <= 1:
        return {i: torch.zeros(jobs[i].shape[0], dtype=torch.float32) for i in idx if not jobs[i].nbytes}
    if not idx:
        return {}
    rows = [jobs[i].shape[0] for i in idx]
    read = [i for i in idx if jobs[i].nbytes]
    local = row_amax(ckpt, [(jobs[i].item_name, jobs[i].segments, specs[i]) for i in read],
                     threads=threads, method=options.method)
    amax = torch.zeros(sum(rows), dtype=torch.float32)
    at = got = 0
    for i, r in zip(idx, rows, strict=True):
        if jobs[i].nbytes:
            amax[at : at + r] = local[got : got + r]
            got += r
        at += r
    on = amax.to(device) if device.type == "cuda" else amax
    all_reduce_absmax(on, tp.group)
    amax = on.cpu() if on is not amax else amax
    return dict(zip(idx, amax.split(rows), strict=True))


def reader_item(name: str, segs, job: Job, spec, amax: torch.Tensor | None) -> ItemSpec:
    """The native reader's item of a job: plain, quantized on the way, or quantized with the
    given (all-reduced) row amax; a rank's empty row-parallel slice reads nothing (its scales
    come from the amax: :func:`empty_slice_scales`)."""
    if spec is None or (job.reduce and not job.nbytes):
        return (name, segs)
    if amax is not None:
        return (name, segs, spec, amax.tolist())
    return (name, segs, spec)


def empty_slice_scales(job: Job, outs: list[torch.Tensor], amax: torch.Tensor | None, rounding: str) -> None:
    """The scales of a host-quantized row-parallel job whose slice is empty on this rank:
    those of its rows' all-reduced amax, by the device path's own arithmetic."""
    if amax is None or job.nbytes or not outs[1].numel():
        return
    zeros = torch.zeros((amax.numel(), 1), dtype=job.dtype)
    _, s = quantize_channelwise(zeros, check_finite=False, rounding=rounding,
                                reduce_absmax=lambda a: a.copy_(amax.view(-1, 1)))
    outs[1].copy_(s)


def chunk_pieces(job: Job, spec: tuple[str, int, str], ioff: int, n: int):
    """Where a host-quantized chunk goes: ``n`` bytes of the slot hold whole rows' e4m3
    bytes, then their scales; ``ioff`` is the rows' source offset. Returns ``(output index,
    byte offset in that output, offset in the slot, length)`` for the bytes and for the
    scales, and the source bytes the chunk covers. Plain numbers, no tensor views: the
    consumer thread computes this for every chunk."""
    cols, eb = spec[1], job.dtype.itemsize
    rows = n // (cols + eb)
    r0 = ioff // (cols * eb)
    return [(0, r0 * cols, 0, rows * cols), (1, r0 * eb, rows * cols, rows * eb)], rows * cols * eb
