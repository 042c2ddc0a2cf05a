"""``fastfp8.convert``: a bf16 checkpoint -> an FP8_DYNAMIC compressed-tensors checkpoint.

Every quantized tensor is checked byte for byte against compressed-tensors' own functions,
every other tensor against the source; the result loads with transformers +
compressed-tensors on the CPU, matches fastfp8's own (dequantized) weights and tracks the
bf16 model.
"""

from __future__ import annotations

import itertools
import json
import struct

import fastfp8
import pytest
import torch
from ct_oracle import ct_quantize, same_bytes
from fastfp8 import convert as cv
from fastfp8.convert import convert, quantization_config
from safetensors import safe_open
from safetensors.torch import save_file
from test_load import save, tiny

FP8 = torch.float8_e4m3fn


def read_dir(path):
    """All tensors of a saved checkpoint directory, via safetensors itself."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as g:
            assert g.metadata() == {"format": "pt"}
            for k in g.keys():  # noqa: SIM118
                out[k] = g.get_tensor(k)
    return out


def expected(src: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """What llm-compressor's FP8_DYNAMIC would write for ``src``, computed with
    compressed-tensors' functions: 2-D linear weights quantized (not lm_head, embeddings,
    routers), Llama4 fused experts as per-expert linears, everything else unchanged."""
    out = {}
    for name, w in src.items():
        module = name.rsplit(".", 1)[0]
        skip = module.endswith(("lm_head", "embed_tokens", ".gate", ".router"))
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")) and w.ndim == 3:
            stem = name.rsplit(".", 1)[0]
            n = w.shape[2]
            for e in range(w.shape[0]):
                if name.endswith("gate_up_proj"):
                    parts = {"gate_proj": w[e][:, : n // 2], "up_proj": w[e][:, n // 2 :]}
                else:
                    parts = {"down_proj": w[e]}
                for proj, p in parts.items():
                    q, s = ct_quantize(p.t().contiguous())
                    out[f"{stem}.{e}.{proj}.weight"] = q
                    out[f"{stem}.{e}.{proj}.weight_scale"] = s
        elif name.endswith(".weight") and w.ndim == 2 and not skip:
            out[name], out[name + "_scale"] = ct_quantize(w)
        else:
            out[name] = w
    return out


def add_side_files(path):
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    (path / "special_tokens_map.json").write_text("{}")
    (path / "modeling_custom.py").write_text("# remote code\n")
    (path / "original").mkdir()
    (path / "original" / "params.json").write_text("{}")
    (path / "pytorch_model.bin").write_bytes(b"stale weights")  # other weight formats: not copied
    (path / ".cache").mkdir()
    (path / ".cache" / "junk").write_text("x")


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "llama4"])
def test_bytes_files_index_and_config(tmp_path, arch):
    src_dir, dst = tmp_path / "src", tmp_path / "dst"
    src = save(tiny(arch), src_dir)
    add_side_files(src_dir)
    res = convert(src_dir, dst, max_shard_size="48KB", memory_budget="64KiB", progress=False)

    # files: shards + index + config + the side files, nothing else, no temporary left
    n = len(res.shards)
    assert n >= 2
    shard_names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert res.shards == shard_names
    files = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert files == sorted([*shard_names, "model.safetensors.index.json", "config.json", "generation_config.json",
                            "tokenizer.json", "special_tokens_map.json", "modeling_custom.py",
                            "original/params.json"])
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    for f in shard_names:
        with safe_open(dst / f, "pt") as g:
            sizes = [g.get_tensor(k).numel() * g.get_tensor(k).element_size() for k in g.keys()]  # noqa: SIM118
        assert sum(sizes) <= 48_000 or len(sizes) == 1, f

    # tensors: every byte as compressed-tensors would write it
    got = read_dir(dst)
    want = expected(src, arch)
    assert set(got) == set(want)
    for name, w in want.items():
        assert same_bytes(got[name], w), name
    assert res.quantized == sum(n.endswith("_scale") for n in want) and res.tensors == len(want)

    # index
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    for f in shard_names:
        with safe_open(dst / f, "pt") as g:
            assert {k for k, v in index["weight_map"].items() if v == f} == set(g.keys())
    assert set(index["weight_map"]) == set(got)

    # config: the source's, plus compressed-tensors' FP8_DYNAMIC quantization_config
    src_cfg = json.loads((src_dir / "config.json").read_text())
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    assert cfg == src_cfg
    ignored = {n.rsplit(".", 1)[0] for n, w in src.items() if w.ndim == 2 and n + "_scale" not in want}
    assert set(qc["ignore"]) == ignored and "lm_head" in ignored
    assert qc == quantization_config(qc["ignore"])


def test_quantization_config_is_compressed_tensors_fp8_dynamic():
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme

    qc = quantization_config(["lm_head"])
    parsed = QuantizationConfig.model_validate(qc)
    preset = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    group = parsed.config_groups["group_0"]
    assert group.targets == ["Linear"]
    assert group.weights.model_dump() == preset.weights.model_dump()
    assert group.input_activations.model_dump() == preset.input_activations.model_dump()
    assert parsed.format == "float-quantized" == group.format
    assert parsed.quant_method == "compressed-tensors"
    assert parsed.quantization_status == QuantizationStatus.COMPRESSED
    assert parsed.ignore == ["lm_head"]
    assert json.loads(json.dumps(qc)) == qc


def dequantized(state, src):
    """fastfp8's own weights (``load_quantized`` on the CPU), dequantized to bf16 in the
    checkpoint's names and layouts."""
    out = {}
    for name, t in state.items():
        if name.endswith("_scale"):
            continue
        if name + "_scale" not in state:
            out[name] = t
            continue
        w = t.to(torch.bfloat16) * state[name + "_scale"]
        if name.endswith("experts.w13_weight"):
            out[name.replace("w13_weight", "gate_up_proj")] = w.transpose(1, 2).contiguous()
        elif name.endswith("experts.w2_weight"):
            out[name.replace("w2_weight", "down_proj")] = w.transpose(1, 2).contiguous()
        else:
            out[name] = w
    assert set(out) == set(src)
    return out


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return 10 * torch.log10(ref.pow(2).mean() / (ref - x).pow(2).mean().clamp_min(1e-30)).item()


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "llama4"])
def test_transformers_loads_it(tmp_path, arch):
    import transformers as tf

    model = tiny(arch)
    src = save(model, tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
    loaded, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dst", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.quantization_config is not None

    # fastfp8's own weights, dequantized, in the bf16 architecture
    state = fastfp8.load_quantized(tmp_path / "src", device="cpu", progress=False)
    (tmp_path / "ref").mkdir()
    save_file(dequantized(state, src), str(tmp_path / "ref" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "ref" / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ref")

    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        bf16 = model(ids).logits.float()
        fp8 = loaded(ids).logits.float()  # FP8_DYNAMIC: FP8 weights and per-token FP8 activations
        for m in loaded.modules():  # now the same with the activations left in bf16
            m.quantization_enabled = False
        fp8_weights_only = loaded(ids).logits.float()
        own = ref(ids).logits.float()
    # the weights transformers decompressed are fastfp8's, to the last bit
    assert torch.equal(fp8_weights_only, own), f"{sqnr_db(own, fp8_weights_only):.1f} dB"
    # and the FP8_DYNAMIC model tracks the bf16 one
    assert sqnr_db(bf16, fp8) > 18, sqnr_db(bf16, fp8)
    assert (bf16.argmax(-1) == fp8.argmax(-1)).float().mean() >= 0.8
    assert sqnr_db(bf16, fp8_weights_only) > sqnr_db(bf16, fp8) - 1


@pytest.mark.parametrize("arch", ["llama", "llama4"])
def test_same_bytes_as_load_quantized(tmp_path, arch):
    save(tiny(arch), tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst", max_shard_size="1MB", progress=False)
    got = read_dir(tmp_path / "dst")
    state = fastfp8.load_quantized(tmp_path / "src", device="cpu", progress=False)
    for name, t in state.items():
        if "experts.w13_weight" in name or "experts.w2_weight" in name:
            stem, suffix = name.split(".experts.")
            projs = ["gate_proj", "up_proj"] if suffix.startswith("w13") else ["down_proj"]
            scale = "_scale" if suffix.endswith("_scale") else ""
            for e in range(t.shape[0]):
                parts = torch.cat([got[f"{stem}.experts.{e}.{p}.weight{scale}"].view(torch.uint8) for p in projs])
                assert torch.equal(parts, t[e].view(torch.uint8)), (name, e)
        else:
            assert same_bytes(got[name], t), name


def test_ignore_and_no_default_ignore(tmp_path):
    src = save(tiny("llama"), tmp_path / "src")
    res = convert(tmp_path / "src", tmp_path / "a", ignore=["re:.*self_attn", "model.layers.1.mlp.down_proj"],
                  progress=False)
    got = read_dir(tmp_path / "a")
    for name in src:
        if "self_attn" in name or "layers.1.mlp.down_proj" in name:
            assert same_bytes(got[name], src[name]), name
    assert "model.layers.0.mlp.down_proj.weight_scale" in got
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.self_attn.q_proj" in qc["ignore"] and "model.layers.1.mlp.down_proj" in qc["ignore"]
    assert qc["ignore"] == res.ignored
    convert(tmp_path / "src", tmp_path / "b", default_ignore=False, progress=False)
    got = read_dir(tmp_path / "b")
    # lm_head is a Linear: quantized once the defaults are dropped; an embedding never is
    assert got["lm_head.weight"].dtype == FP8 and got["model.embed_tokens.weight"].dtype == torch.bfloat16
    ignore = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["model.embed_tokens"]


def test_streams_tensors_larger_than_the_budget(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "model.embed_tokens.weight": torch.randn(2048, 256, generator=gen).to(torch.bfloat16),  # 1 MiB, copied
        "model.layers.0.mlp.up_proj.weight": torch.randn(512, 512, generator=gen).to(torch.bfloat16),  # 512 KiB
        "model.layers.0.mlp.up_proj.bias": torch.randn(512, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.ones(256, dtype=torch.float32),
        "empty.weight": torch.empty(0, 8, dtype=torch.bfloat16),
        "steps": torch.tensor(7, dtype=torch.int64),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 256}))
    res = convert(tmp_path / "model.safetensors", tmp_path / "out", memory_budget="64KiB", progress=False)
    got = read_dir(tmp_path / "out")
    q, s = ct_quantize(tensors["model.layers.0.mlp.up_proj.weight"])
    assert same_bytes(got["model.layers.0.mlp.up_proj.weight"], q)
    assert same_bytes(got["model.layers.0.mlp.up_proj.weight_scale"], s)
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.bias", "model.norm.weight", "steps"):
        assert same_bytes(got[name], tensors[name]), name
    assert same_bytes(got["empty.weight"], tensors["empty.weight"])  # empty: passed through as it is
    assert "empty.weight_scale" not in got
    # a single file: the config.json beside it, no side files
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert res.copied_files == []


def test_single_file_without_a_config_is_refused(tmp_path):
    save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(8, 8).to(torch.bfloat16)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(fastfp8.CheckpointError, match=r"no config\.json beside it.*model directory"):
        convert(tmp_path / "model.safetensors", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_unless_asked(tmp_path):
    save(tiny("llama"), tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists"):
        convert(tmp_path / "src", dst, progress=False)
    assert (dst / "keep.txt").read_text() == "mine"
    convert(tmp_path / "src", dst, overwrite=True, progress=False)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_refuses_bad_sources_and_destinations(tmp_path):
    save(tiny("llama"), tmp_path / "src")
    with pytest.raises(ValueError, match="must not be the source"):
        convert(tmp_path / "src", tmp_path / "src", overwrite=True, progress=False)
    with pytest.raises(ValueError, match="must not be the source"):
        convert(tmp_path / "src", tmp_path / "src" / "fp8", progress=False)
    convert(tmp_path / "src", tmp_path / "fp8", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        convert(tmp_path / "fp8", tmp_path / "again", progress=False)
    with pytest.raises(fastfp8.CheckpointNotFoundError):
        convert(tmp_path / "nope", tmp_path / "x", progress=False)
    assert not (tmp_path / "again").exists() and not (tmp_path / "x").exists()


def test_failures_leave_nothing_behind(tmp_path, monkeypatch):
    w = torch.randn(16, 16, dtype=torch.bfloat16)
    bad = w.clone()
    bad[2, 3] = float("nan")
    save_file({"a.weight": w, "b.weight": bad}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "custom"}))
    dst = tmp_path / "out"
    with pytest.raises(fastfp8.NonFiniteWeightError, match=r"b\.weight"):
        convert(tmp_path / "model.safetensors", dst, layout="names", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    convert(tmp_path / "model.safetensors", dst, layout="names", allow_non_finite=True, progress=False)
    assert read_dir(dst)["b.weight_scale"].isnan().any()

    # an interrupt in the middle of writing: the old output stays, the temporary goes
    calls = []

    def interrupted(self, name, t):
        calls.append(name)
        raise KeyboardInterrupt

    monkeypatch.setattr(cv._ShardWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "model.safetensors", dst, layout="names", overwrite=True, allow_non_finite=True,
                progress=False)
    assert calls and sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "out"]
    assert read_dir(dst)["b.weight_scale"].isnan().any()


def test_not_enough_disk_space(tmp_path, monkeypatch):
    import shutil

    save(tiny("llama"), tmp_path / "src")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    with pytest.raises(OSError, match="free"):
        convert(tmp_path / "src", tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()


def test_shard_header_is_valid_safetensors(tmp_path):
    """The hand-written header: 8-byte length, JSON padded to 8 bytes, tiling offsets."""
    save(tiny("llama"), tmp_path / "src")
    res = convert(tmp_path / "src", tmp_path / "dst", max_shard_size="30KB", progress=False)
    for name in res.shards:
        raw = (tmp_path / "dst" / name).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert n % 8 == 0
        header = json.loads(raw[8 : 8 + n])
        spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
        assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    fastfp8.open_checkpoint(tmp_path / "dst")  # fastfp8's own validating reader accepts it


def test_vllm_plugin_pieces_without_vllm(tmp_path):
    """The weight stream the vLLM loader feeds ``model.load_weights`` is exactly the
    converted checkpoint; option parsing; ``register`` is a no-op without vLLM."""
    from fastfp8 import vllm_plugin as vp

    save(tiny("qwen3_moe"), tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
    disk = read_dir(tmp_path / "dst")
    stream = list(vp.iter_weights(tmp_path / "src", device="cpu"))
    assert len(stream) == len(disk) and set(dict(stream)) == set(disk)
    for name, t in stream:
        assert same_bytes(t, disk[name]), name
    _, _, qc = vp.plan(tmp_path / "src", vp.parse_options(None))
    assert qc == json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]
    assert vp.is_fp8_channel_config(qc) and not vp.is_fp8_channel_config({"quant_method": "gptq"})

    opts = vp.parse_options({"ignore": ["re:.*self_attn"], "memory_budget": "64MiB", "threads": 4})
    assert opts.ignore == ("re:.*self_attn",) and opts.threads == 4 and opts.memory_budget == 64 << 20
    assert vp.parse_options(None) == vp.parse_options({})
    for bad, msg in [({"ignores": []}, "unknown"), ({"ignore": [1]}, "ignore"), ({"ignore": ["re:("]}, "pattern"),
                     ({"threads": 0}, "threads"), ({"memory_budget": "lots"}, "byte size"),
                     ({"rounding": "up"}, "rounding"), ({"default_ignore": "no"}, "default_ignore")]:
        with pytest.raises((ValueError, TypeError), match=msg):
            vp.parse_options(bad)
    import importlib.util

    if importlib.util.find_spec("vllm.model_executor") is None:  # no vLLM here
        assert vp.register() is None  # nothing to plug into: a quiet no-op
        with pytest.raises(ImportError):
            vp.Fastfp8ModelLoader  # noqa: B018


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", "llama4"])
def test_convert_on_cuda_matches_compressed_tensors_there(tmp_path, arch):
    src = save(tiny(arch), tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst", device="cuda", progress=False)
    got = read_dir(tmp_path / "dst")
    cuda_src = {k: v.cuda() for k, v in src.items()}
    for name, w in expected(cuda_src, arch).items():
        assert same_bytes(got[name], w), name


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "llama4"])
def test_matches_fastfp8_modules(tmp_path, arch):
    """transformers + compressed-tensors on the converted checkpoint, activations left in
    bf16, against fastfp8's own FP8 modules on the source (the same FP8 weights; they
    dequantize in fp32 where compressed-tensors multiplies in bf16, hence not bit-exact)."""
    fmodel = pytest.importorskip("fastfp8.model")
    import transformers as tf

    model = tiny(arch)
    save(model, tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    own = fmodel.build_quantized_model(tmp_path / "src", device="cpu", progress=False)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loaded(ids)  # decompresses
        for m in loaded.modules():
            m.quantization_enabled = False
        ct = loaded(ids).logits.float()
        mine = own(ids).logits.float()
    assert sqnr_db(ct, mine) > 35, sqnr_db(ct, mine)
    assert (ct.argmax(-1) == mine.argmax(-1)).float().mean() >= 0.95


def test_vllm_versions_outside_the_tested_ones_are_refused():
    from fastfp8 import vllm_plugin as vp

    vp.check_vllm_version("0.33.0")
    vp.check_vllm_version("0.33.2.dev5+gabcdef")
    for bad in ("0.32.1", "0.34.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=r"supports vLLM 0\.33\.x.*vllm==0\.33"):
            vp.check_vllm_version(bad)
