"""``rounding="auto"`` follows the installed compressed-tensors: its Triton kernel (fp32
division, one rounding) runs on sm90+ CUDA devices from 0.19 on; 0.17 (vLLM 0.33's pin) and
0.18 quantize with the torch path (division in the weight dtype) everywhere."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from fastfp8 import fp8, quant
from fastfp8.quant import CT_TRITON_SINCE, compressed_tensors_version, resolve_rounding


@pytest.fixture
def fake(monkeypatch):
    """Sets the compressed-tensors version and the GPU seen by resolve_rounding."""

    def set_(ct: str | None, capability=(9, 0), triton=True):
        def version(name):
            if name == "compressed-tensors" and ct is not None:
                return ct
            raise importlib.metadata.PackageNotFoundError(name)

        monkeypatch.setattr(importlib.metadata, "version", version)
        compressed_tensors_version.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        fp8._capability.cache_clear()  # the capability is cached per device index
        monkeypatch.setattr(quant, "_triton_importable", lambda: triton)

    yield set_
    compressed_tensors_version.cache_clear()
    fp8._capability.cache_clear()


CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize("ct, expected", [
    ("0.17.0", "eager"), ("0.18.1", "eager"), ("0.19.0", "fp32"), ("0.20.1", "fp32"), ("1.0.0", "fp32"),
    ("0.20.0.dev12+gabc", "fp32"), (None, "fp32"),
])
def test_auto_on_an_sm90_gpu_follows_the_version(fake, ct, expected):
    fake(ct)
    assert compressed_tensors_version() == (None if ct is None else tuple(int(x) for x in ct.split(".")[:2]))
    assert resolve_rounding("auto", CUDA) == expected
    assert resolve_rounding("auto", CPU) == "eager"  # the torch path on the CPU, in every version


@pytest.mark.parametrize("ct", ["0.17.0", "0.20.1"])
def test_auto_elsewhere_is_eager_and_explicit_choices_win(fake, ct):
    fake(ct, capability=(8, 9))
    assert resolve_rounding("auto", CUDA) == "eager"  # Ada: no Triton path in compressed-tensors
    fake(ct, triton=False)
    assert resolve_rounding("auto", CUDA) == "eager"
    fake(ct)
    for r in ("eager", "fp32"):
        assert resolve_rounding(r, CUDA) == r and resolve_rounding(r, CPU) == r
    with pytest.raises(ValueError, match="rounding"):
        resolve_rounding("nearest", CPU)


def test_the_installed_compressed_tensors_agrees_with_the_version_rule():
    """Read from the installed package itself: its Triton ``_quantize`` backend is
    registered (and enabled) exactly from CT_TRITON_SINCE on. Runs in any venv, the vLLM
    one (0.17) included."""
    pytest.importorskip("compressed_tensors")
    version = compressed_tensors_version()
    assert version is not None
    try:
        from compressed_tensors.quantization.lifecycle import forward_helpers
        from compressed_tensors.utils.impl_backend import ImplBackend
    except ImportError:  # 0.17: neither module exists, so no Triton path
        assert version < CT_TRITON_SINCE
        return
    backends = [fn.__name__ for fn, *_ in ImplBackend._backends.get("_quantize", [])]
    has_triton = hasattr(forward_helpers, "_quantize_triton") and "_quantize_triton" in backends
    assert has_triton == (version >= CT_TRITON_SINCE), (version, backends)
