"""Quantized transformers models: :func:`build_quantized_model` and :func:`quantize_model`.

``build_quantized_model(path, device="cuda")`` reads ``config.json``, builds the
transformers model on the meta device (nothing allocated), streams the checkpoint with
:func:`fastfp8.load_quantized` (fp8 weights straight onto ``device``), then
:func:`quantize_model` puts :class:`~fastfp8.modules.Fp8Linear` in place of every linear
layer whose weight was quantized, FP8 MoE blocks in place of the transformers MoE blocks,
and assigns every other parameter from the loaded tensors without copying them. The bf16
weights of the quantized layers are never allocated on the device.

Supported (transformers 5.x): dense Llama-style decoders (every ``nn.Linear``), Qwen3-MoE
and Mixtral (``Qwen3MoeSparseMoeBlock`` / ``MixtralSparseMoeBlock``: per-expert checkpoint
weights, stacked on the device into ``w13 [E, 2I, H]`` / ``w2 [E, H, I]``) and Llama4 text
(``Llama4TextMoe``: fused experts, sigmoid top-1 routing and its shared expert).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .kernels.common import FP8
from .modules import Fp8Linear, Fp8MoE

__all__ = ["Fp8Llama4TextMoe", "Fp8SparseMoeBlock", "build_quantized_model", "quantize_model"]

#: model-name fragment -> checkpoint-name fragment (transformers' own renames on loading)
RENAMES: tuple[tuple[str, str], ...] = ((".mlp.", ".block_sparse_moe."),)
#: per-expert checkpoint names: (gate, up, down)
EXPERT_NAMES: tuple[tuple[str, str, str], ...] = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


# ---------------------------------------------------------------------------------------
# MoE blocks with transformers' call signatures
# ---------------------------------------------------------------------------------------


class Fp8SparseMoeBlock(nn.Module):
    """Replaces ``Qwen3MoeSparseMoeBlock`` / ``MixtralSparseMoeBlock``: same call
    (``[B, S, H] -> [B, S, H]``), the transformers router module kept as ``gate`` (so
    its routing and ``output_router_logits`` recording are unchanged), experts in an
    :class:`Fp8MoE` (no router of its own) as ``experts``."""

    def __init__(self, gate: nn.Module, experts: Fp8MoE, *, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        routed = self.gate(x)
        if isinstance(routed, tuple) and len(routed) == 3:  # (logits, weights, ids), transformers 5
            _, topk_weights, topk_ids = routed
        else:  # a router that returns logits only
            from .kernels.moe import route_softmax_topk

            logits = routed[0] if isinstance(routed, tuple) else routed
            topk_weights, topk_ids = route_softmax_topk(logits, self.top_k, renormalize=self.norm_topk_prob)
        return self.experts.run_experts(x, topk_ids, topk_weights).reshape(shape)


class Fp8Llama4TextMoe(nn.Module):
    """Replaces ``Llama4TextMoe``: returns ``(out [T, H], router_logits)`` like it; keeps
    its ``router`` and ``shared_expert`` modules, experts in an :class:`Fp8MoE`
    (``routing="llama4"``: the sigmoid weight scales the expert's input)."""

    def __init__(self, router: nn.Module, shared_expert: nn.Module, experts: Fp8MoE, *, top_k: int) -> None:
        super().__init__()
        self.router = router
        self.shared_expert = shared_expert
        self.experts = experts
        self.top_k = top_k
        self.hidden_dim = experts.hidden_size

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)
        router_scores, router_logits = self.router(x)  # scores: sigmoid(top-k logits), 0 elsewhere
        topk_ids = torch.topk(router_logits, self.top_k, dim=1).indices
        topk_weights = router_scores.gather(1, topk_ids)
        out = self.shared_expert(x)
        out = out + self.experts.run_experts(x, topk_ids, topk_weights)
        return out, router_logits


# ---------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------


def build_quantized_model(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    **load_kwargs,
) -> nn.Module:
    """A transformers causal LM from the bf16 checkpoint directory ``path``, with FP8 layers.

    ``path`` may also be a Hugging Face Hub id (``revision=`` picks its branch, tag or
    commit). The model is built on the meta device from ``config.json``; the weights come
    from :func:`fastfp8.load_quantized` (``load_kwargs`` are passed on: ``ignore``,
    ``memory_budget``, ...). Returns the model in eval mode on ``device``, with
    ``.load_stats`` (the load's :class:`~fastfp8.LoadStats`); ``generate()`` works.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .hub import resolve
    from .loader import load_quantized

    path = resolve(path, revision=load_kwargs.pop("revision", None))
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers 4.x
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    state = load_quantized(path, device=device, **load_kwargs)
    stats = state.stats
    quantize_model(model, state, dtype=dtype)
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    model.load_stats = stats
    return model


def quantize_model(model: nn.Module, state: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None) -> nn.Module:
    """Puts FP8 modules into ``model`` (transformers, usually on the meta device) and
    materializes it from ``state`` (a :class:`~fastfp8.QuantizedState` or any dict of
    checkpoint-named tensors, quantized ``<m>.weight`` + ``<m>.weight_scale``).

    Tensors of ``state`` are used as they are (no copy) where dtype and layout fit; other
    floating tensors are cast to ``dtype`` (default: the dtype the model was built with).
    Per-expert weights are stacked on their device and removed from ``state``. Buffers
    missing from the checkpoint (rotary ``inv_freq``) are recomputed on the device.
    Returns ``model`` (modified in place), in eval mode.
    """
    state = dict(state)  # removing the per-expert tensors must not touch the caller's dict
    device = _state_device(state)
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != FP8), torch.bfloat16)
    used: set[str] = set()
    _replace_moe_blocks(model, state, used, device)
    _replace_linears(model, state, used)
    _materialize(model, state, used, device, dtype)
    leftover = sorted(set(state) - used)
    if leftover:
        more = " ..." if len(leftover) > 8 else ""
        warnings.warn(f"{len(leftover)} checkpoint tensors were not used: {', '.join(leftover[:8])}{more}",
                      stacklevel=2)
    model.eval()
    model.requires_grad_(False)
    return model


def _state_device(state: dict[str, torch.Tensor]) -> torch.device:
    for t in state.values():
        return t.device
    raise ValueError("the state is empty")


def _candidates(name: str) -> Iterator[str]:
    yield name
    for model_part, ckpt_part in RENAMES:
        if model_part in name:
            yield name.replace(model_part, ckpt_part)


def _find(state: dict[str, torch.Tensor], name: str) -> str | None:
    return next((c for c in _candidates(name) if c in state), None)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _replace_linears(model: nn.Module, state, used: set[str]) -> None:
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or type(mod).forward is not nn.Linear.forward:
            continue  # plain linears only (Llama4's router subclasses nn.Linear)
        w = _find(state, name + ".weight")
        if w is None or w + "_scale" not in state or state[w].dtype != FP8:
            continue
        b = _find(state, name + ".bias") if mod.bias is not None else None
        if mod.bias is not None and b is None:
            raise KeyError(f"{name}.bias is not in the checkpoint")
        _set_module(model, name, Fp8Linear.from_quantized(state[w], state[w + "_scale"], state[b] if b else None))
        used.update(x for x in (w, w + "_scale", b) if x)


def _moe_kind(mod: nn.Module) -> str | None:
    cls = type(mod).__name__
    if cls in ("Qwen3MoeSparseMoeBlock", "MixtralSparseMoeBlock"):
        return "sparse"
    if cls == "Llama4TextMoe":
        return "llama4"
    return None


def _replace_moe_blocks(model: nn.Module, state, used: set[str], device: torch.device) -> None:
    for name, mod in list(model.named_modules()):
        kind = _moe_kind(mod)
        if kind is None:
            continue
        hf = mod.experts
        e = hf.gate_up_proj.shape[0]
        weights = _expert_weights(state, name + ".experts", e, used, device)
        if weights is None:  # experts left in bf16 (ignored): keep the transformers block
            _stack_bf16_experts(hf, state, name + ".experts", e, used, kind)
            continue
        w13, s13, w2, s2 = weights
        if kind == "sparse":
            top_k = _attr(mod, hf, "top_k")
            norm = bool(getattr(mod.gate, "norm_topk_prob", True))
            experts = Fp8MoE.from_quantized(w13, s13, w2, s2, top_k=top_k, norm_topk_prob=norm)
            _set_module(model, name, Fp8SparseMoeBlock(mod.gate, experts, top_k=top_k, norm_topk_prob=norm))
        else:
            top_k = mod.top_k
            experts = Fp8MoE.from_quantized(w13, s13, w2, s2, top_k=top_k, routing="llama4")
            _set_module(model, name, Fp8Llama4TextMoe(mod.router, mod.shared_expert, experts, top_k=top_k))


def _attr(mod, hf, name):
    for m in (mod, getattr(mod, "gate", None), hf):
        if m is not None and hasattr(m, name):
            return int(getattr(m, name))
    raise AttributeError(f"{type(mod).__name__} has no {name}")


def _expert_weights(state, prefix: str, num_experts: int, used: set[str], device):
    """``(w13, s13, w2, s2)`` fp8 for the experts under ``prefix`` (fused names, or
    per-expert names stacked on the device), or None when they are not quantized."""
    fused = _find(state, prefix + ".w13_weight")
    if fused is not None:
        base = fused[: -len("w13_weight")]
        names = [base + n for n in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")]
        used.update(names)
        return tuple(state[n] for n in names)
    for gate, up, down in EXPERT_NAMES:
        first = _find(state, f"{prefix}.0.{gate}.weight")
        if first is None:
            continue
        base = first[: -len(f"0.{gate}.weight")]
        if state[first].dtype != FP8:
            return None
        return _stack(state, base, num_experts, (gate, up, down), used, device)
    return None


def _stack(state, base: str, num_experts: int, names, used, device):
    """Per-expert fp8 weights -> ``w13 [E, 2I, H]`` (gate rows first) and ``w2 [E, H, I]``,
    on the device; each per-expert tensor is dropped from ``state`` once copied."""
    gate, up, down = names
    g0, d0 = state[f"{base}0.{gate}.weight"], state[f"{base}0.{down}.weight"]
    inter, hidden = g0.shape
    sdt = state[f"{base}0.{gate}.weight_scale"].dtype
    w13 = torch.empty((num_experts, 2 * inter, hidden), dtype=FP8, device=device)
    s13 = torch.empty((num_experts, 2 * inter, 1), dtype=sdt, device=device)
    w2 = torch.empty((num_experts, d0.shape[0], d0.shape[1]), dtype=FP8, device=device)
    s2 = torch.empty((num_experts, d0.shape[0], 1), dtype=sdt, device=device)
    for e in range(num_experts):
        for part, rows in ((gate, slice(0, inter)), (up, slice(inter, 2 * inter)), (down, None)):
            n = f"{base}{e}.{part}.weight"
            if n not in state or n + "_scale" not in state:
                raise KeyError(f"{n} (and its _scale) missing from the checkpoint")
            w, s = state.pop(n), state.pop(n + "_scale")
            used.update((n, n + "_scale"))
            if rows is None:
                w2[e].copy_(w)
                s2[e].copy_(s.reshape(-1, 1))
            else:
                w13[e, rows].copy_(w)
                s13[e, rows].copy_(s.reshape(-1, 1))
    return w13, s13, w2, s2


def _stack_bf16_experts(hf: nn.Module, state, prefix: str, num_experts: int, used: set[str], kind: str) -> None:
    """Unquantized experts (ignored at load time): fill the transformers experts' fused
    parameters from per-expert checkpoint tensors (Llama4's fused names load as they are)."""
    for gate, up, down in EXPERT_NAMES:
        first = _find(state, f"{prefix}.0.{gate}.weight")
        if first is None:
            continue
        base = first[: -len(f"0.{gate}.weight")]
        gu, dn = [], []
        for e in range(num_experts):
            names = [f"{base}{e}.{p}.weight" for p in (gate, up, down)]
            g, u, d = (state.pop(n) for n in names)
            used.update(names)
            gu.append(torch.cat([g, u], 0))
            dn.append(d)
        if kind == "llama4":  # [E, H, 2I] / [E, I, H]
            hf.gate_up_proj = nn.Parameter(torch.stack(gu).transpose(1, 2).contiguous(), requires_grad=False)
            hf.down_proj = nn.Parameter(torch.stack(dn).transpose(1, 2).contiguous(), requires_grad=False)
        else:  # [E, 2I, H] / [E, H, I]
            hf.gate_up_proj = nn.Parameter(torch.stack(gu), requires_grad=False)
            hf.down_proj = nn.Parameter(torch.stack(dn), requires_grad=False)
        return


def _materialize(model: nn.Module, state, used: set[str], device: torch.device, dtype: torch.dtype) -> None:
    done: dict[int, nn.Parameter] = {}  # tied parameters: one tensor for every name
    missing: list[str] = []
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if not p.is_meta:
            continue
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if id(p) in done:
            setattr(mod, leaf, done[id(p)])
            continue
        key = _find(state, name)
        if key is None:
            missing.append(name)
            continue
        t = state[key]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)} != model shape {tuple(p.shape)}")
        if t.is_floating_point() and t.dtype != p.dtype and t.dtype != FP8:
            t = t.to(p.dtype)
        new = nn.Parameter(t, requires_grad=False)
        setattr(mod, leaf, new)
        done[id(p)] = new
        used.add(key)
    if missing:
        missing = _tie_missing(model, missing, done)
    if missing:
        more = " ..." if len(missing) > 8 else ""
        raise KeyError(f"{len(missing)} model parameters are not in the checkpoint: {', '.join(missing[:8])}{more}")
    _materialize_buffers(model, state, used, device)


def _tie_missing(model: nn.Module, missing: list[str], done) -> list[str]:
    """Tied output embeddings absent from the checkpoint: share the input embedding."""
    cfg = getattr(model, "config", None)
    tie = getattr(cfg, "tie_word_embeddings", False) or getattr(getattr(cfg, "text_config", None),
                                                               "tie_word_embeddings", False)
    left = []
    for name in missing:
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if tie and out is not None and inp is not None and name.endswith("weight") and \
                model.get_submodule(name.rpartition(".")[0]) is out and not inp.weight.is_meta:
            out.weight = inp.weight
        else:
            left.append(name)
    return left


def _materialize_buffers(model: nn.Module, state, used: set[str], device: torch.device) -> None:
    for mod_name, mod in model.named_modules():
        meta = [n for n, b in mod._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        fresh = None
        for n in meta:
            key = _find(state, f"{mod_name}.{n}" if mod_name else n)
            if key is not None:
                mod._buffers[n] = state[key]
                used.add(key)
                continue
            if fresh is None:
                fresh = _reinit(mod, device)
            if fresh is None or n not in fresh._buffers or fresh._buffers[n].is_meta:
                raise KeyError(f"buffer {mod_name}.{n} is neither in the checkpoint nor recomputable")
            mod._buffers[n] = fresh._buffers[n]


def _reinit(mod: nn.Module, device: torch.device) -> nn.Module | None:
    """A fresh instance of ``mod`` built on ``device`` from its ``config`` (rotary embeddings)."""
    cfg = getattr(mod, "config", None)
    if cfg is None:
        return None
    with torch.device(device):
        return type(mod)(cfg)
