"""Opening checkpoints and streaming their tensors through reused pinned slots.

The native reader (``fastfp8._native``) validates every header, resolves the model
directory and copies the bytes on native threads, without the GIL, into one buffer whose
size is the memory budget. This module gives that a torch face.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import _native
from .errors import BudgetError, Error, ReadError, SlotReleasedError, UnsupportedDtypeError
from .pinned import POOL
from .units import parse_bytes

#: safetensors dtype -> torch dtype, for those this torch has.
TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in [
        ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("I16", "int16"),
        ("U16", "uint16"), ("F16", "float16"), ("BF16", "bfloat16"), ("I32", "int32"),
        ("U32", "uint32"), ("F32", "float32"), ("F64", "float64"), ("I64", "int64"),
        ("U64", "uint64"), ("C64", "complex64"), ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
    ]
    if hasattr(torch, attr)
}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives: ``file`` bytes ``[begin, end)`` (absolute offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int
    end: int
    shard: int = 0  # index into Checkpoint.shards

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return TORCH_DTYPES[self.dtype]
        except KeyError:
            raise UnsupportedDtypeError(
                f"{self.file}: tensor {self.name!r} has dtype {self.dtype}, which this torch "
                f"({torch.__version__}) cannot represent"
            ) from None


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Opens a ``.safetensors`` file or a model directory (``model.safetensors`` or
    ``model.safetensors.index.json`` with its shards), validating every header."""
    return Checkpoint(path)


class Checkpoint:
    """A validated safetensors checkpoint. See :func:`open_checkpoint`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._native = _native.Checkpoint(os.fspath(path))
        shards = self._native.shards()
        self._shards = [Path(s.path) for s in shards]
        self._sizes = [s.size for s in shards]
        self.tensors: dict[str, TensorInfo] = {
            t.name: TensorInfo(t.name, t.dtype, tuple(t.shape), self._shards[t.shard], t.begin,
                               t.end, t.shard)
            for t in self._native.tensors()
        }
        self._maps: dict[int, mmap.mmap] = {}
        self._maps_lock = threading.Lock()

    @property
    def shards(self) -> list[Path]:
        return list(self._shards)

    @property
    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the shards, merged (first shard wins)."""
        merged: dict[str, str] = {}
        for i in reversed(range(len(self._shards))):
            merged.update(self._native.metadata(i) or {})
        return merged

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def cached_fraction(self, samples: int = 64) -> float | None:
        """The share of the shards' bytes in the page cache, estimated from ``samples``
        pages per shard (one-byte reads that succeed only from the cache); None where the
        kernel or the file system cannot say."""
        return self._native.cached_fraction(samples)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __repr__(self) -> str:
        return (f"Checkpoint({str(self.path)!r}: {len(self.tensors)} tensors, "
                f"{len(self._shards)} shards, {self.nbytes} bytes)")

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise _unknown(self.path, name) from None

    def file_order(self) -> list[TensorInfo]:
        """Every tensor, shard by shard, by offset: the order of sequential reads."""
        return sorted(self.tensors.values(), key=lambda t: (t.shard, t.begin))

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the CPU: a zero-copy view of the mapped file where the dtype
        and alignment allow, else a copy. The view is copy-on-write (writes stay in memory).

        The mapping is of the file that was opened and validated (its descriptor), not of
        whatever the path names now: a checkpoint replaced by rename meanwhile (how
        safetensors' ``save_file`` and ``convert`` write) still reads its old bytes. A file
        whose size changed since it was opened is a :class:`ReadError`."""
        info = self.info(name)
        dtype = info.torch_dtype
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        shard = info.shard
        self._native.check_unchanged(shard)
        raw = torch.frombuffer(self._map(shard), dtype=torch.uint8, count=info.nbytes,
                               offset=info.begin)
        if info.begin % dtype.itemsize:
            raw = raw.clone()
        return raw.view(dtype).reshape(info.shape)

    def _map(self, shard: int) -> mmap.mmap:
        with self._maps_lock:
            if shard not in self._maps:
                # The descriptor the native checkpoint holds (mmap duplicates it).
                m = mmap.mmap(self._native.fileno(shard), 0, access=mmap.ACCESS_COPY)
                if len(m) != self._sizes[shard]:
                    m.close()
                    raise ReadError(
                        f"{self._shards[shard]}: file changed size from {self._sizes[shard]} "
                        f"to {len(m)} bytes after it was opened")
                self._maps[shard] = m
            return self._maps[shard]

    def stream(
        self,
        names: Iterable[str] | None = None,
        *,
        memory_budget: int | str = "1GiB",
        threads: int | None = None,
        auto_release: bool = True,
        method: str = "mmap",
    ) -> TensorStream:
        """Streams tensors (all, in file order, or ``names`` in the given order) through
        pinned slots carved from one buffer of ``memory_budget`` bytes.

        Yields :class:`Slot` objects, which unpack as ``(name, tensor)``. The tensor is a
        view of the slot (a :class:`SlotTensor`): with ``auto_release=True`` (the default)
        the slot is reused once the next tensor is requested, so ``.clone()`` what you keep
        (``{n: t.clone() for n, t in ck.stream()}``); with ``auto_release=False`` you
        release each slot (``slot.release()`` or ``with slot:``) and the reader waits for
        space meanwhile. Any use of the tensor, or of a view of it, after its slot's release
        raises :class:`SlotReleasedError` (``{n: t for n, t in ck.stream()}`` keeps tensors
        that raise when touched, never another tensor's bytes). Each tensor must fit the budget
        (:class:`BudgetError` names the first that does not). ``method`` is ``"mmap"``
        (copies out of a file mapping, the default), ``"pread"`` or ``"direct"``
        (``O_DIRECT``); with any, a file that shrinks meanwhile is a :class:`ReadError`,
        never a crash.
        """
        infos = self.file_order() if names is None else [self.info(n) for n in names]
        items = [(t.name, [(t.shard, t.begin, t.nbytes)]) for t in infos]
        reader = ChunkReader(self, items, memory_budget=memory_budget, chunk_bytes=None,
                             threads=threads, method=method)
        return TensorStream(reader, infos, auto_release=auto_release)

    def close(self) -> None:
        """Drops the file mappings made by :meth:`get` (views into them stay valid)."""
        with self._maps_lock:
            self._maps.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unknown(path: Path, name: str) -> Error:
    from .errors import CheckpointError

    return CheckpointError(f"{path}: no tensor named {name!r}")


#: a reader item: ``(name, segments)``, or ``(name, segments, (dtype, cols, rounding))`` to
#: quantize its rows on the way, or ``(name, segments, (dtype, cols, rounding), amax)`` to
#: quantize them with a given amax per row (a row-parallel slice's, all-reduced)
ItemSpec = (tuple[str, Sequence[tuple[int, ...]]]
            | tuple[str, Sequence[tuple[int, ...]], tuple[str, int, str]]
            | tuple[str, Sequence[tuple[int, ...]], tuple[str, int, str], Sequence[float]])


def row_amax(ckpt: Checkpoint, items: Sequence[ItemSpec], *, threads: int | None = None,
             method: str = "mmap") -> torch.Tensor:
    """The amax of every row of ``items`` (each ``(name, segments, (dtype, cols, rounding))``:
    whole rows of ``cols`` elements, e.g. one strided range per row of a row-parallel slice),
    item after item, as a float32 CPU tensor; a row holding NaN or Inf gives +Inf. Read
    straight from the checkpoint on ``threads`` native threads, without the GIL; bad items
    are a ``ValueError`` naming the tensor. Private: the host path of tensor-parallel row
    slices (:func:`fastfp8.host_quant.reduced_row_amax`)."""
    if threads is not None and threads <= 0:
        raise ValueError(f"threads must be positive, got {threads}")
    raw = ckpt._native.row_amax(items, threads=threads, method=method)
    return torch.frombuffer(bytearray(raw), dtype=torch.float32) if raw else torch.empty(0, dtype=torch.float32)


class ChunkReader:
    """Low-level: byte chunks of planned items, in plan order (``background`` items' between
    the others'), in a pooled host buffer.

    ``items`` is ``[(name, [(shard, file_offset, nbytes), ...])]``, or ``(name, segments,
    (dtype, cols, rounding))`` for an item whose rows the reader threads quantize on the way
    (its chunks then hold whole rows' e4m3 bytes followed by their scales; see
    :func:`fastfp8.host_quant.host_quant_spec`), with a fourth element, one amax per row, to
    take each row's scale from the larger of that and its own amax (a row-parallel slice).
    Each delivery is ``(item, item_offset, buf_offset, nbytes)``; the bytes are ``self.buffer[buf_offset:
    buf_offset + nbytes]`` until ``release(buf_offset, nbytes)``, which must name exactly a
    delivered, unreleased chunk (else :class:`~fastfp8.errors.ReleaseError`, a
    ``ValueError``, and nothing is freed). ``chunk_bytes=None`` delivers items whole.
    ``merge_bytes > 0``: consecutive chunks of one item that are already read when the first
    is asked for, and lie back to back in the buffer, come as one delivery of up to that
    many bytes (not for host-quantized items), so a consumer slower than the threads makes
    fewer, larger copies; each delivery is still released whole. ``optional``: indices of
    quantized items (with no given amax) that the threads may read plain instead, deciding as
    they reach each one: :meth:`quantized` says which, before the item's first delivery.
    With ``bus_bytes_per_s`` (the rate at which the consumer moves the ring's bytes on), each
    goes to the side that keeps the threads' work and the bus's even (the threads time their
    own pieces, plain and quantized); without it, quantized when their idle time waiting for
    room covers the cost. ``read_ahead``: bytes of the items' file ranges, in plan order, the
    page cache is asked to read (``POSIX_FADV_WILLNEED``, from one more thread) ahead of
    the chunks given to the threads (0: none; not with ``method="direct"``).
    ``background``: indices of items read as they are whose chunks come spread evenly
    between the other items' chunks instead of at their place in the plan (each item's
    chunks still in order; ignored with ``read_ahead``). Close it (or use ``with``) to stop
    and join the threads and give the buffer back to the pool; ``close`` joins them even
    while another thread is inside ``next()`` (which then raises
    :class:`~fastfp8.errors.CancelledError`).
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        items: Sequence[ItemSpec],
        *,
        memory_budget: int | str,
        chunk_bytes: int | None,
        threads: int | None = None,
        method: str = "mmap",
        piece_bytes: int = 4 << 20,
        pin: bool | None = None,
        merge_bytes: int = 0,
        optional: Sequence[int] = (),
        bus_bytes_per_s: float = 0.0,
        read_ahead: int = 0,
        background: Sequence[int] = (),
    ) -> None:
        budget = parse_bytes(memory_budget)
        if budget <= 0:
            raise BudgetError(f"memory_budget must be positive, got {memory_budget!r}")
        if threads is not None and threads <= 0:
            raise ValueError(f"threads must be positive, got {threads}")
        t = time.perf_counter()
        self.buffer: torch.Tensor = POOL.acquire(budget, pin=pin)
        #: seconds the ring took to get from the pool (page-locking a new one: most of a
        #: warm load's setup; ``stats.phases["pin"]``)
        self.acquire_seconds = time.perf_counter() - t
        self.budget = budget
        try:
            self._native = _native.Reader(
                ckpt._native, items, self.buffer, self.buffer.data_ptr(), budget,
                chunk_bytes=chunk_bytes, threads=threads, piece_bytes=piece_bytes,
                method=method, merge_bytes=merge_bytes, optional=list(optional),
                bus_bytes_per_s=bus_bytes_per_s, read_ahead_bytes=read_ahead, background=list(background),
            )
        except BaseException:
            POOL.release(self.buffer)
            raise
        self._closed = False
        #: the items whose quantization the threads decide (:meth:`quantized`)
        self.optional = frozenset(optional)
        #: the items whose chunks come between the others' (with no read-ahead window)
        self.background = frozenset(background) if not read_ahead else frozenset()
        self._held = 0  # delivered, unreleased chunks
        self._final_stats: dict[str, int] | None = None
        self._final_non_finite: list[int] | None = None

    def next(self) -> tuple[int, int, int, int] | None:
        d = self._native.next()
        if d is not None and d[3] > 0:
            self._held += 1
        return d

    def quantized(self, item: int) -> bool | None:
        """Whether item ``item`` comes quantized (e4m3 bytes and scales per chunk): as given,
        or for an ``optional`` one as the threads decided on reaching it, before its first
        delivery (None until then)."""
        return self._native.quantized(item)

    def non_finite(self) -> list[int]:
        """The items quantized on the way that hold NaN or Inf (a NaN scale in a chunk
        read so far), in plan order: checked by the threads as they write the scales, so
        that nobody reads them back. Also after ``close``."""
        if self._final_non_finite is not None:
            return list(self._final_non_finite)
        return self._native.non_finite()

    def view(self, buf_offset: int, nbytes: int) -> torch.Tensor:
        if self._closed:
            raise ValueError("the reader is closed")
        return self.buffer[buf_offset : buf_offset + nbytes]

    def release(self, buf_offset: int, nbytes: int) -> None:
        if not self._closed and nbytes > 0:
            self._native.release(buf_offset, nbytes)
            self._held -= 1

    def chunk_times(self) -> list[tuple[int, int, int, int, int, int]]:
        """Each chunk planned so far, in plan order: ``(item, src_len, alloc_ns, read_ns,
        deliver_ns, release_ns)``, when it was allocated in the ring, read by the threads,
        delivered and released (ns since the reader started; 0: not yet). Before ``close``."""
        return self._native.chunk_times()

    def stats(self) -> dict[str, int]:
        """``budget``, ``peak_in_flight`` (bytes), ``bytes_read``, ``threads``,
        ``room_wait_ns`` (the threads' time idle, summed, while the ring was full: waiting
        for the consumer to release chunks)."""
        if self._final_stats is not None:
            return dict(self._final_stats)
        st = self._native.stats()
        return {"budget": st.budget, "peak_in_flight": st.peak_in_flight,
                "bytes_read": st.bytes_read, "threads": st.threads, "room_wait_ns": st.room_wait_ns}

    def close(self) -> None:
        """Stops and joins the threads, then gives the buffer back to the pool. Idempotent."""
        if self._closed:
            return
        self._final_stats = self.stats()
        self._final_non_finite = self.non_finite()
        self._closed = True
        self._native.close()
        if self._held == 0:
            POOL.release(self.buffer)
        # else: views into the buffer are still out there; let it die with them instead of
        # handing it to the next load.
        # Drop our reference, so that the memory goes back as soon as the pool and the
        # views let it (the pool frees it at once outside POOL.retain()).
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class _SlotState:
    """Shared by a slot and every tensor viewing it: whether the slot was given back."""

    __slots__ = ("name", "released")

    def __init__(self, name: str) -> None:
        self.name = name
        self.released = False

    def error(self) -> SlotReleasedError:
        return SlotReleasedError(
            f"tensor {self.name!r} was used after its slot was released for reuse (its bytes "
            "now belong to another tensor); clone() what you keep, or stream with "
            "auto_release=False")


class SlotTensor(torch.Tensor):
    """A streamed tensor: a view of its pinned slot. Any torch operation on it, or on a view
    of it, after the slot was released raises :class:`SlotReleasedError` instead of reading
    bytes that now belong to another tensor. Results that do not share the slot's memory
    (``clone()``, ``.to("cuda")``, arithmetic) are plain tensors."""

    _fastfp8_slot: _SlotState

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        state = None
        for a in flat:
            if isinstance(a, SlotTensor):
                st = a.__dict__.get("_fastfp8_slot")
                if st is not None and st.released:
                    raise st.error()
                state = state or st
        with torch._C.DisableTorchFunctionSubclass():
            ret = func(*args, **kwargs)
        if state is None:
            return ret
        base = None
        for a in flat:
            if isinstance(a, SlotTensor):
                with torch._C.DisableTorchFunctionSubclass():
                    base = a.untyped_storage().data_ptr()
                break

        def rebind(r: Any) -> Any:
            # Views of the slot stay bound to it; anything else comes back plain.
            if isinstance(r, torch.Tensor) and not isinstance(r, SlotTensor):
                with torch._C.DisableTorchFunctionSubclass():
                    shares = r.untyped_storage().data_ptr() == base
                    if shares:
                        r = r.as_subclass(SlotTensor)
                if shares:
                    r.__dict__["_fastfp8_slot"] = state
            return r

        return torch.utils._pytree.tree_map(rebind, ret)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


class Slot:
    """One streamed tensor in its pinned slot. Unpacks as ``(name, tensor)``."""

    __slots__ = ("_len", "_off", "_reader", "_state", "_tensor", "info", "name")

    def __init__(self, reader: ChunkReader, info: TensorInfo, buf_offset: int) -> None:
        self._reader = reader
        self.info = info
        self.name = info.name
        self._off = buf_offset
        self._len = info.nbytes
        self._state = _SlotState(info.name)
        if info.nbytes == 0:
            self._tensor: torch.Tensor | None = torch.empty(info.shape, dtype=info.torch_dtype)
        else:
            dtype = info.torch_dtype
            if buf_offset % dtype.itemsize == 0:
                # A tensor on the buffer's storage that is not an autograd view of the buffer
                # tensor: once released and detached (see _invalidate), the object a caller
                # still holds no longer keeps the staging memory alive.
                base = torch.empty(0, dtype=dtype).set_(
                    reader.view(0, 0).untyped_storage(), buf_offset // dtype.itemsize,
                    info.shape, _contiguous_strides(info.shape))
            else:
                base = reader.view(buf_offset, info.nbytes).view(dtype).reshape(info.shape)
            t = torch.Tensor._make_subclass(SlotTensor, base)
            t.__dict__["_fastfp8_slot"] = self._state
            self._tensor = t

    @property
    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            raise self._state.error()
        return self._tensor

    @property
    def released(self) -> bool:
        return self._tensor is None

    def _invalidate(self) -> None:
        t, self._tensor = self._tensor, None
        self._state.released = True
        if isinstance(t, SlotTensor):
            # Detach the tensor object the caller may still hold (a loop variable) from the
            # buffer, so that it does not keep the staging memory alive; using it raises.
            with torch._C.DisableTorchFunctionSubclass():
                t.set_()

    def release(self) -> None:
        """Gives the slot back to the reader; its tensor (and views of it) then raise
        :class:`SlotReleasedError` when used. Idempotent."""
        if self._tensor is not None:
            self._invalidate()
            self._reader.release(self._off, self._len)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.name, self.tensor))

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else f"{self.info.dtype}{list(self.info.shape)}"
        return f"Slot({self.name!r}, {state})"


class TensorStream:
    """Iterator of :class:`Slot`; see :meth:`Checkpoint.stream`. Use it in a ``with``
    block, or run it to the end, so its threads stop and its buffer returns to the pool."""

    def __init__(self, reader: ChunkReader, infos: list[TensorInfo], *, auto_release: bool):
        self._reader = reader
        self._infos = infos
        self._auto = auto_release
        self._last: Slot | None = None
        for t in infos:
            t.torch_dtype  # noqa: B018 - raise UnsupportedDtypeError before reading anything

    def __iter__(self) -> TensorStream:
        return self

    def __next__(self) -> Slot:
        if self._auto and self._last is not None:
            self._last.release()
            self._last = None
        try:
            d = self._reader.next()
        except BaseException:
            self.close()
            raise
        if d is None:
            self.close()
            raise StopIteration
        item, _, buf_offset, _ = d
        slot = Slot(self._reader, self._infos[item], buf_offset)
        if self._auto:
            self._last = slot
        return slot

    def stats(self) -> dict[str, int]:
        """``budget``, ``peak_in_flight`` (bytes), ``bytes_read``, ``threads``."""
        return self._reader.stats()

    def close(self) -> None:
        """Stops the reader. Tensors of unreleased slots must not be used afterwards."""
        if self._last is not None:
            self._last._invalidate()
            self._last = None
        self._reader.close()

    def __enter__(self) -> TensorStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
