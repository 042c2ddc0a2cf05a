"""Which tensors get quantized, and how (a plan, computed from the headers alone).

A tensor is quantized when it is the 2-D ``<module>.weight`` of a linear layer (or of a
per-expert MoE linear), in bf16, fp16 or fp32, and its module is not ignored. Llama4's fused
3-D experts (``...experts.gate_up_proj [E, hidden, 2*inter]`` and
``...experts.down_proj [E, inter, hidden]``) are quantized too, transposed to
``[E, out, in]``; see :data:`FUSED_EXPERTS`.

Ignore rules follow compressed-tensors / vLLM: an entry is an exact module name, or
``re:<pattern>`` tested with :func:`re.match` against the module name (so
``re:.*self_attn`` matches any attention module). :data:`DEFAULT_IGNORE` (lm_head,
embeddings, MoE routers and gates, vision towers, multi-modal projectors) applies unless
``default_ignore=False``; a user's ``ignore`` list adds to it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .checkpoint import Checkpoint, TensorInfo

QUANTIZABLE_DTYPES = ("BF16", "F16", "F32")

DEFAULT_IGNORE: tuple[str, ...] = (
    "re:(.*\\.)?lm_head$",
    "re:.*(embed_tokens|embeddings|wte|wpe|word_embeddings|embed_in|embed_out)$",
    "re:.*\\.(gate|router)$",  # MoE routers: mlp.gate (Qwen3-MoE), block_sparse_moe.gate (Mixtral), router (Llama4)
    "re:.*(vision_model|vision_tower|visual)(\\.|$)",
    "re:.*multi_modal_projector(\\.|$)",
)

#: Fused 3-D expert tensors: checkpoint suffix -> (output stem, ``[E, in, out]`` layout).
#: ``gate_up_proj [E, hidden, 2*inter]`` becomes ``w13_weight [E, 2*inter, hidden]`` (rows
#: ``[0, inter)`` gate, ``[inter, 2*inter)`` up: vLLM's fused-MoE w13 order) and
#: ``down_proj [E, inter, hidden]`` becomes ``w2_weight [E, hidden, inter]``.
FUSED_EXPERTS: dict[str, str] = {
    "experts.gate_up_proj": "experts.w13_weight",
    "experts.down_proj": "experts.w2_weight",
}


class IgnoreRules:
    """Compiled ignore list."""

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


@dataclass(frozen=True)
class Target:
    """What to produce from one checkpoint tensor."""

    source: TensorInfo
    kind: str  # "quantize", "fused_experts" or "copy"
    weight_name: str  # output name of the tensor itself (fp8 weight, or the copy)
    scale_name: str | None = None

    @property
    def quantized(self) -> bool:
        return self.kind != "copy"


def module_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def plan_targets(ckpt: Checkpoint, ignore: Iterable[str] | None = None, *, default_ignore: bool = True) -> list[Target]:
    """One :class:`Target` per tensor of ``ckpt``, in file order."""
    rules = ignore if isinstance(ignore, IgnoreRules) else IgnoreRules(ignore, default_ignore=default_ignore)
    return [classify(t, rules) for t in ckpt.file_order()]


def classify(t: TensorInfo, rules: IgnoreRules) -> Target:
    if t.dtype in QUANTIZABLE_DTYPES:
        if t.name.endswith(".weight") and len(t.shape) == 2 and not rules(module_of(t.name)):
            return Target(t, "quantize", t.name, t.name + "_scale")
        for suffix, stem in FUSED_EXPERTS.items():
            if t.name.endswith(suffix) and len(t.shape) == 3:
                module = t.name[: -len(suffix)] + "experts"
                if rules(module) or rules(t.name):
                    break
                base = t.name[: -len(suffix)] + stem
                return Target(t, "fused_experts", base, base + "_scale")
    return Target(t, "copy", t.name)
