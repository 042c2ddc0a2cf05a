"""Row-parallel slices on the Triton kernel: the per-row maxima are taken by torch, reduced
(all-reduced over the ranks in a tensor-parallel load), and handed to the kernel; the bytes
of each slice equal the matching slice of the whole row's quantization."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent(
    """
    import torch
    from fastfp8.quant import quantize_channelwise
    import fastfp8.quant.triton_kernel as tk
    from fastfp8.quant.reference import quantize_channelwise_reference as ref

    def same(a, b):
        return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))

    n = 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rounding in ("eager", "fp32"):
            for shape, parts in [((7, 33), 2), ((5, 3000), 3), ((1, 1), 1), ((3, 40, 70), 2), ((64, 20000), 2)]:
                g = torch.Generator().manual_seed(n)
                w = (torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 4).to(dtype)
                w = w.to(device)
                w[..., 0, :] = 0  # a zero row: eps scale
                qf, sf = ref(w, rounding=rounding)
                amax = w.abs().amax(dim=-1, keepdim=True)
                cols = shape[-1]
                bounds = [cols * i // parts for i in range(parts + 1)]
                for a, b in zip(bounds, bounds[1:]):
                    part = w[..., a:b].contiguous()
                    out = torch.full(part.shape, 0x7F, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)
                    scale_out = torch.full(sf.shape, float("nan"), dtype=dtype, device=device)
                    q, s = tk.quantize_channelwise_triton(part, out=out, scale_out=scale_out, rounding=rounding,
                                                          amax=amax)
                    assert same(q, qf[..., a:b]) and same(s, sf), (shape, dtype, rounding, a, b)
                    # the public entry point with a reduction: the same bytes
                    if device == "cuda":
                        def reduce(x, m=amax):
                            x.copy_(torch.maximum(x, m))
                        q2, s2 = quantize_channelwise(part, rounding=rounding, reduce_absmax=reduce)
                        assert same(q2, qf[..., a:b]) and same(s2, sf), (shape, dtype, rounding, "public")
                n += 1
    # the kernel's row maxima alone (what a tensor-parallel load all-reduces): exact fp32, a
    # NaN in a row gives a NaN with its sign clear, so the int32 patterns order like values
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for shape in [(7, 33), (5, 20000), (3, 40, 70), (1, 1), (0, 8)]:
            g = torch.Generator().manual_seed(n)
            w = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
            if w.shape[-2] >= 3:
                w[..., 0, :] = 0
                w[..., 1, -1] = float("-nan")
                w[..., 2, 0] = float("-inf")
            want = w.abs().amax(dim=-1, keepdim=True).float() if w.numel() else torch.zeros(shape[:-1] + (1,))
            got = tk.row_amax_triton(w)
            assert got.dtype == torch.float32 and got.shape == want.shape, (shape, dtype, got.shape)
            assert torch.equal(got.isnan().cpu(), want.isnan().cpu()), (shape, dtype)
            assert torch.equal(got.nan_to_num(7.0).cpu(), want.nan_to_num(7.0).cpu()), (shape, dtype)
            assert (got.view(torch.int32) >= 0).all(), (shape, dtype)  # sign bits clear, NaN included
            n += 1
    print("OK", n)
    """
)


def _run(env: dict[str, str]) -> None:
    # an installed fastfp8 (PYTHONPATH, e.g. the wheel on the GPU machine) wins over the source tree
    path = [str(REPO / "tests"), os.environ.get("PYTHONPATH", ""), str(REPO / "python")]
    env = dict(os.environ, **env, PYTHONPATH=os.pathsep.join(p for p in path if p))
    res = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert res.stdout.strip().startswith("OK")


def test_given_row_maxima_under_interpreter() -> None:
    pytest.importorskip("triton")
    _run({"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.cuda
def test_given_row_maxima_on_the_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _run({})
