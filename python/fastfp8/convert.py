"""``convert``: a bf16 checkpoint -> an FP8_DYNAMIC compressed-tensors checkpoint on disk.

The output is what llm-compressor's ``FP8_DYNAMIC`` scheme writes (and what vLLM and
transformers + compressed-tensors load): per quantized linear ``<m>.weight``
(``F8_E4M3 [out, in]``) and ``<m>.weight_scale`` (the source dtype, ``[out, 1]``), every
other tensor unchanged, ``config.json`` with a compressed-tensors ``quantization_config``,
sharded safetensors files ``model-0000i-of-0000N.safetensors`` and their index, and the
source directory's other files (tokenizer, generation config, code, ...) copied.

Streaming: the one engine (:mod:`fastfp8.engine`) reads the source in file order through one buffer of
``memory_budget`` bytes; each tensor is quantized once its bytes are complete and written
straight into its place in the output shard, whose header was computed beforehand from
the source headers alone. Host memory therefore stays at the budget plus one tensor (and
its FP8 copy), whatever the size of the model or of a shard.

Fused experts (Llama4's ``...experts.gate_up_proj [E, hidden, 2*inter]`` and
``...experts.down_proj [E, inter, hidden]``) are written as per-expert 2-D linears,
``...experts.<e>.gate_proj|up_proj|down_proj.weight`` (+ ``weight_scale``): the layout
llm-compressor produces for Llama4 (its calibration wrapper unpacks the experts into
``nn.Linear`` modules) and that vLLM's Llama4 loader maps onto its fused-MoE ``w13``/``w2``
parameters. Quantization is per output row, so these bytes are exactly the rows of
:func:`fastfp8.load_quantized`'s ``w13_weight``/``w2_weight``.

Writes go to ``DST.tmp-<pid>`` beside ``DST``, renamed to ``DST`` only when complete (and
removed on any failure, Ctrl-C included).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from .checkpoint import TORCH_DTYPES, Checkpoint, open_checkpoint
from .ctconfig import quantization_config
from .engine import LoadStats, StreamSink, resolve_device, run
from .errors import CheckpointError
from .hub import resolve
from .layouts import check_with_transformers, read_config
from .options import LoadOptions
from .plan import OutTensor, Plan, checkpoint_tensors, make_plan
from .sidefiles import side_files
from .units import format_bytes, parse_bytes

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"



# ---------------------------------------------------------------------------------------
# the tensor stream (shared with the vLLM plugin)


def iter_compressed(ckpt: Checkpoint, plan: Plan, options: LoadOptions, device: torch.device,
                    stats: LoadStats | None = None, *, desc: str = "fastfp8") -> Iterator[tuple[str, torch.Tensor]]:
    """Yields ``(name, tensor)`` of the compressed-tensors FP8_DYNAMIC checkpoint of
    ``ckpt`` (per-expert linears for fused experts), on ``device``, in the order of
    ``plan.checkpoint_outputs()``, through the one engine (overlapped on CUDA). Each
    yielded tensor is fresh: the caller may keep it."""
    for job, outs in run(ckpt, plan, options, device, StreamSink(device), stats or LoadStats(), desc=desc):
        yield from checkpoint_tensors(job, outs)


# ---------------------------------------------------------------------------------------
# writing


class _ShardWriter:
    """Writes one safetensors file sequentially: the header (computed from the planned
    tensors), then each tensor's bytes as it comes, in the planned order."""

    def __init__(self, path: Path, tensors: list[OutTensor], metadata: dict[str, str]) -> None:
        header: dict[str, object] = {"__metadata__": metadata}
        off = 0
        for t in tensors:
            header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path = path
        self.expected = list(tensors)
        self.pos = 0
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        want = self.expected[self.pos]
        if name != want.name or t.dtype != want.dtype or tuple(t.shape) != want.shape:
            raise AssertionError(f"writer expected {want}, got {name} {t.dtype} {tuple(t.shape)}")
        self.pos += 1
        if t.numel():
            self.f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)

    @property
    def full(self) -> bool:
        return self.pos == len(self.expected)

    def close(self) -> None:
        if not self.f.closed:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()


class _HasNbytes(Protocol):
    nbytes: int


_T = TypeVar("_T", bound=_HasNbytes)


def plan_shards(outputs: list[_T], max_shard_size: int) -> list[list[_T]]:
    """Tensors (anything with ``nbytes``) grouped, in order, into shards of at most
    ``max_shard_size`` bytes (a larger tensor gets a shard of its own), as transformers'
    ``save_pretrained`` does."""
    shards: list[list[_T]] = [[]]
    size = 0
    for t in outputs:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


@dataclass
class ConvertResult:
    """What :func:`convert` wrote."""

    path: Path
    shards: list[str] = field(default_factory=list)
    tensors: int = 0
    quantized: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    ignored: list[str] = field(default_factory=list)
    copied_files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    revision: str | None = None,
    options: LoadOptions | None = None,
    **kwargs,
) -> ConvertResult:
    """Writes the FP8_DYNAMIC compressed-tensors checkpoint of the bf16/fp16/fp32
    checkpoint ``src`` (a model directory, one ``.safetensors`` file with the model's
    ``config.json`` beside it, or a Hugging Face Hub id with ``revision``) to directory ``dst``.

    Args:
        device: where to quantize (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        max_shard_size: the largest output shard (a larger tensor gets its own shard).
        overwrite: replace an existing ``dst`` (only once the new one is complete).
        options: a :class:`fastfp8.options.LoadOptions`, or its fields as keywords
            (``ignore``, ``default_ignore``, ``layout``, ``memory_budget``, ``threads``,
            ``rounding``, ``allow_non_finite``, ``progress``, ...; see
            :func:`fastfp8.load_quantized`).

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is false.
        ValueError: ``src`` is already quantized, or ``dst`` is ``src`` or inside it.
        fastfp8.CheckpointError: no ``config.json`` to write the output's from.
        fastfp8.LayoutError: an architecture or tensor whose layout fastfp8 does not know.
        fastfp8.Error: an invalid checkpoint, a read error, a NaN/Inf weight.
    """
    if options is None:
        options = LoadOptions.make(**kwargs)
    elif kwargs:
        options = options.replace(**kwargs)
    t0 = time.perf_counter()
    src, dst = resolve(src, revision=revision), Path(dst)
    ckpt = open_checkpoint(src)
    src_dir = src if src.is_dir() else src.parent
    rs, rd = src.resolve(), dst.resolve()
    if rd == rs or rd in rs.parents or (src.is_dir() and rs in rd.parents):
        raise ValueError(f"destination {dst} must not be the source, contain it, or be inside the source directory")
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise FileExistsError(errno.EEXIST, f"{dst} exists (use --force / overwrite=True to replace it)")
    cfg = read_config(src)
    if cfg is None:
        raise CheckpointError(
            f"{src}: no config.json {'in it' if src.is_dir() else 'beside it'}; convert writes a model that "
            "transformers and vLLM load, which needs the model's config.json: pass the model directory, or put "
            "its config.json beside the .safetensors file")
    config = dict(cfg.raw)
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{src} is already quantized ({method}); convert needs a bf16/fp16/fp32 checkpoint")
    dev = resolve_device(device)
    plan = make_plan(ckpt, options)
    check_with_transformers(plan.layout, plan.targets)  # offline work: worth the seconds it takes
    outputs = plan.checkpoint_outputs()
    shards = plan_shards(outputs, parse_bytes(max_shard_size))
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    files = side_files(src) if src.is_dir() else []
    result = ConvertResult(path=dst, shards=names, tensors=len(outputs),
                           quantized=sum(o.name.endswith("_scale") for o in outputs), bytes_in=ckpt.nbytes,
                           bytes_out=sum(o.nbytes for o in outputs), ignored=list(plan.ignored),
                           copied_files=[str(f) for f in files])
    dst.parent.mkdir(parents=True, exist_ok=True)
    need = result.bytes_out + sum((src_dir / f).stat().st_size for f in files)
    free = shutil.disk_usage(dst.parent).free
    if need > free:
        raise OSError(errno.ENOSPC, f"{dst.parent} has {format_bytes(free)} free, the output needs "
                                    f"{format_bytes(need)}")

    tmp = dst.parent / f"{dst.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    writer: _ShardWriter | None = None
    try:
        tmp.mkdir()  # inside the try: an interrupt as it returns still removes it
        weight_map: dict[str, str] = {}
        shard_iter = iter(zip(names, shards, strict=True))
        stream = iter_compressed(ckpt, plan, options, dev, desc="convert")
        try:
            for name, t in stream:
                if writer is None or writer.full:
                    if writer is not None:
                        writer.close()
                    fname, planned = next(shard_iter)
                    writer = _ShardWriter(tmp / fname, planned, {"format": "pt"})
                writer.write(name, t)
                weight_map[name] = writer.path.name
        finally:
            stream.close()
        if writer is not None:
            writer.close()
            writer = None
        for fname, planned in shard_iter:  # only shards of nothing (an empty checkpoint)
            _ShardWriter(tmp / fname, planned, {"format": "pt"}).close()
        index = {"metadata": {"total_size": result.bytes_out}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config["quantization_config"] = quantization_config(result.ignored)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in files:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src_dir / f, tmp / f)
        _fsync_dir(tmp)
        _replace(tmp, dst)
    except BaseException:
        if writer is not None:
            writer.f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.seconds = time.perf_counter() - t0
    return result


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, dst: Path) -> None:
    """Renames ``tmp`` to ``dst``; an existing ``dst`` is moved aside first and deleted
    after, so that ``dst`` is either the old or the complete new checkpoint."""
    if not (dst.exists() or dst.is_symlink()):
        os.rename(tmp, dst)
        return
    old = dst.parent / f"{dst.name}.old-{os.getpid()}"

    def there(p: Path) -> bool:
        return p.exists() or p.is_symlink()

    try:
        os.rename(dst, old)
        os.rename(tmp, dst)
    except BaseException:
        if there(old) and not there(dst):
            os.rename(old, dst)  # the new one did not make it: put the old one back
        raise
    finally:
        if there(dst) and there(old):  # the new one is in: the old one goes
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
