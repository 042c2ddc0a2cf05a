"""``convert``: a bf16 checkpoint -> an FP8_DYNAMIC compressed-tensors checkpoint on disk.

The output is what llm-compressor's ``FP8_DYNAMIC`` scheme writes (and what vLLM and
transformers + compressed-tensors load): per quantized linear ``<m>.weight``
(``F8_E4M3 [out, in]``) and ``<m>.weight_scale`` (the source dtype, ``[out, 1]``), every
other tensor unchanged, ``config.json`` with a compressed-tensors ``quantization_config``,
sharded safetensors files ``model-0000i-of-0000N.safetensors`` and their index, and the
source directory's other files (tokenizer, generation config, code, ...) copied.

Streaming: the native reader copies the source in file order through one buffer of
``memory_budget`` bytes; each tensor is quantized once its bytes are complete and written
straight into its place in the output shard, whose header was computed beforehand from
the source headers alone. Host memory therefore stays at the budget plus one tensor (and
its FP8 copy), whatever the size of the model or of a shard.

Llama4's fused experts (``...experts.gate_up_proj [E, hidden, 2*inter]`` and
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
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from .checkpoint import TORCH_DTYPES, Checkpoint, ChunkReader, open_checkpoint
from .errors import CheckpointError, NonFiniteWeightError
from .quant import NonFiniteError, quantize_channelwise
from .select import FUSED_EXPERTS, QUANTIZABLE_DTYPES, Target, module_of, plan_targets
from .units import format_bytes, parse_bytes

FP8 = torch.float8_e4m3fn
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"

#: llm-compressor's FP8_DYNAMIC scheme, as compressed-tensors serializes it.
WEIGHT_ARGS = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "channel",
               "dynamic": False, "observer": "minmax"}
INPUT_ARGS = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token",
              "dynamic": True}

#: Files of a source directory never copied: weights in other formats (the safetensors
#: shards and index are rewritten), and what a hub cache or VCS puts beside them.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_SKIP_NAMES = {INDEX_NAME, "pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json"}


# ---------------------------------------------------------------------------------------
# quantization_config


def quantization_config(ignore: Iterable[str]) -> dict:
    """The ``quantization_config`` of an FP8_DYNAMIC compressed-tensors checkpoint, as
    llm-compressor writes it into ``config.json`` (``ModelCompressor.update_config``):
    one group targeting ``Linear``, FP8 per-channel static weights, FP8 per-token dynamic
    activations, format ``float-quantized``, status ``compressed``, and ``ignore``.

    Written from literals, so that the output does not depend on the installed
    compressed-tensors (importing it costs seconds); the tests check that
    compressed-tensors' own ``QuantizationConfig`` parses it to the same scheme.
    """
    return {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": dict(WEIGHT_ARGS),
                                      "input_activations": dict(INPUT_ARGS), "output_activations": None,
                                      "format": "float-quantized"}},
        "format": "float-quantized",
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
    }


def ignored_modules(targets: list[Target]) -> list[str]:
    """Concrete module names left unquantized that compressed-tensors/vLLM would otherwise
    treat as quantized linears: every 2-D float ``<m>.weight`` kept as is (lm_head,
    embeddings, MoE routers, user ignores) and ignored fused-expert modules."""
    out: list[str] = []
    for t in targets:
        src = t.source
        if t.kind != "copy" or src.dtype not in QUANTIZABLE_DTYPES:
            continue
        if src.name.endswith(".weight") and len(src.shape) == 2:
            out.append(module_of(src.name))
        elif len(src.shape) == 3 and any(src.name.endswith(s) for s in FUSED_EXPERTS):
            module = src.name.rsplit(".", 1)[0]
            if module not in out:
                out.append(module)
    return out


# ---------------------------------------------------------------------------------------
# the tensor stream (shared with the vLLM plugin)


@dataclass(frozen=True)
class OutTensor:
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
class _Job:
    target: Target
    expert: int | None  # fused experts: one job per expert
    nbytes: int  # bytes read
    outputs: list[OutTensor]


def _expert_names(t: Target, e: int) -> list[str]:
    """Per-expert linear names of fused experts ``<p>.experts.gate_up_proj`` / ``down_proj``."""
    stem = t.source.name.rsplit(".", 1)[0]  # "<p>.experts"
    if t.source.name.endswith("gate_up_proj"):
        return [f"{stem}.{e}.gate_proj.weight", f"{stem}.{e}.up_proj.weight"]
    return [f"{stem}.{e}.down_proj.weight"]


def plan_jobs(targets: list[Target]) -> list[_Job]:
    """One job per tensor (per expert of fused experts) with the tensors it produces, in
    the order :func:`iter_compressed` yields them."""
    jobs: list[_Job] = []
    for t in targets:
        src = t.source
        if t.kind == "copy":
            dtype = src.torch_dtype
            jobs.append(_Job(t, None, src.nbytes, [OutTensor(src.name, dtype, src.shape)]))
        elif t.kind == "quantize":
            rows, cols = src.shape
            dtype = src.torch_dtype
            jobs.append(_Job(t, None, src.nbytes, [OutTensor(src.name, FP8, (rows, cols)),
                                                   OutTensor(src.name + "_scale", dtype, (rows, 1))]))
        else:
            n_exp, k, n = src.shape  # [E, in, out]
            dtype = src.torch_dtype
            per = src.nbytes // n_exp if n_exp else 0
            for e in range(n_exp):
                names = _expert_names(t, e)
                rows = n // len(names)
                outs = []
                for name in names:
                    outs += [OutTensor(name, FP8, (rows, k)), OutTensor(name + "_scale", dtype, (rows, 1))]
                jobs.append(_Job(t, e, per, outs))
    return jobs


def _progress(total: int, enabled: bool | None, desc: str):
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, disable=not enabled,
                smoothing=0.1)


def _quantize(w: torch.Tensor, name: str, rounding: str, allow_non_finite: bool):
    try:
        return quantize_channelwise(w, check_finite=not allow_non_finite, rounding=rounding)
    except NonFiniteError as e:
        raise NonFiniteWeightError(f"{name}: {e} (allow_non_finite=True quantizes it anyway)") from None


def _finish(job: _Job, raw: torch.Tensor, rounding: str, allow_non_finite: bool) -> list[torch.Tensor]:
    """The output tensors of a job whose bytes ``raw`` are complete."""
    src = job.target.source
    dtype = src.torch_dtype
    if job.target.kind == "copy":
        return [raw.view(dtype).view(src.shape) if src.nbytes else torch.empty(src.shape, dtype=dtype,
                                                                               device=raw.device)]
    if job.expert is None:
        q, s = _quantize(raw.view(dtype).view(src.shape), src.name, rounding, allow_non_finite)
        return [q, s]
    _, k, n = src.shape
    w = raw.view(dtype).view(k, n)  # one expert, [in, out] as stored
    parts = [w[:, : n // 2], w[:, n // 2 :]] if src.name.endswith("gate_up_proj") else [w]
    out: list[torch.Tensor] = []
    for p in parts:  # [in, out] -> [out, in]
        out += _quantize(p.t().contiguous(), f"{src.name}[{job.expert}]", rounding, allow_non_finite)
    return out


def iter_compressed(
    ckpt: Checkpoint,
    targets: list[Target],
    *,
    device: str | torch.device = "cpu",
    rounding: str = "auto",
    memory_budget: int | str = "1GiB",
    chunk_bytes: int | str = "64MiB",
    threads: int | None = None,
    method: str = "mmap",
    allow_non_finite: bool = False,
    progress: bool | None = None,
    desc: str = "fastfp8",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields ``(name, tensor)`` of the compressed-tensors FP8_DYNAMIC checkpoint of
    ``ckpt``, on ``device``, in the order of :func:`plan_jobs`.

    One tensor (or one expert) is held at a time besides the reader's buffer; each yielded
    tensor is fresh (the caller may keep it). On CUDA the bytes go host-to-device from
    pinned memory and are quantized on the GPU.
    """
    from .loader import resolve_rounding

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    rounding = resolve_rounding(rounding, dev)
    jobs = plan_jobs(targets)
    items: list[tuple[str, list[tuple[int, int, int]]]] = []
    for j in jobs:
        src = j.target.source
        begin = src.begin + (j.expert * j.nbytes if j.expert is not None else 0)
        items.append((src.name if j.expert is None else f"{src.name}[{j.expert}]", [(src.shard, begin, j.nbytes)]))
    budget = parse_bytes(memory_budget)
    chunk = max(1, min(parse_bytes(chunk_bytes), budget // 4))
    bar = _progress(sum(j.nbytes for j in jobs), progress, desc)
    reader = ChunkReader(ckpt, items, memory_budget=budget, chunk_bytes=chunk, threads=threads, method=method,
                         pin=dev.type == "cuda")
    try:
        raw = torch.empty(0, dtype=torch.uint8, device=dev)
        while (d := reader.next()) is not None:
            item, ioff, boff, n = d
            job = jobs[item]
            if ioff == 0:
                raw = torch.empty(job.nbytes, dtype=torch.uint8, device=dev)
            if n:
                raw[ioff : ioff + n].copy_(reader.view(boff, n))  # synchronous: the slot is free after it
                reader.release(boff, n)
                bar.update(n)
            if ioff + n == job.nbytes:
                tensors = _finish(job, raw, rounding, allow_non_finite)
                raw = torch.empty(0, dtype=torch.uint8, device=dev)
                for o, t in zip(job.outputs, tensors, strict=True):
                    yield o.name, t
                del tensors
    finally:
        reader.close()
        bar.close()


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


def _source_files(src: Path) -> list[Path]:
    """The source directory's files to copy (relative paths), hidden ones and weights excluded."""
    if not src.is_dir():
        return []
    out = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith(".") or f in _SKIP_NAMES or (f == "config.json" and Path(root) == src):
                continue
            if f.endswith(_SKIP_SUFFIXES):
                continue
            out.append((Path(root) / f).relative_to(src))
    return out


def _read_config(src: Path) -> dict:
    path = (src if src.is_dir() else src.parent) / "config.json"
    if src.is_dir() and path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable JSON config: {e}") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{path}: not a JSON object")
        return cfg
    return {}


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    ignore: Iterable[str] | None = None,
    default_ignore: bool = True,
    device: str | torch.device = "cpu",
    max_shard_size: int | str = "5GB",
    memory_budget: int | str = "1GiB",
    threads: int | None = None,
    rounding: str = "auto",
    overwrite: bool = False,
    allow_non_finite: bool = False,
    progress: bool | None = None,
) -> ConvertResult:
    """Writes the FP8_DYNAMIC compressed-tensors checkpoint of the bf16/fp16/fp32
    checkpoint ``src`` (a model directory or one ``.safetensors`` file) to directory ``dst``.

    Args:
        ignore: modules to keep unquantized (exact names or ``"re:<pattern>"``), added to
            :data:`fastfp8.DEFAULT_IGNORE` unless ``default_ignore=False``.
        device: where to quantize (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        max_shard_size: the largest output shard (a larger tensor gets its own shard).
        memory_budget: the reader's host buffer (pinned on CUDA).
        rounding: ``"auto"``: the bytes compressed-tensors produces on ``device`` (see
            :func:`fastfp8.load_quantized`); ``"eager"`` or ``"fp32"`` to choose.
        overwrite: replace an existing ``dst`` (only once the new one is complete).
        progress: a progress bar on stderr (default: when stderr is a terminal).

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is false.
        ValueError: ``src`` is already quantized, or ``dst`` is ``src`` or inside it.
        fastfp8.Error: an invalid checkpoint, a read error, a NaN/Inf weight.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    ckpt = open_checkpoint(src)
    src_dir = src if src.is_dir() else src.parent
    rs, rd = src.resolve(), dst.resolve()
    if rd == rs or rd in rs.parents or (src.is_dir() and rs in rd.parents):
        raise ValueError(f"destination {dst} must not be the source, contain it, or be inside the source directory")
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise FileExistsError(errno.EEXIST, f"{dst} exists (use --force / overwrite=True to replace it)")
    config = _read_config(src)
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{src} is already quantized ({method}); convert needs a bf16/fp16/fp32 checkpoint")
    targets = plan_targets(ckpt, ignore, default_ignore=default_ignore)
    jobs = plan_jobs(targets)
    outputs = [o for j in jobs for o in j.outputs]
    shards = plan_shards(outputs, parse_bytes(max_shard_size))
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    files = _source_files(src)
    result = ConvertResult(path=dst, shards=names, tensors=len(outputs),
                           quantized=sum(o.name.endswith("_scale") for o in outputs), bytes_in=ckpt.nbytes,
                           bytes_out=sum(o.nbytes for o in outputs), ignored=ignored_modules(targets),
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
        stream = iter_compressed(ckpt, targets, device=device, rounding=rounding, memory_budget=memory_budget,
                                 threads=threads, allow_non_finite=allow_non_finite, progress=progress,
                                 desc="convert")
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
