"""vLLM integration: serve a bf16 checkpoint as FP8 with ``--load-format fastfp8``.

The package registers :func:`register` under the ``vllm.general_plugins`` entry point, so
every vLLM process that has fastfp8 installed knows the load format ``fastfp8``::

    vllm serve /models/Llama-3.1-8B-Instruct --load-format fastfp8 \\
        --model-loader-extra-config '{"ignore": ["re:.*self_attn"]}'

What :class:`Fastfp8ModelLoader` does, per worker:

1. Before the model is built, it injects llm-compressor's FP8_DYNAMIC compressed-tensors
   ``quantization_config`` (weights FP8 e4m3 per output channel, activations FP8 per token,
   dynamic) into ``model_config.hf_config``, sets ``model_config.quantization`` to
   ``"compressed-tensors"`` and rebuilds ``vllm_config.quant_config`` with vLLM's own code
   path. vLLM then builds the model with its compressed-tensors W8A8 FP8 scheme: every
   quantized linear allocates an FP8 ``weight`` and a ``weight_scale``, never bf16.
   The ``ignore`` list names the concrete modules kept unquantized (lm_head, embeddings,
   MoE routers, and whatever the ``ignore`` option adds), as llm-compressor writes it.
2. It runs fastfp8's one load engine (native reader threads into a pinned ring of
   ``memory_budget`` bytes, copies and quantization overlapped on the GPU) and feeds
   ``model.load_weights`` the tensors a compressed-tensors FP8_DYNAMIC checkpoint would
   hold (``<m>.weight`` F8_E4M3 ``[out, in]``, ``<m>.weight_scale`` ``[out, 1]``; fused
   experts as per-expert ``experts.<e>.gate_proj|up_proj|down_proj``), then vLLM runs its
   own ``process_weights_after_loading``.
3. Under tensor parallelism each rank reads only its slice of every split tensor
   (column-parallel rows, row-parallel columns with the row maxima all-reduced over vLLM's
   tensor-parallel group, k/v heads replicated past their count, per-expert slices), as
   vLLM shards them; the slice is handed to vLLM's weight loaders inside a zero tensor of
   the whole shape, at the place they narrow to, so vLLM's own sharding code fills the
   parameters. Embeddings and lm_head (vLLM pads the vocabulary before splitting it),
   expert-parallel MoE and pipeline-parallel ranks are read whole.

Options (``--model-loader-extra-config`` JSON): ``ignore`` (list of module names or
``"re:<pattern>"``, added to fastfp8's defaults), ``default_ignore`` (bool, default true),
``layout``, ``memory_budget`` (e.g. ``"256MiB"``), ``chunk_bytes``, ``threads``,
``method``, ``rounding`` (``"auto"``, ``"eager"``, ``"fp32"``): the fields of
:class:`fastfp8.options.LoadOptions`.

A checkpoint that already carries a ``quantization_config`` is refused, except an
FP8-channel compressed-tensors one (for example the same config passed through
``--hf-overrides``), which is used as is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .checkpoint import open_checkpoint
from .engine import resolve_device
from .options import LoadOptions
from .plan import make_plan

logger = logging.getLogger(__name__)

LOAD_FORMAT = "fastfp8"
#: the vLLM releases the plugin is tested with (``[first, last]``, major.minor): it relies on
#: two of their private names (``_LOAD_FORMAT_TO_MODEL_LOADER``,
#: ``VllmConfig._get_quantization_config``)
SUPPORTED_VLLM = ((0, 33), (0, 33))
_registered = False


def check_vllm_version(version: str) -> None:
    """Raises RuntimeError, saying what to do, for a vLLM outside :data:`SUPPORTED_VLLM`."""
    import re

    parts = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    lo, hi = SUPPORTED_VLLM
    if not lo <= parts <= hi:
        want = ".".join(map(str, lo)) + ("" if lo == hi else " - " + ".".join(map(str, hi)))
        raise RuntimeError(f"fastfp8's load format {LOAD_FORMAT!r} supports vLLM {want}.x (it relies on private "
                           f"names that change between releases); this is vLLM {version}: install vllm=={want}.* "
                           f"or a fastfp8 release made for it")


def parse_options(extra: dict[str, Any] | None) -> LoadOptions:
    """The ``--model-loader-extra-config`` options (a dict, or None) as
    :class:`fastfp8.options.LoadOptions`; raises ValueError naming the bad key."""
    return LoadOptions.from_mapping(extra, where=f"--model-loader-extra-config of load format {LOAD_FORMAT!r}")


# ---------------------------------------------------------------------------------------
# vLLM-independent pieces (tested without vLLM)


def plan(path: str | os.PathLike[str], options: LoadOptions, extra_ignore: Iterable[str] = ()):
    """``(checkpoint, plan, quantization_config)`` of a bf16 checkpoint, from headers.
    ``extra_ignore``: the ``ignore`` entries of a quantization config given by hand."""
    from .ctconfig import quantization_config

    ckpt = open_checkpoint(path)
    if extra_ignore:
        options = options.replace(ignore=(*options.ignore, *extra_ignore))
    p = make_plan(ckpt, options)
    return ckpt, p, quantization_config(p.ignored)


def iter_weights(path: str | os.PathLike[str], options: LoadOptions | None = None, *,
                 device: str | torch.device | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` stream fed to ``model.load_weights``: the tensors of the
    compressed-tensors FP8_DYNAMIC checkpoint of ``path``, quantized on ``device``
    (default: the current CUDA device, else the CPU) by the one engine."""
    from .convert import iter_compressed

    options = options or LoadOptions.make()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    ckpt, p, _ = plan(path, options)
    yield from iter_compressed(ckpt, p, options, resolve_device(device), desc="fastfp8 load")


def vllm_tensor_parallel(parallel_config: Any = None):
    """This worker's :class:`fastfp8.tensor_parallel.TensorParallel` in vLLM's
    tensor-parallel group (its device group: NCCL on GPUs, gloo on CPUs), or None when
    every tensor must be read whole: one rank, expert parallelism (vLLM then places whole
    experts on ranks), or pipeline parallelism."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size, get_tp_group

    from .tensor_parallel import TensorParallel

    size = get_tensor_model_parallel_world_size()
    if size <= 1:
        return None
    if parallel_config is not None and (getattr(parallel_config, "enable_expert_parallel", False)
                                        or getattr(parallel_config, "pipeline_parallel_size", 1) > 1):
        return None
    return TensorParallel(get_tensor_model_parallel_rank(), size, get_tp_group().device_group)


def is_fp8_channel_config(cfg: Any) -> bool:
    """Whether ``cfg`` (a ``quantization_config`` dict) is compressed-tensors with FP8
    per-channel weights in every group: one fastfp8's weight stream satisfies."""
    if not isinstance(cfg, dict) or cfg.get("quant_method") != "compressed-tensors":
        return False
    groups = cfg.get("config_groups") or {}
    if not groups:
        return False
    for g in groups.values():
        w = (g or {}).get("weights") or {}
        if not (w.get("type") == "float" and w.get("num_bits") == 8 and w.get("strategy") == "channel"
                and w.get("symmetric", True) and not w.get("dynamic", False)):
            return False
    return True


# ---------------------------------------------------------------------------------------
# vLLM glue


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers load format ``fastfp8``.

    vLLM calls it in every process, possibly several times; only the first call in a
    process registers. Without vLLM it does nothing.
    """
    global _registered
    try:
        from vllm.model_executor import model_loader
    except ImportError as e:  # no vLLM (or a broken one): nothing to plug into
        logger.debug("fastfp8: vLLM not importable (%s); load format %r not registered", e, LOAD_FORMAT)
        return
    table = getattr(model_loader, "_LOAD_FORMAT_TO_MODEL_LOADER", None)
    cls = _loader_class()
    if _registered or (table is not None and table.get(LOAD_FORMAT) is cls):
        _registered = True
        return
    model_loader.register_model_loader(LOAD_FORMAT)(cls)
    _registered = True


def _model_path(model_config, load_config) -> str:
    """A local directory holding the checkpoint (downloaded from the hub if needed)."""
    path = model_config.model
    if os.path.isdir(path) or os.path.isfile(path):
        return path
    from vllm.model_executor.model_loader.weight_utils import download_weights_from_hf

    return download_weights_from_hf(path, load_config.download_dir, ["*.safetensors", "*.json"],
                                    model_config.revision, ignore_patterns=load_config.ignore_patterns)


def existing_quantization_config(model_config) -> dict | None:
    """The ``quantization_config`` the model's config already has (checkpoint or
    ``--hf-overrides``), as a dict, or None."""
    existing = getattr(model_config.hf_config, "quantization_config", None)
    if existing is not None and not isinstance(existing, dict) and hasattr(existing, "to_dict"):
        existing = existing.to_dict()
    return existing


def inject_quantization_config(vllm_config, model_config, quant_config: dict) -> None:
    """Makes vLLM build the model as a compressed-tensors FP8 checkpoint: sets
    ``hf_config.quantization_config`` and ``model_config.quantization``, then recomputes
    ``vllm_config.quant_config`` the way vLLM does at start-up (capability and dtype
    checks included). An existing FP8-channel compressed-tensors config is kept; any other
    quantization is an error."""
    hf_config = model_config.hf_config
    existing = existing_quantization_config(model_config)
    if existing is not None:
        if not is_fp8_channel_config(existing):
            method = existing.get("quant_method", "?") if isinstance(existing, dict) else type(existing).__name__
            raise ValueError(f"load format {LOAD_FORMAT!r} quantizes a bf16/fp16/fp32 checkpoint to FP8, but "
                             f"{model_config.model} is already quantized ({method})")
    elif model_config.quantization not in (None, "compressed-tensors"):
        raise ValueError(f"load format {LOAD_FORMAT!r} produces compressed-tensors FP8 weights; drop "
                         f"--quantization {model_config.quantization}")
    else:
        hf_config.quantization_config = quant_config
    model_config.quantization = "compressed-tensors"
    from vllm.config import VllmConfig

    getter = getattr(VllmConfig, "_get_quantization_config", None)
    if getter is not None:
        qc = getter(model_config, vllm_config.load_config)
    else:  # older/newer vLLM: the plain lookup
        from vllm.model_executor.model_loader.weight_utils import get_quant_config

        qc = get_quant_config(model_config, vllm_config.load_config)
    vllm_config.quant_config = qc


_CLASS: type | None = None


def _loader_class() -> type:
    """The :class:`Fastfp8ModelLoader` class (defined on first use: it subclasses vLLM's
    ``BaseModelLoader``, so importing this module must not need vLLM)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class Fastfp8ModelLoader(BaseModelLoader):
        """``--load-format fastfp8``: bf16 safetensors -> FP8 compressed-tensors weights,
        streamed and quantized on the GPU. See :mod:`fastfp8.vllm_plugin`."""

        def __init__(self, load_config) -> None:
            import vllm

            check_vllm_version(vllm.__version__)
            super().__init__(load_config)
            self.options = parse_options(load_config.model_loader_extra_config)
            self._plans: dict[tuple, tuple[Any, list, dict]] = {}

        def _plan(self, model_config):
            """(checkpoint, targets, quantization_config) for ``model_config``; a
            quantization config given by hand adds its ``ignore`` entries to ours, so that
            the stream matches what vLLM allocates."""
            path = _model_path(model_config, self.load_config)
            existing = existing_quantization_config(model_config)
            extra = list(existing.get("ignore") or []) if is_fp8_channel_config(existing) else []
            key = (path, tuple(extra))
            if key not in self._plans:
                self._plans[key] = plan(path, self.options, extra)
            return path, self._plans[key]

        def download_model(self, model_config) -> None:
            _model_path(model_config, self.load_config)

        def load_model(self, vllm_config, model_config, prefix: str = ""):
            _, (_, _, quant_config) = self._plan(model_config)
            inject_quantization_config(vllm_config, model_config, quant_config)
            self._parallel = vllm_config.parallel_config
            return super().load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)

        def get_all_weights(self, model_config, model=None) -> Iterator[tuple[str, torch.Tensor]]:
            from .engine import LoadStats, StreamSink, run
            from .plan import checkpoint_tensors, place_in_full

            _, (ckpt, p, _) = self._plan(model_config)
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
            options = self.options
            if options.progress is None and getattr(self.load_config, "use_tqdm_on_load", False):
                options = options.replace(progress=True)
            tp = vllm_tensor_parallel(getattr(self, "_parallel", None))
            if tp is not None:
                p = make_plan(ckpt, options, tp, p.layout, split_vocab=False)
            self.stats = LoadStats()
            for job, outs in run(ckpt, p, options, resolve_device(device), StreamSink(resolve_device(device)),
                                 self.stats, desc="fastfp8 load"):
                yield from checkpoint_tensors(job, place_in_full(job, outs))

        def load_weights(self, model, model_config) -> None:
            import time

            t0 = time.perf_counter()
            weights = self.get_all_weights(model_config, model)
            try:
                loaded = model.load_weights(weights)
            finally:
                weights.close()
            if loaded is not None:
                missing = {n for n, _ in model.named_parameters()} - set(loaded)
                if missing:
                    logger.debug("fastfp8: parameters not in the checkpoint (left as built): %s", sorted(missing))
            logger.info("fastfp8: loaded and quantized %s in %.2f s", model_config.model, time.perf_counter() - t0)

    Fastfp8ModelLoader.__module__ = __name__
    Fastfp8ModelLoader.__qualname__ = "Fastfp8ModelLoader"
    _CLASS = Fastfp8ModelLoader
    return _CLASS


def __getattr__(name: str):
    if name == "Fastfp8ModelLoader":
        return _loader_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
