"""Model layouts are known, not guessed: tied embeddings, fused experts in either
orientation, architectures and tensors fastfp8 does not know (refused with a message that
says what to pass), and the table checked against the models transformers builds."""

from __future__ import annotations

import json

import fastfp8
import pytest
import torch
from ct_oracle import ct_quantize, same_bytes
from fastfp8.convert import convert
from fastfp8.layouts import LAYOUTS, check_with_transformers, layout_for
from safetensors.torch import save_file
from test_load import save, tiny

FP8 = torch.float8_e4m3fn


def tied_llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=128, intermediate_size=96, tie_word_embeddings=True)
    return tf.LlamaForCausalLM(cfg).to(torch.bfloat16)


def test_tied_embeddings_convert_into_a_model_transformers_runs(tmp_path):
    """Llama-3.2-1B's layout: no lm_head.weight in the checkpoint. The config must list
    lm_head as ignored, or transformers quantizes the tied head and gives NaN logits."""
    import transformers as tf

    model = tied_llama()
    src = save(model, tmp_path / "src")
    assert "lm_head.weight" not in src
    res = convert(tmp_path / "src", tmp_path / "dst", progress=False)
    assert "lm_head" in res.ignored
    qc = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]
    assert "lm_head" in qc["ignore"]
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits.float()
        got = loaded(ids).logits.float()
    assert not got.isnan().any()
    cos = torch.nn.functional.cosine_similarity(want.flatten(), got.flatten(), dim=0)
    assert cos >= 0.99, float(cos)


def _fuse(src: dict[str, torch.Tensor], n_exp: int, layers: int, prefix: str, names) -> dict[str, torch.Tensor]:
    """Per-expert Qwen3-MoE tensors -> transformers 5's fused ``[E, 2I, H]`` / ``[E, H, I]``."""
    gate, up, down = names
    out = dict(src)
    for layer in range(layers):
        p = f"model.layers.{layer}.{prefix}.experts"
        gu = [torch.cat([out.pop(f"{p}.{e}.{gate}.weight"), out.pop(f"{p}.{e}.{up}.weight")]) for e in range(n_exp)]
        dn = [out.pop(f"{p}.{e}.{down}.weight") for e in range(n_exp)]
        out[f"{p}.gate_up_proj"] = torch.stack(gu)
        out[f"{p}.down_proj"] = torch.stack(dn)
    return out


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_fused_experts_out_in_are_not_transposed(tmp_path, arch):
    """transformers 5 may save Qwen3-MoE / Mixtral experts fused ``[E, out, in]`` (Llama4:
    ``[E, in, out]``): per-output-channel scales either way, the same bytes as the
    per-expert checkpoint."""
    model = tiny(arch)
    src = save(model, tmp_path / "per_expert")
    prefix, names = ("mlp", ("gate_proj", "up_proj", "down_proj")) if arch == "qwen3_moe" else \
        ("block_sparse_moe", ("w1", "w3", "w2"))
    fused = _fuse(src, 4, 2, prefix, names)
    (tmp_path / "fused").mkdir()
    save_file(fused, str(tmp_path / "fused" / "model.safetensors"))
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "per_expert" / "config.json").read_text())
    state = fastfp8.load_quantized(tmp_path / "fused", device="cpu")
    for layer in range(2):
        p = f"model.layers.{layer}.{prefix}.experts"
        w13, s13 = state[f"{p}.w13_weight"], state[f"{p}.w13_weight_scale"]
        assert w13.shape == fused[f"{p}.gate_up_proj"].shape  # [E, 2I, H]: kept, not transposed
        for e in range(4):
            q, s = ct_quantize(fused[f"{p}.gate_up_proj"][e])
            assert same_bytes(w13[e], q) and same_bytes(s13[e], s)
            q, s = ct_quantize(fused[f"{p}.down_proj"][e])
            assert same_bytes(state[f"{p}.w2_weight"][e], q) and same_bytes(state[f"{p}.w2_weight_scale"][e], s)
    # convert writes the per-expert linears vLLM's loaders expect, equal to the per-expert checkpoint's
    convert(tmp_path / "fused", tmp_path / "out_fused", progress=False)
    convert(tmp_path / "per_expert", tmp_path / "out_per_expert", progress=False)
    from test_convert import read_dir

    a, b = read_dir(tmp_path / "out_fused"), read_dir(tmp_path / "out_per_expert")
    assert set(a) == set(b)
    for k in a:
        assert same_bytes(a[k], b[k]), k


def test_fused_experts_of_the_wrong_shape_are_refused(tmp_path):
    save(tiny("llama4"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "qwen3_moe"  # says [E, out, in]; the tensors are Llama4's [E, in, out]
    cfg["moe_intermediate_size"] = cfg["intermediate_size"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fastfp8.LayoutError, match=r"experts\.(gate_up|down)_proj has shape .* stores it"):
        fastfp8.load_quantized(tmp_path / "m", device="cpu")


def gpt2(path):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64))
    model.save_pretrained(path)


def opt(path):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           ffn_dim=96, vocab_size=128, max_position_embeddings=64,
                                           word_embed_proj_dim=64))
    model.save_pretrained(path)


@pytest.mark.parametrize("make", [gpt2, opt])
def test_unknown_architectures_are_refused_with_what_to_pass(tmp_path, make):
    make(tmp_path / "m")
    with pytest.raises(fastfp8.LayoutError, match=r"is not an architecture fastfp8 knows.*layout='names'"):
        fastfp8.load_quantized(tmp_path / "m", device="cpu")
    with pytest.raises(fastfp8.LayoutError, match="layout='names'"):
        convert(tmp_path / "m", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_gpt2_conv1d_by_name_is_refused_by_transformers_model(tmp_path):
    """``layout="names"`` on GPT-2: its attention and MLP weights are Conv1D ``[in, out]``;
    convert asks transformers' model and refuses instead of writing garbage."""
    gpt2(tmp_path / "m")
    with pytest.raises(fastfp8.LayoutError, match=r"Conv1D.*not an nn\.Linear"):
        convert(tmp_path / "m", tmp_path / "out", layout="names", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_tensor_a_known_architecture_does_not_have_is_refused(tmp_path):
    src = save(tiny("llama"), tmp_path / "m")
    extra = {**src, "model.layers.0.mlp.mystery.weight": torch.randn(8, 64).to(torch.bfloat16)}
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.unlink()
    (tmp_path / "m" / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(extra, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(fastfp8.LayoutError, match=r"mlp\.mystery\.weight .* is not a tensor fastfp8 knows"):
        fastfp8.load_quantized(tmp_path / "m", device="cpu")
    state = fastfp8.load_quantized(tmp_path / "m", device="cpu", layout="names")  # what to pass: it works
    assert state["model.layers.0.mlp.mystery.weight"].dtype == FP8


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "mixtral", "llama4"])
def test_no_default_ignore_never_quantizes_embeddings_or_routers(tmp_path, arch):
    save(tiny(arch), tmp_path / "m")
    state = fastfp8.load_quantized(tmp_path / "m", device="cpu", default_ignore=False)
    quantized = {n[: -len("_scale")] for n in state if n.endswith("_scale")}
    assert not any("embed_tokens" in n or n.endswith((".gate.weight", ".router.weight")) for n in quantized)
    assert "lm_head.weight" in quantized  # a Linear: quantized once the defaults are dropped


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "mixtral", "llama4"])
def test_table_agrees_with_the_models_transformers_builds(tmp_path, arch):
    """Every 2-D weight the table quantizes is an nn.Linear of transformers' model; every
    nn.Linear whose weight is in the checkpoint is quantized, kept as a router, or ignored."""
    from torch import nn

    model = tiny(arch)
    src = save(model, tmp_path / "m")
    layout = layout_for(tmp_path / "m", default_ignore=False)
    assert layout.arch is LAYOUTS[arch]
    targets = layout.targets(fastfp8.open_checkpoint(tmp_path / "m"))
    assert check_with_transformers(layout, targets)
    kinds = {t.source.name: t.kind for t in targets}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name + ".weight" in src:
            assert kinds[name + ".weight"] == "quantize" or name.endswith((".gate", ".router")), name


def test_checkpoint_without_config_is_planned_by_name(tmp_path):
    save_file({"a.weight": torch.randn(8, 8).to(torch.bfloat16), "emb.embed_tokens.weight": torch.randn(8, 8)},
              str(tmp_path / "x.safetensors"))
    state = fastfp8.load_quantized(tmp_path / "x.safetensors", device="cpu")
    assert state["a.weight"].dtype == FP8 and state["emb.embed_tokens.weight"].dtype == torch.float32


def test_fused_2d_gate_up_splits_each_half_and_qkv_is_refused_under_tp(tmp_path):
    """A 2-D fused ``gate_up_proj [2I, H]`` (Phi-3 style): each rank gets its slice of gate
    and its slice of up, as vLLM's MergedColumnParallelLinear, not the first half of the
    rows; a fused ``qkv_proj`` cannot be split without its q/k/v sizes."""
    from fastfp8.layouts import Split
    from fastfp8.tensor_parallel import TensorParallel, rank_slice

    w = torch.randn(16, 8).to(torch.bfloat16)
    save_file({"model.layers.0.mlp.gate_up_proj.weight": w}, str(tmp_path / "a.safetensors"))
    full = fastfp8.load_quantized(tmp_path / "a.safetensors", device="cpu")
    for rank in range(2):
        got = fastfp8.load_quantized(tmp_path / "a.safetensors", device="cpu", tp_rank=rank, tp_size=2)
        for name in ("model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.gate_up_proj.weight_scale"):
            want = rank_slice(Split("halves"), name, full[name], TensorParallel(rank, 2))
            assert same_bytes(got[name], want), (rank, name)
        rows = [*range(4 * rank, 4 * rank + 4), *range(8 + 4 * rank, 8 + 4 * rank + 4)]
        q, _ = ct_quantize(w[rows])
        assert same_bytes(got["model.layers.0.mlp.gate_up_proj.weight"], q)
    save_file({"model.layers.0.self_attn.qkv_proj.weight": w}, str(tmp_path / "b.safetensors"))
    with pytest.raises(fastfp8.LayoutError, match="fused qkv_proj"):
        fastfp8.load_quantized(tmp_path / "b.safetensors", device="cpu", tp_rank=0, tp_size=2)
