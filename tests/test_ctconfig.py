"""``fastfp8.ctconfig.quantization_config`` against what compressed-tensors' own
``ModelCompressor`` writes into ``config.json`` for the same model (llm-compressor's save
path: apply the FP8_DYNAMIC scheme, compress, ``update_config``)."""

from __future__ import annotations

import json

import pytest
import torch

ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationConfig,
    apply_quantization_config,
    preset_name_to_scheme,
)
from fastfp8 import ctconfig  # noqa: E402
from test_load import tiny  # noqa: E402


def written_by_compressed_tensors(model, ignore: list[str], tmp_path) -> dict:
    recipe = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])},
                                ignore=ignore)
    apply_quantization_config(model, recipe)
    compressor = ModelCompressor.from_pretrained_model(model, "float-quantized")
    compressor.compress_model(model)
    model.config.save_pretrained(tmp_path)
    compressor.update_config(str(tmp_path))
    return json.loads((tmp_path / "config.json").read_text())["quantization_config"]


def assert_same_keys(ours, theirs, path="quantization_config"):
    """Key by key, so that a difference names where it is."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), path
        assert sorted(ours) == sorted(theirs), (path, sorted(set(ours) ^ set(theirs)))
        for k in theirs:
            assert_same_keys(ours[k], theirs[k], f"{path}.{k}")
    else:
        assert ours == theirs, (path, ours, theirs)


@pytest.mark.parametrize("arch, ignore", [
    ("llama", ["lm_head"]),
    ("llama", ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]),
    ("qwen3_moe", ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate",
                   "lm_head"]),
])
def test_same_as_model_compressor(tmp_path, arch, ignore):
    model = tiny(arch).to(torch.bfloat16)
    theirs = written_by_compressed_tensors(model, ignore, tmp_path)
    ours = ctconfig.quantization_config(ignore)
    assert json.loads(json.dumps(ours)) == ours  # plain JSON
    ours_ignore, their_ignore = ours.pop("ignore"), theirs.pop("ignore")
    assert_same_keys(ours, theirs)
    # ModelCompressor rebuilds ``ignore`` from the model: 0.17 lists only unquantized
    # nn.Linear modules, so transformers 5's MoE routers (not nn.Linear) drop out there;
    # 0.20 lists them too. Everything else is what we were given, in the same order.
    assert [m for m in ours_ignore if m in their_ignore] == their_ignore
    dropped = [m for m in ours_ignore if m not in their_ignore]
    assert all(not isinstance(model.get_submodule(m), torch.nn.Linear) for m in dropped), dropped
    if arch == "llama":
        assert ours_ignore == their_ignore


def test_what_it_says():
    qc = ctconfig.quantization_config(["lm_head", "re:.*self_attn"])
    assert qc["version"] == ct.__version__ and qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "float-quantized" and qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head", "re:.*self_attn"]
    (group,) = qc["config_groups"].values()
    w, a = group["weights"], group["input_activations"]
    assert (w["num_bits"], w["type"], w["strategy"], w["symmetric"], w["dynamic"]) == (8, "float", "channel", True,
                                                                                        False)
    assert (a["num_bits"], a["type"], a["strategy"], a["dynamic"]) == (8, "float", "token", True)
    assert group["targets"] == ["Linear"] and group["format"] == "float-quantized"
    # compressed-tensors reads it back to the FP8_DYNAMIC scheme
    parsed = QuantizationConfig.model_validate({k: v for k, v in qc.items()
                                                if k not in ("version", "sparsity_config", "transform_config")})
    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    assert parsed.config_groups["group_0"].weights == scheme.weights
    assert parsed.config_groups["group_0"].input_activations == scheme.input_activations
    with pytest.raises(ValueError, match="non-empty"):
        ctconfig.quantization_config(["lm_head", ""])


def test_import_is_cheap():
    import subprocess
    import sys

    code = "import sys, fastfp8.ctconfig; sys.exit('compressed_tensors' in sys.modules or 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
