"""The Triton FP8 GEMM (:mod:`fastfp8.kernels.gemm`) against its fp32 reference, on fresh
random inputs, outputs poisoned (NaN) before each run. (The CPU run of the ``tile`` kernel
under ``TRITON_INTERPRET=1`` is part of ``test_modules.test_triton_kernels_under_interpreter``.)"""

from __future__ import annotations

import pytest
import torch
from fastfp8.kernels import act_quant as aq
from fastfp8.kernels import common
from fastfp8.kernels import gemm as gm

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16


def sqnr(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    err = (out - ref).pow(2).sum()
    return float("inf") if err == 0 else float(10 * torch.log10(ref.pow(2).sum() / err))


def gemm_case(m, n, k, *, bias, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=device, dtype=BF16)
    w = (torch.randn(n, k, generator=g, device=device) * 64).clamp(-448, 448).to(FP8)
    ws = torch.rand(n, generator=g, device=device) / 64 + 1e-3
    b = torch.randn(n, generator=g, device=device, dtype=BF16) if bias else None
    q, s = aq.act_quant(x)
    return q, s, w, ws, b


def check(m, n, k, cfg, *, bias, device, seed=0):
    q, s, w, ws, b = gemm_case(m, n, k, bias=bias, device=device, seed=seed)
    y = gm.fp8_gemm(q, s, w, ws, b, config=cfg)
    ref = gm.fp8_gemm_reference(q, s, w, ws, b, out_dtype=torch.float32)
    assert y.shape == (m, n) and y.dtype == BF16
    assert torch.isfinite(y).all(), (m, n, k, cfg)
    assert sqnr(y, ref) > 45, (m, n, k, cfg, sqnr(y, ref))


def test_reference_matches_dequantized_matmul():
    q, s, w, ws, b = gemm_case(7, 48, 64, bias=True, device="cpu")
    ref = gm.fp8_gemm_reference(q, s, w, ws, b, out_dtype=torch.float32)
    emu = (q.float() * s) @ (w.float() * ws.reshape(-1, 1)).t() + b.float()
    torch.testing.assert_close(ref, emu, rtol=1e-5, atol=1e-4)


def test_gemm_rejects_bad_inputs():
    q, s, w, ws, _ = gemm_case(4, 32, 64, bias=False, device="cpu")
    with pytest.raises(ValueError):
        gm.fp8_gemm(q.float(), s, w, ws, config=("tile", 16, 32, 32, 1, 1, 4, 2))
    with pytest.raises(ValueError):
        gm.fp8_gemm(q, s[:2], w, ws, config=("tile", 16, 32, 32, 1, 1, 4, 2))


cuda = pytest.mark.cuda
needs_fp8 = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                               reason="needs a GPU with fp8 (sm89+)")
needs_tma = pytest.mark.skipif(not (torch.cuda.is_available() and gm.tma_supported(torch.device("cuda"))),
                               reason="needs sm90 and Triton tensor descriptors")

TILE_CONFIGS = [("tile", 16, 64, 128, 8, 1, 4, 4), ("tile", 16, 128, 128, 8, 4, 4, 4),
                ("tile", 64, 128, 128, 8, 2, 4, 4), ("tile", 128, 256, 128, 8, 1, 8, 3),
                ("tile", 32, 64, 128, 8, 1, 4, 4)]
TMA_CONFIGS = [("tma", 128, 128, 128, 8, 1, 8, 3), ("tma", 128, 256, 64, 8, 1, 8, 4), ("tma", 64, 128, 128, 8, 1, 4, 4)]
ODD = [(1, 4096, 4096), (17, 1000, 4096), (300, 4096, 1040), (1024, 6144, 4096), (2, 96, 80)]


@cuda
@needs_fp8
@pytest.mark.parametrize("cfg", TILE_CONFIGS)
@pytest.mark.parametrize(("m", "n", "k"), ODD)
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_tile_cuda(monkeypatch, cfg, m, n, k, bias):
    monkeypatch.setattr(common, "POISON", True)
    check(m, n, k, cfg, bias=bias, device="cuda", seed=m + n)


@cuda
@needs_fp8
@needs_tma
@pytest.mark.parametrize("cfg", TMA_CONFIGS)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 4096, 4096), (300, 4096, 1040), (1024, 6144, 4096), (4100, 512, 2048)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_tma_cuda(monkeypatch, cfg, m, n, k, bias):
    monkeypatch.setattr(common, "POISON", True)
    check(m, n, k, cfg, bias=bias, device="cuda", seed=m + 2 * n)
