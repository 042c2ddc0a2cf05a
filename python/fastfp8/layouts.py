"""Model layouts, in one table: which tensors are quantized, how each splits under tensor
parallelism, and the orientation of fused experts, read from ``config.json``.

A layout is known, not guessed. ``config.json``'s ``model_type`` (or its ``text_config``'s)
picks a row of :data:`LAYOUTS`; each row lists, as module-name patterns, the ``nn.Linear``
layers of that architecture (what llm-compressor and vLLM quantize), its MoE routers (kept
in bf16: vLLM builds them unquantized), and the other 2-D tensors it may hold (embeddings,
vision towers). A 2-D float weight that matches none of them is an error, and so is an
architecture with no row: :class:`fastfp8.LayoutError` says what to pass instead
(``layout="names"``: quantize every 2-D float ``*.weight`` that is not ignored, by name).
A checkpoint without ``config.json`` (a bare ``.safetensors`` file) has no architecture to
read, and is planned by name (the rule of ``layout="names"``), with a log message.

Fused experts are 3-D ``experts.gate_up_proj`` / ``experts.down_proj``: Llama4 stores them
``[E, in, out]``; transformers 5 may save Qwen3-MoE and Mixtral experts fused
``[E, out, in]``. The row says which, and the shapes are checked against the config.

Ignore rules follow compressed-tensors / vLLM: an entry is an exact module name, or
``re:<pattern>`` tested with :func:`re.match` against the module name.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, TensorInfo
from .errors import CheckpointError, LayoutError

logger = logging.getLogger(__name__)

QUANTIZABLE_DTYPES = ("BF16", "F16", "F32")

DEFAULT_IGNORE: tuple[str, ...] = (
    "re:(.*\\.)?lm_head$",
    "re:.*(embed_tokens|embeddings|wte|wpe|word_embeddings|embed_in|embed_out)$",
    "re:.*\\.(gate|router)$",  # MoE routers: mlp.gate (Qwen3-MoE), block_sparse_moe.gate (Mixtral), router (Llama4)
    "re:.*(vision_model|vision_tower|visual)(\\.|$)",
    "re:.*multi_modal_projector(\\.|$)",
)


class IgnoreRules:
    """A compiled ignore list (compressed-tensors semantics)."""

    def __init__(self, ignore: Iterable[str] | None = None, *, default_ignore: bool = True) -> None:
        entries = [*(DEFAULT_IGNORE if default_ignore else ()), *(ignore or ())]
        self.exact: set[str] = set()
        self.patterns: list[re.Pattern[str]] = []
        for e in entries:
            if not isinstance(e, str) or not e:
                raise ValueError(f"ignore entries must be non-empty strings, got {e!r}")
            if e.startswith("re:"):
                try:
                    self.patterns.append(re.compile(e[3:]))
                except re.error as err:
                    raise ValueError(f"bad ignore pattern {e!r}: {err}") from None
            else:
                self.exact.add(e)
        self.entries = entries

    def __call__(self, module: str) -> bool:
        return module in self.exact or any(p.match(module) for p in self.patterns)


# ---------------------------------------------------------------------------------------
# the table

_L = r"(?:^|\.)layers\.\d+\."
_ATTN = _L + r"self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
_MLP = _L + r"mlp\.(?:gate_proj|up_proj|down_proj)"
_LM_HEAD = r"(?:^|\.)lm_head"
_EMBED = r"(?:^|\.)embed_tokens"
_VISION = r"(?:^|\.)(?:vision_model|multi_modal_projector)\."


@dataclass(frozen=True)
class Arch:
    """One row of the table."""

    linears: tuple[str, ...]  # nn.Linear modules (quantized unless ignored)
    routers: tuple[str, ...] = ()  # MoE routers: linears vLLM keeps unquantized
    others: tuple[str, ...] = (_EMBED,)  # other 2-D weights, kept as they are
    #: fused 3-D experts: "in_out" ([E, in, out], Llama4) or "out_in" ([E, out, in])
    fused: str | None = None
    #: per-expert linear names (gate, up, down) of this architecture's checkpoints
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    #: config key of the experts' intermediate size
    expert_inter_key: str = "intermediate_size"


_DENSE = Arch(linears=(_ATTN, _MLP, _LM_HEAD))
_EXPERT = r"experts\.\d+\.(?:gate_proj|up_proj|down_proj|w1|w2|w3)"

LAYOUTS: dict[str, Arch] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "qwen3_moe": Arch(
        linears=(_ATTN, _MLP, _L + r"mlp\." + _EXPERT, _LM_HEAD),
        routers=(_L + r"mlp\.gate",),
        fused="out_in",
        expert_inter_key="moe_intermediate_size",
    ),
    "mixtral": Arch(
        linears=(_ATTN, _L + r"(?:block_sparse_moe|mlp)\." + _EXPERT, _LM_HEAD),
        routers=(_L + r"(?:block_sparse_moe|mlp)\.gate",),
        fused="out_in",
        expert_names=("w1", "w3", "w2"),
    ),
    "llama4_text": Arch(
        linears=(_ATTN, _L + r"feed_forward\.(?:shared_expert\.)?(?:gate_proj|up_proj|down_proj)", _LM_HEAD),
        routers=(_L + r"feed_forward\.router",),
        others=(_EMBED, _VISION),
        fused="in_out",
    ),
}
LAYOUTS["llama4"] = LAYOUTS["llama4_text"]  # the multi-modal checkpoint: its text model, vision kept as is

#: tensor-parallel rules by leaf module name (Megatron / vLLM): column-parallel splits the
#: output dim (rows of ``[out, in]``), row-parallel the input dim, vocab the rows
COLUMN = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3"})
ROW = frozenset({"o_proj", "down_proj", "w2"})
VOCAB = frozenset({"embed_tokens", "lm_head"})
FUSED_2D = frozenset({"gate_up_proj", "qkv_proj"})
FUSED_SUFFIXES = ("experts.gate_up_proj", "experts.down_proj")


@dataclass(frozen=True)
class Split:
    """How one tensor splits across tensor-parallel ranks.

    ``kind``: ``"column"`` (rows), ``"row"`` (columns, the row amax all-reduced),
    ``"vocab"`` (rows), ``"heads"`` (rows in whole heads of ``head_dim``, replicated
    when the ranks outnumber the ``heads``), ``"halves"`` (a fused 2-D gate_up: each half
    split as a column), ``"experts_column"`` / ``"experts_row"`` (fused experts: the out /
    in dim of each expert)."""

    kind: str
    heads: int = 0
    head_dim: int = 0


@dataclass(frozen=True)
class Target:
    """What to produce from one checkpoint tensor."""

    source: TensorInfo
    kind: str  # "quantize", "experts" (fused 3-D, quantized per expert) or "copy"
    weight_name: str  # the output name of the tensor (fp8 weight, or the copy)
    scale_name: str | None = None
    split: Split | None = None  # None: replicated
    #: experts: "in_out" ([E, in, out], transposed on the device) or "out_in"
    orientation: str | None = None
    #: experts: the per-expert linear names (gate, up, down) a compressed-tensors checkpoint uses
    expert_names: tuple[str, str, str] | None = None

    @property
    def quantized(self) -> bool:
        return self.kind != "copy"

    @property
    def module(self) -> str:
        return module_of(self.source.name)


def module_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


# ---------------------------------------------------------------------------------------
# reading config.json


@dataclass
class ModelConfig:
    """What the planner needs from ``config.json`` (the text model's part)."""

    raw: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def text(self) -> dict[str, Any]:
        tc = self.raw.get("text_config")
        return tc if isinstance(tc, dict) else self.raw

    @property
    def model_type(self) -> str | None:
        return self.raw.get("model_type")

    def get(self, key: str, default: Any = None) -> Any:
        return self.text.get(key, self.raw.get(key, default))

    @property
    def tie_word_embeddings(self) -> bool:
        v = self.text.get("tie_word_embeddings", self.raw.get("tie_word_embeddings"))
        # transformers' PretrainedConfig default is True, but Llama-family configs write it out
        return bool(v) if v is not None else False


def config_path(path: str | Path) -> Path:
    """``config.json`` of a model directory, or beside a ``.safetensors`` file."""
    p = Path(path)
    return (p if p.is_dir() else p.parent) / "config.json"


def read_config(path: str | Path) -> ModelConfig | None:
    """The checkpoint's ``config.json`` (None when there is none); a broken one is a
    :class:`fastfp8.CheckpointError`."""
    cp = config_path(path)
    if not cp.is_file():
        return None
    try:
        raw = json.loads(cp.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cp}: not a readable JSON config: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cp}: not a JSON object")
    return ModelConfig(raw, cp)


# ---------------------------------------------------------------------------------------
# classifying tensors


@dataclass
class Layout:
    """The layout of one checkpoint: its architecture row (None: by name), its config,
    and the ignore rules."""

    arch: Arch | None
    config: ModelConfig | None
    rules: IgnoreRules
    name: str

    def targets(self, ckpt: Checkpoint) -> list[Target]:
        """One :class:`Target` per tensor of ``ckpt``, in file order."""
        return [self.classify(t) for t in ckpt.file_order()]

    def classify(self, t: TensorInfo) -> Target:
        empty = any(d == 0 for d in t.shape)
        if t.dtype not in QUANTIZABLE_DTYPES or empty:
            return Target(t, "copy", t.name, split=self._split(t))
        if len(t.shape) == 3 and t.name.endswith(FUSED_SUFFIXES):
            return self._fused(t)
        if not (t.name.endswith(".weight") and len(t.shape) == 2):
            return Target(t, "copy", t.name, split=self._split(t))
        module = module_of(t.name)
        if self.arch is None:
            if self.rules(module):
                return Target(t, "copy", t.name, split=self._split(t))
            return Target(t, "quantize", t.name, t.name + "_scale", split=self._split(t))
        a = self.arch
        if _matches(a.routers, module) or _matches(a.others, module):
            return Target(t, "copy", t.name, split=self._split(t))
        if not _matches(a.linears, module):
            raise LayoutError(
                f"{t.file}: {t.name} {list(t.shape)} is not a tensor fastfp8 knows in a "
                f"{self.name!r} checkpoint; pass layout='names' to quantize every 2-D float *.weight by name "
                f"(and ignore=[...] for what must stay as is)")
        if self.rules(module):
            return Target(t, "copy", t.name, split=self._split(t))
        return Target(t, "quantize", t.name, t.name + "_scale", split=self._split(t))

    def _fused(self, t: TensorInfo) -> Target:
        a = self.arch
        orientation = a.fused if a is not None else None
        if orientation is None:
            raise LayoutError(
                f"{t.file}: {t.name} {list(t.shape)} holds fused experts, whose orientation "
                f"([E, in, out] or [E, out, in]) is not known without a config.json of a supported "
                f"architecture ({', '.join(sorted(LAYOUTS))}); ignore=['{t.name.rsplit('.', 1)[0]}'] keeps it as is")
        self._check_expert_shape(t, orientation)
        split = self._split(t)
        module = t.name.rsplit(".", 1)[0]  # "<p>.experts"
        if self.rules(module) or self.rules(t.name):
            return Target(t, "copy", t.name, split=split)
        base = module + (".w13_weight" if t.name.endswith("gate_up_proj") else ".w2_weight")
        return Target(t, "experts", base, base + "_scale", split=split, orientation=orientation,
                      expert_names=a.expert_names)

    def _check_expert_shape(self, t: TensorInfo, orientation: str) -> None:
        cfg = self.config
        hidden = cfg.get("hidden_size") if cfg else None
        inter = cfg.get(self.arch.expert_inter_key) if cfg else None
        if not isinstance(hidden, int) or not isinstance(inter, int):
            return
        gate_up = t.name.endswith("gate_up_proj")
        out, inn = (2 * inter, hidden) if gate_up else (hidden, inter)
        want = (t.shape[0], inn, out) if orientation == "in_out" else (t.shape[0], out, inn)
        if tuple(t.shape) != want:
            raise LayoutError(
                f"{t.file}: {t.name} has shape {list(t.shape)}, but a {self.name!r} checkpoint with "
                f"hidden_size={hidden}, {self.arch.expert_inter_key}={inter} stores it {list(want)} "
                f"([E, {'in, out' if orientation == 'in_out' else 'out, in'}])")

    def _split(self, t: TensorInfo) -> Split | None:
        parts = t.name.split(".")
        nd = len(t.shape)
        if nd == 3 and t.name.endswith(FUSED_SUFFIXES):
            return Split("experts_column" if parts[-1] == "gate_up_proj" else "experts_row")
        if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
            return None
        leaf, is_weight = parts[-2], parts[-1] == "weight"
        if leaf in VOCAB and is_weight and nd == 2:
            return Split("vocab")
        if leaf in ("k_proj", "v_proj"):
            heads, head_dim = self._kv_heads()
            return Split("heads", heads, head_dim) if heads else Split("column")
        if leaf in COLUMN:
            return Split("column")
        if leaf == "gate_up_proj":
            return Split("halves")
        if leaf == "qkv_proj":
            return Split("qkv")
        if leaf in ROW and is_weight and nd == 2:
            return Split("row")
        return None

    def _kv_heads(self) -> tuple[int, int]:
        cfg = self.config
        if cfg is None:
            return 0, 0
        heads = cfg.get("num_attention_heads")
        kv = cfg.get("num_key_value_heads", heads)
        hidden = cfg.get("hidden_size")
        head_dim = cfg.get("head_dim") or (hidden // heads if isinstance(hidden, int) and heads else None)
        if isinstance(kv, int) and isinstance(head_dim, int) and kv > 0:
            return kv, head_dim
        return 0, 0

    def tied_lm_head(self, ckpt: Checkpoint) -> str | None:
        """The output-embedding module a tied checkpoint leaves out (``lm_head``, with the
        text model's prefix), which a compressed-tensors config must list as ignored."""
        if self.config is None or not self.config.tie_word_embeddings:
            return None
        names = set(ckpt.tensors)
        if any(n.endswith("lm_head.weight") for n in names):
            return None
        for n in names:
            if n.endswith("embed_tokens.weight"):
                prefix = n[: -len("embed_tokens.weight")]
                # "model." -> "lm_head"; "language_model.model." -> "language_model.lm_head"
                outer = prefix[: -len("model.")] if prefix.endswith("model.") else prefix
                return outer + "lm_head"
        return "lm_head"


def _matches(patterns: tuple[str, ...], module: str) -> bool:
    return any(re.search(p + "$", module) for p in patterns)


def layout_for(path: str | Path, *, layout: str = "auto", ignore: Iterable[str] = (),
               default_ignore: bool = True) -> Layout:
    """The layout of the checkpoint at ``path`` (see the module docstring)."""
    rules = IgnoreRules(ignore, default_ignore=default_ignore)
    config = read_config(path)
    if layout == "names":
        return Layout(None, config, rules, "by name")
    if config is None:
        logger.info("%s: no config.json beside it; quantizing every 2-D float *.weight by name", path)
        return Layout(None, None, rules, "by name")
    kinds = [config.model_type, config.text.get("model_type")]
    for kind in kinds:
        if kind in LAYOUTS:
            return Layout(LAYOUTS[kind], config, rules, kind)
    raise LayoutError(
        f"{config.path}: model_type {config.model_type!r} is not an architecture fastfp8 knows "
        f"({', '.join(sorted(LAYOUTS))}); pass layout='names' (CLI: --layout names) to quantize every 2-D "
        f"float *.weight by name, after checking that they are nn.Linear weights stored [out, in] "
        f"(ignore=[...] keeps the others as they are)")


# ---------------------------------------------------------------------------------------
# a second opinion: the model transformers builds


def check_with_transformers(layout: Layout, targets: list[Target]) -> bool:
    """Builds the checkpoint's model with transformers on the meta device (nothing is
    allocated) and checks that every 2-D weight about to be quantized belongs to an
    ``nn.Linear`` there, as llm-compressor and vLLM decide: a GPT-2 ``Conv1D`` (stored
    ``[in, out]``), an embedding or a norm quantized by name is a :class:`LayoutError`.
    Returns False when it could not check (no transformers, no config, a model transformers
    cannot build); weights whose module the model does not name (per-expert weights that
    transformers fuses) are not judged."""
    if layout.config is None or layout.config.path is None:
        return False
    try:
        import torch
        from torch import nn
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        return False
    try:
        cfg = AutoConfig.from_pretrained(layout.config.path.parent)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # an architecture transformers does not have, remote code, ...
        logger.info("transformers could not build %s on the meta device (%s): layout not cross-checked",
                    layout.config.path, e)
        return False
    modules = dict(model.named_modules())
    for t in targets:
        if t.kind != "quantize":
            continue
        module = t.module
        for cand in (module, module.replace(".block_sparse_moe.", ".mlp."),
                     module.removeprefix("model."), "model." + module):
            m = modules.get(cand)
            if m is None:
                continue
            if not isinstance(m, nn.Linear):
                raise LayoutError(
                    f"{t.source.file}: {t.source.name} belongs to {cand}, a {type(m).__name__} in transformers' "
                    f"{type(model).__name__}, not an nn.Linear: it cannot be quantized as one; "
                    f"ignore=['{module}'] keeps it as it is")
            break
    return True
