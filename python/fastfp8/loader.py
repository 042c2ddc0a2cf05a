"""``load_quantized``: stream a bf16 checkpoint into FP8 on the device, never holding the
bf16 model there. Options -> plan -> engine -> a state-dict sink (see
:mod:`fastfp8.engine` for the pipeline, :mod:`fastfp8.layouts` for what is quantized)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from .checkpoint import Checkpoint, open_checkpoint
from .engine import LoadStats, StateSink, resolve_device, run
from .hub import resolve
from .options import LoadOptions
from .plan import make_plan
from .tensor_parallel import resolve as resolve_tp

__all__ = ["LoadStats", "QuantizedState", "load_quantized"]


class QuantizedState(dict):
    """``name -> tensor`` on the device, with the load's :class:`LoadStats` as ``.stats``.

    For each quantized linear weight ``<m>.weight`` holds ``float8_e4m3fn [out, in]`` and
    ``<m>.weight_scale`` ``[out, 1]`` in the source dtype (compressed-tensors FP8_DYNAMIC
    names and layout). Fused experts ``<p>.experts.gate_up_proj`` become
    ``<p>.experts.w13_weight [E, 2I, H]`` (gate rows first, then up) and
    ``<p>.experts.down_proj`` becomes ``<p>.experts.w2_weight [E, H, I]``, each with
    ``..._weight_scale [E, out, 1]``, whichever orientation the checkpoint stores them in.
    Every other tensor is unchanged.
    """

    stats: LoadStats


def load_quantized(
    path: str | os.PathLike[str] | Checkpoint,
    *,
    device: str | torch.device = "cuda",
    revision: str | None = None,
    tp_rank: int | None = None,
    tp_size: int | None = None,
    process_group: Any = None,
    options: LoadOptions | None = None,
    **kwargs: Any,
) -> QuantizedState:
    """Loads a bf16/fp16/fp32 safetensors checkpoint as FP8 e4m3 per-output-channel.

    Args:
        path: a ``.safetensors`` file, a model directory, a Hugging Face Hub id
            (``org/name``, read from the local cache, downloaded there if needed and allowed:
            :func:`fastfp8.hub.resolve`), or an open :class:`Checkpoint`.
        device: where the result goes (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
        revision: the branch, tag or commit of a Hub id.
        tp_rank, tp_size, process_group: tensor-parallel loading: this rank reads and keeps
            only its slice of each split tensor (:mod:`fastfp8.layouts` says how each
            splits, as vLLM shards them); row-parallel rows' maxima are all-reduced over
            ``process_group`` (torch.distributed: NCCL on GPUs, gloo on CPUs; on the host
            path once per load, before the read), so every
            rank's bytes equal the matching slice of the one-GPU result. Rank and size
            default to the group's.
        options: a :class:`fastfp8.options.LoadOptions`; or its fields as keywords:
            ``ignore`` (module names or ``"re:<pattern>"``, added to
            :data:`fastfp8.DEFAULT_IGNORE` unless ``default_ignore=False``), ``layout``
            (``"auto"``: from config.json; ``"names"``: every 2-D float ``*.weight``),
            ``memory_budget`` (pinned host memory for reading; default: fits the host's
            last-level cache), ``chunk_bytes``, ``piece_bytes``, ``threads``, ``method``
            (``"auto"``: ``"pread"`` when the checkpoint is in the page cache, else
            ``"mmap"``; ``"pread"``, ``"mmap"`` or ``"direct"``), ``read_ahead`` (bytes the
            page cache is asked to read ahead of the reader threads, for a cold load; default
            0: none), ``rounding`` (``"auto"``: the bytes
            compressed-tensors itself produces on that device; ``"eager"``; ``"fp32"``),
            ``allow_non_finite``, ``progress``.

    Returns:
        a :class:`QuantizedState` (a dict of device tensors with ``.stats``).

    Raises:
        fastfp8.LayoutError: an architecture or tensor whose layout fastfp8 does not know.
        fastfp8.NonFiniteWeightError: a weight holds NaN/Inf (``allow_non_finite=True``
            loads it anyway and lists it in ``stats.non_finite``).
        fastfp8.Error: no GPU for a CUDA device, an invalid checkpoint, a read error.
    """
    t0 = time.perf_counter()
    if options is None:
        options = LoadOptions.make(**kwargs)
    elif kwargs:
        options = options.replace(**kwargs)
    dev = resolve_device(device)
    tp = resolve_tp(tp_rank, tp_size, process_group)
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(resolve(path, revision=revision))
    plan = make_plan(ckpt, options, tp)
    sink = StateSink(dev)
    stats = LoadStats()
    stats.phases["setup"] = stats.phases["plan"] = time.perf_counter() - t0
    for _ in run(ckpt, plan, options, dev, sink, stats):
        pass
    stats.seconds = time.perf_counter() - t0
    result = QuantizedState((o.name, sink.state[o.name]) for o in plan.state_outputs())
    result.stats = stats
    return result
