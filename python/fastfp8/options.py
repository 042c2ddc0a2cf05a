"""``LoadOptions``: every knob of a load, its default and its validation, in one place.

Every entry point (:func:`fastfp8.load_quantized`, :func:`fastfp8.convert.convert`,
:func:`fastfp8.build_quantized_model`, the vLLM plugin, the CLI) builds one of these with
:meth:`LoadOptions.make` and hands it to the one planner and the one engine; nothing
else parses a byte size or resolves a default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import host
from .units import parse_bytes

ROUNDINGS = ("auto", "eager", "fp32")
METHODS = ("auto", "mmap", "pread", "direct")
QUANTIZE_ON = ("auto", "host", "device", "split", "adaptive")
LAYOUTS = ("auto", "names")


@dataclass(frozen=True)
class LoadOptions:
    """How to load. Build it with :meth:`make` (which parses and validates); the fields
    hold parsed values (byte sizes as ints, ``ignore`` as a tuple)."""

    #: modules left unquantized, compressed-tensors style (exact names or ``re:<pattern>``),
    #: added to :data:`fastfp8.DEFAULT_IGNORE` unless ``default_ignore`` is false
    ignore: tuple[str, ...] = ()
    default_ignore: bool = True
    #: ``"auto"``: the model layout from ``config.json`` (an unknown architecture is refused);
    #: ``"names"``: quantize every 2-D float ``*.weight`` that is not ignored, by name
    layout: str = "auto"
    #: pinned host memory for reading; the bytes in flight never exceed it (None: from the
    #: host's last-level cache and where the load quantizes, resolved per load: :meth:`staged`)
    memory_budget: int | None = None
    #: the unit of host-to-device copies (at most a quarter of the budget; None: with the budget)
    chunk_bytes: int | None = None
    #: the unit of work of one reader thread
    piece_bytes: int = 4 << 20
    #: native reader threads (None: the machine's cores, at most 16)
    threads: int | None = None
    #: how the reader reads: ``"pread"`` (the kernel copies from the page cache: the
    #: fastest warm load in every H200 comparison), ``"mmap"`` (copies out of a mapping: the
    #: fastest cold load on the H200 machine, 1.70 GB/s against 1.50 for pread),
    #: ``"direct"`` (``O_DIRECT`` past the page cache, 32 threads deep unless ``threads``
    #: is set; slower cold than the page cache's read-ahead on the H200 machine's disk);
    #: ``"auto"``: ``"mmap"`` with ``quantize_on="host"`` on a GPU (rows quantized in place
    #: in the page cache, no copy); else ``"pread"`` when most of the checkpoint is in the
    #: page cache (sampled when the load starts: :func:`fastfp8.engine.resolve_method`),
    #: else ``"mmap"``
    method: str = "auto"
    #: bytes of the checkpoint's files the page cache is asked to read ahead of the reader
    #: threads, in plan order (``POSIX_FADV_WILLNEED`` from one more thread: a disk queue as
    #: deep as the window, whatever the thread count); 0: none, the default. Not used with
    #: ``"direct"``. Off by default: on an H200 machine's disk (a virtual disk with the
    #: kernel's read-ahead at 8 MiB) cold loads ran 1.66 GB/s with 512 MiB, 1.72 with 2 GiB
    #: and 1.71 without (medians of 3, round robin; benches/NOTES.md, session 18)
    read_ahead: int = 0
    rounding: str = "auto"
    #: where weights are quantized: ``"host"`` (the reader threads, on the way: FP8 crosses
    #: the bus, half the bytes), ``"device"`` (the device's kernel, after the copy),
    #: ``"split"``: ``host_share`` of the quantized bytes on the host (the weights only the
    #: device can do counted on its side), tensor by tensor, so that the cores and the bus are
    #: both busy (:func:`fastfp8.host_quant.host_quant_specs`); ``"adaptive"``: the reader
    #: threads decide tensor by tensor as they reach each one, on the host when the time they
    #: spent waiting for room in the ring covers its cost, else on the device (tensor-parallel
    #: row slices on the device); ``"auto"``: ``"host"`` on the CPU, on one GPU ``"host"``
    #: for a checkpoint in the page cache and ``"adaptive"`` for one that is not,
    #: ``"device"`` on a GPU with tensor parallelism
    #: (:func:`fastfp8.host_quant.resolve_quantize_on`)
    quantize_on: str = "auto"
    #: with ``quantize_on="split"``: the share of the quantized bytes the host takes (0 - 1;
    #: the rest cross the bus in the checkpoint's dtype and the device quantizes them);
    #: None: :data:`fastfp8.host_quant.DEFAULT_HOST_SHARE`, the best share measured
    host_share: float | None = None
    allow_non_finite: bool = False
    #: a progress bar on stderr (None: when stderr is a terminal)
    progress: bool | None = None

    @classmethod
    def make(
        cls,
        *,
        ignore: Iterable[str] | str | None = None,
        default_ignore: bool = True,
        layout: str = "auto",
        memory_budget: int | str | None = None,
        chunk_bytes: int | str | None = None,
        piece_bytes: int | str = "4MiB",
        threads: int | None = None,
        method: str = "auto",
        read_ahead: int | str = 0,
        rounding: str = "auto",
        quantize_on: str = "auto",
        host_share: float | None = None,
        allow_non_finite: bool = False,
        progress: bool | None = None,
    ) -> LoadOptions:
        """Parses and validates; raises ``ValueError``/``TypeError`` naming the knob.

        ``memory_budget`` and ``chunk_bytes`` default to what fits this host's last-level
        cache, for where the load quantizes (:meth:`staged`, once that is resolved); a
        ``memory_budget`` given without ``chunk_bytes`` gets 1/16 of it (1 - 64 MiB).
        """
        if isinstance(ignore, str):
            ignore = [ignore]
        ignore = tuple(ignore or ())
        for e in ignore:
            if not isinstance(e, str) or not e:
                raise ValueError(f"ignore: entries must be non-empty strings, got {e!r}")
        from .layouts import IgnoreRules

        IgnoreRules(ignore)  # a bad pattern raises here, once
        _check_bool("default_ignore", default_ignore)
        _check_bool("allow_non_finite", allow_non_finite)
        _check_choice("layout", layout, LAYOUTS)
        _check_choice("method", method, METHODS)
        _check_choice("rounding", rounding, ROUNDINGS)
        _check_choice("quantize_on", quantize_on, QUANTIZE_ON)
        if progress is not None:
            _check_bool("progress", progress)
        if host_share is not None and (isinstance(host_share, bool) or not isinstance(host_share, (int, float))
                                       or not 0 <= host_share <= 1):
            raise ValueError(f"host_share must be a number from 0 to 1, got {host_share!r}")
        try:
            read_ahead = parse_bytes(read_ahead)
        except (TypeError, ValueError) as e:
            raise ValueError(f"read_ahead: {e}") from None
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0):
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        budget = _positive_bytes("memory_budget", memory_budget) if memory_budget is not None else None
        chunk = _positive_bytes("chunk_bytes", chunk_bytes) if chunk_bytes is not None else None
        if budget is not None:
            chunk = max(1, min(chunk or min(max(budget // 16, 1 << 20), 64 << 20), budget // 4))
        return cls(ignore=ignore, default_ignore=default_ignore, layout=layout, memory_budget=budget,
                   chunk_bytes=chunk, piece_bytes=_positive_bytes("piece_bytes", piece_bytes), threads=threads,
                   method=method, read_ahead=read_ahead, rounding=rounding, quantize_on=quantize_on,
                   host_share=None if host_share is None else float(host_share), allow_non_finite=allow_non_finite,
                   progress=progress)

    @classmethod
    def from_mapping(cls, extra: dict[str, Any] | None, *, where: str = "options") -> LoadOptions:
        """From a JSON-like dict (the vLLM plugin's ``--model-loader-extra-config``);
        unknown keys are a ``ValueError`` that lists the allowed ones."""
        if extra is not None and not isinstance(extra, dict):
            raise ValueError(f"{where} must be a dict, got {type(extra).__name__}")
        extra = dict(extra or {})
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - allowed)
        if unknown:
            raise ValueError(f"unknown {where} keys: {unknown} (allowed: {sorted(allowed)})")
        return cls.make(**extra)

    def staged(self) -> LoadOptions:
        """These options with ``memory_budget`` and ``chunk_bytes`` made explicit: the ones
        given, else :func:`fastfp8.host.default_staging` for this host's last-level cache, the
        ring sized for e4m3 bytes when the reader threads quantize every weight
        (``quantize_on="host"``, resolved first: :func:`fastfp8.host_quant.resolve_quantize_on`)."""
        if self.memory_budget is not None and self.chunk_bytes is not None:
            return self
        budget, chunk = host.default_staging(host.last_level_cache_bytes(), fp8=self.quantize_on == "host")
        if self.memory_budget is not None:
            budget = self.memory_budget
        chunk = max(1, min(self.chunk_bytes or chunk, budget // 4))
        return dataclasses.replace(self, memory_budget=budget, chunk_bytes=chunk)

    def replace(self, **changes: Any) -> LoadOptions:
        """A copy with ``changes`` applied and validated again."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.update(changes)
        return LoadOptions.make(**fields)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _positive_bytes(name: str, value: int | str) -> int:
    try:
        n = parse_bytes(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from None
    if n <= 0:
        raise ValueError(f"{name} must be a positive byte size, got {value!r}")
    return n
