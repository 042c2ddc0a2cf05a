"""The plan of a load: options + checkpoint + model layout + tensor-parallel rank -> the
list of reads and quantizations (one :class:`Job` type for every entry point).

Each job is one read item of the native reader (the byte ranges of one tensor, or of one
expert of fused experts, or of this rank's slice of them) and what to do with its bytes:
keep them (``copy``) or quantize them per output row (``quantize``; fused experts stored
``[in, out]`` are transposed on the device first). Under tensor parallelism each rank reads
only its slice (:class:`fastfp8.layouts.Split`): column-parallel slices are contiguous
rows, row-parallel slices one strided range per row (the reader coalesces them), and the
per-row amax of a row-parallel slice is all-reduced so that every rank's bytes equal the
matching slice of the one-GPU result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checkpoint import Checkpoint, TensorInfo
from .errors import LayoutError
from .fp8 import FP8
from .layouts import QUANTIZABLE_DTYPES, Layout, Split, Target, layout_for, module_of
from .options import LoadOptions
from .tensor_parallel import TensorParallel, heads_span

#: (shard, file offset, nbytes), or (shard, file offset, nbytes, count, stride): ``count``
#: ranges ``stride`` bytes apart (a row-parallel slice, one range per row)
Segments = list[tuple[int, ...]]


def segment_bytes(seg: tuple[int, ...]) -> int:
    return seg[2] * (seg[3] if len(seg) > 3 else 1)


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an output: name, dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class Job:
    """One read item and what becomes of its bytes."""

    target: Target
    segments: Segments
    #: shape of the bytes as read (fused experts ``[in, out]``: transposed on the device)
    shape: tuple[int, ...]
    #: shape of this rank's whole output weight (fused experts: ``[E, out, in]``)
    out_shape: tuple[int, ...]
    expert: int | None = None
    transpose: bool = False
    #: row-parallel slice: the per-row amax is all-reduced (MAX) over the group
    reduce: bool = False
    #: the first job of its target (the first expert)
    first: bool = True
    #: fused experts ``[in, out]`` read as ``blocks`` column blocks one after the other
    #: (a rank's gate slice, then its up slice), each ``[in, out / blocks]``
    blocks: int = 1
    #: a tensor-parallel slice: where it sits in the whole output (quantized: ``[out, in]``),
    #: ``(dim, [(start, stop), ...])``; None: the job holds the whole output
    place: tuple[int, list[tuple[int, int]]] | None = None
    #: the whole output's shape (quantized: ``[out, in]``; one expert's for experts)
    full: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(segment_bytes(s) for s in self.segments)

    @property
    def quantized(self) -> bool:
        return self.target.quantized

    @property
    def dtype(self) -> torch.dtype:
        return self.target.source.torch_dtype

    @property
    def item_name(self) -> str:
        n = self.target.source.name
        return n if self.expert is None else f"{n}[{self.expert}]"

    def quantized_shape(self) -> tuple[int, ...]:
        """``[out, in]`` of the weight this job quantizes."""
        return (self.shape[1], self.shape[0]) if self.transpose else tuple(self.shape)


@dataclass
class Plan:
    """The whole load: layout, targets and jobs, in file order."""

    layout: Layout
    targets: list[Target]
    jobs: list[Job]
    tp: TensorParallel | None = None
    tied_lm_head: str | None = None
    ignored: list[str] = field(default_factory=list)

    @property
    def items(self) -> list[tuple[str, Segments]]:
        """The native reader's items."""
        return [(j.item_name, j.segments) for j in self.jobs]

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)

    def state_outputs(self) -> list[OutTensor]:
        """The tensors of :func:`fastfp8.load_quantized`'s result, in order."""
        out: list[OutTensor] = []
        for j in self.jobs:
            if not j.first:
                continue
            t = j.target
            if t.quantized:
                out += [OutTensor(t.weight_name, FP8, j.out_shape),
                        OutTensor(t.scale_name, j.dtype, (*j.out_shape[:-1], 1))]
            else:
                out.append(OutTensor(t.weight_name, j.dtype, j.out_shape))
        return out

    def checkpoint_outputs_of(self, job: Job) -> list[OutTensor]:
        """The compressed-tensors checkpoint's tensors that ``job`` produces."""
        return [OutTensor(n, dt, s) for n, dt, s in _checkpoint_names(job)]

    def checkpoint_outputs(self) -> list[OutTensor]:
        """The tensors of the compressed-tensors checkpoint (what ``convert`` writes and the
        vLLM plugin feeds), in the order :func:`checkpoint_tensors` yields them."""
        out: list[OutTensor] = []
        for j in self.jobs:
            out += [OutTensor(n, dt, s) for n, dt, s in _checkpoint_names(j)]
        return out


def _checkpoint_names(job: Job) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    t, dtype = job.target, job.dtype
    if not t.quantized:
        return [(t.weight_name, dtype, job.out_shape)]
    rows, cols = job.quantized_shape()
    if job.expert is None:
        return [(t.weight_name, FP8, (rows, cols)), (t.scale_name, dtype, (rows, 1))]
    stem = t.source.name.rsplit(".", 1)[0]  # "<p>.experts"
    gate, up, down = t.expert_names
    parts = [(gate, rows // 2), (up, rows // 2)] if t.source.name.endswith("gate_up_proj") else [(down, rows)]
    out = []
    for leaf, r in parts:
        name = f"{stem}.{job.expert}.{leaf}.weight"
        out += [(name, FP8, (r, cols)), (name + "_scale", dtype, (r, 1))]
    return out


def checkpoint_tensors(job: Job, tensors: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the compressed-tensors checkpoint for a finished job whose
    outputs are ``tensors`` (``[weight]`` or ``[q, scale]``); fused gate_up experts are
    split into their gate and up rows."""
    names = _checkpoint_names(job)
    if len(names) == len(tensors):
        return [(n, t) for (n, _, _), t in zip(names, tensors, strict=True)]
    q, s = tensors
    half = q.shape[0] // 2
    pieces = [q[:half], s[:half], q[half:], s[half:]]
    return [(n, p) for (n, _, _), p in zip(names, pieces, strict=True)]


def place_in_full(job: Job, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A rank's slice (``[weight]`` or ``[q, scale]`` of a job) placed in zero tensors of
    the whole output's shape, so that a loader that narrows whole checkpoint tensors to its
    rank's part (vLLM's weight loaders) finds this rank's bytes where it looks; a
    row-parallel slice's scales are whole already."""
    if job.place is None:
        return tensors
    dim, spans = job.place
    out = []
    for i, t in enumerate(tensors):
        is_scale = job.quantized and i == 1
        if is_scale and dim == 1:
            out.append(t)
            continue
        full = torch.zeros((job.full[0], 1) if is_scale else job.full, dtype=t.dtype, device=t.device)
        at = 0
        for a, b in spans:
            full.narrow(dim, a, b - a).copy_(t.narrow(dim, at, b - a))
            at += b - a
        out.append(full)
    return out


# ---------------------------------------------------------------------------------------


def make_plan(ckpt: Checkpoint, options: LoadOptions, tp: TensorParallel | None = None,
              layout: Layout | None = None, *, split_vocab: bool = True) -> Plan:
    """The plan of loading ``ckpt`` with ``options`` as rank ``tp`` (None: everything).
    ``split_vocab=False`` reads embeddings and lm_head whole (vLLM pads the vocabulary
    before it splits it: its own loader narrows them)."""
    layout = layout or layout_for(ckpt.path, layout=options.layout, ignore=options.ignore,
                                  default_ignore=options.default_ignore)
    targets = layout.targets(ckpt)
    jobs: list[Job] = []
    for t in targets:
        jobs += _jobs(t, tp, split_vocab)
    plan = Plan(layout, targets, jobs, tp, layout.tied_lm_head(ckpt))
    plan.ignored = ignored_modules(plan)
    return plan


def ignored_modules(plan: Plan) -> list[str]:
    """Concrete module names left unquantized that compressed-tensors/vLLM would otherwise
    treat as quantized linears: every 2-D float ``<m>.weight`` kept as is (lm_head,
    embeddings, MoE routers, user ignores), ignored fused-expert modules, and the
    ``lm_head`` a tied checkpoint leaves out."""
    out: list[str] = []
    for t in plan.targets:
        src = t.source
        if t.kind != "copy" or src.dtype not in QUANTIZABLE_DTYPES:
            continue
        if src.name.endswith(".weight") and len(src.shape) == 2:
            out.append(module_of(src.name))
        elif len(src.shape) == 3 and src.name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            module = src.name.rsplit(".", 1)[0]
            if module not in out:
                out.append(module)
    if plan.tied_lm_head and plan.tied_lm_head not in out:
        out.append(plan.tied_lm_head)
    return out


def _rows(src: TensorInfo, spans: list[tuple[int, int]]) -> Segments:
    """Row ranges of the first dimension: one contiguous range each."""
    row = src.nbytes // src.shape[0] if src.shape and src.shape[0] else 0
    return [(src.shard, src.begin + a * row, (b - a) * row) for a, b in spans if b > a]


def _cols(src: TensorInfo, base: int, rows: int, width: int, span: tuple[int, int]) -> Segments:
    """Columns ``[a, b)`` of each of ``rows`` rows of ``width`` elements starting at
    ``base``: one strided segment (the reader expands and groups the ranges)."""
    es = src.torch_dtype.itemsize
    a, b = span
    if b <= a or rows == 0:
        return []
    if rows == 1 or (a, b) == (0, width):
        return [(src.shard, base + a * es, rows * (b - a) * es if (a, b) == (0, width) else (b - a) * es)]
    return [(src.shard, base + a * es, (b - a) * es, rows, width * es)]


def _head_rows(split: Split, rows: int, tp: TensorParallel, name: str) -> tuple[int, int]:
    """This rank's rows of a k/v projection: whole heads, replicated (vLLM) when the ranks
    outnumber the heads."""
    heads, d = split.heads, split.head_dim
    if heads * d != rows:
        raise LayoutError(f"{name}: {rows} rows are not {heads} key/value heads of {d}")
    if (tp.size <= heads and heads % tp.size) or (tp.size > heads and tp.size % heads):
        raise LayoutError(f"{name}: {heads} key/value heads do not split over {tp.size} ranks")
    return heads_span(heads, d, tp)


def _jobs(t: Target, tp: TensorParallel | None, split_vocab: bool = True) -> list[Job]:
    src = t.source
    split = t.split if tp is not None else None
    if t.kind != "experts":
        shape, segs, reduce = tuple(src.shape), [(src.shard, src.begin, src.nbytes)], False
        kind = split.kind if split else None
        if kind == "vocab" and not split_vocab:
            kind = None
        place = None
        if kind in ("column", "vocab", "heads", "halves"):
            n = src.shape[0]
            if kind == "heads":
                spans = [_head_rows(split, n, tp, src.name)]
            elif kind == "halves":
                if n % 2:
                    raise LayoutError(f"{src.file}: {src.name} has an odd number of rows ({n}): not gate and up")
                a, b = tp.span(n // 2)
                spans = [(a, b), (n // 2 + a, n // 2 + b)]
            else:
                spans = [tp.span(n)]
            shape = (sum(b - a for a, b in spans), *src.shape[1:])
            segs = _rows(src, spans)
            place = (0, spans)
        elif kind == "row":
            rows, cols = src.shape
            a, b = tp.span(cols)
            shape, segs, reduce = (rows, b - a), _cols(src, src.begin, rows, cols, (a, b)), t.quantized
            place = (1, [(a, b)])
        elif kind == "qkv":
            raise LayoutError(f"{src.file}: {src.name} is a fused qkv_proj, which fastfp8 cannot split across "
                              "tensor-parallel ranks without knowing its q, k and v sizes")
        return [Job(t, segs, shape, shape, reduce=reduce, place=place, full=tuple(src.shape))]
    # fused experts: one job per expert, quantized as [out, in]
    n_exp, d1, d2 = src.shape
    in_out = t.orientation == "in_out"
    k, n = (d1, d2) if in_out else (d2, d1)  # in, out
    per = src.nbytes // n_exp if n_exp else 0
    es = src.torch_dtype.itemsize
    spans_out, spans_in = [(0, n)], [(0, k)]
    kind = split.kind if split else None
    if kind == "experts_column":
        a, b = tp.span(n // 2)
        spans_out = [(a, b), (n // 2 + a, n // 2 + b)]
    elif kind == "experts_row":
        spans_in = [tp.span(k)]
    nn = sum(b - a for a, b in spans_out)
    kk = sum(b - a for a, b in spans_in)
    reduce = kind == "experts_row"
    place = (0, spans_out) if kind == "experts_column" else (1, spans_in) if kind == "experts_row" else None
    jobs = []
    for e in range(n_exp):
        base = src.begin + e * per
        if in_out:  # [in, out] rows are inputs; each output span is a column block
            (ka, kb), = spans_in
            segs = [s for span in spans_out for s in _cols(src, base + ka * n * es, kb - ka, n, span)]
            shape = (kk, nn)
        else:  # [out, in] rows are outputs
            (ka, kb), = spans_in
            segs = [s for a, b in spans_out for s in _cols(src, base + a * k * es, b - a, k, (ka, kb))]
            shape = (nn, kk)
        jobs.append(Job(t, segs, shape, (n_exp, nn, kk), expert=e, transpose=in_out, reduce=reduce, first=e == 0,
                        blocks=len(spans_out) if in_out else 1, place=place, full=(n, k)))
    return jobs
