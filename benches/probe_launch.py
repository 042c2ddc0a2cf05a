"""The host's cost of one eager call of each FP8 linear step (what an eager forward pays per
layer, e.g. the prompt's prefill in ``generate()``), against bf16 ``F.linear``: calls queued
back to back for a while, host microseconds per call (time to queue them) and wall
microseconds per call (time until the GPU is done). Where host >= wall, the calls are
bound by the host.

On the GPU machine (from the repo root)::

    python benches/probe_launch.py --out $OUT/probe_launch.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import fastfp8  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from fastfp8 import ops
from fastfp8.kernels import act_quant as aq
from fastfp8.kernels import gemm as gm
from fastfp8.kernels import gemv as gv
from fastfp8.kernels.common import tl, triton
from timing import per_call_us

if triton is not None:

    @triton.jit
    def _noop_kernel(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n), mask=i < n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="probe_launch.json")
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from fastfp8.quant import quantize_channelwise

    res = {"gpu": torch.cuda.get_device_name(), "triton": triton.__version__, "cases": {}}
    buf = torch.zeros(1024, device="cuda")
    res["cases"]["triton no-op kernel"] = per_call_us(lambda: _noop_kernel[(1,)](buf, 1024, BLOCK=1024), args.calls)
    res["cases"]["torch add_"] = per_call_us(lambda: buf.add_(1.0), args.calls)
    for n, k in ((4096, 4096), (14336, 4096)):
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64
        q, s = quantize_channelwise(wb, rounding="fp32")
        s = s.float()
        for m in (1, 16, 128, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = aq.triton_act_quant(x)
            tag = f"{n}x{k} M={m}"
            backend, cfg = ops.linear_choice(x, q)
            c = res["cases"]
            c[f"{tag} bf16 F.linear"] = per_call_us(lambda x=x, wb=wb: torch.nn.functional.linear(x, wb), args.calls)
            c[f"{tag} fp8_linear ({backend})"] = per_call_us(lambda x=x, q=q, s=s: ops.fp8_linear(x, q, s), args.calls)
            c[f"{tag} linear_choice"] = per_call_us(lambda x=x, q=q: ops.linear_choice(x, q), args.calls)
            c[f"{tag} triton_act_quant"] = per_call_us(lambda x=x: aq.triton_act_quant(x), args.calls)
            if backend in ("tile", "tma"):
                c[f"{tag} fp8_gemm ({backend})"] = per_call_us(
                    lambda xq=xq, xs=xs, q=q, s=s, cfg=cfg: gm.fp8_gemm(xq, xs, q, s, config=cfg), args.calls)
            if backend == "scaled_mm":
                c[f"{tag} _scaled_mm"] = per_call_us(
                    lambda xq=xq, xs=xs, q=q, s=s, n=n: torch._scaled_mm(
                        xq, q.t(), scale_a=xs, scale_b=s.reshape(1, n), out_dtype=torch.bfloat16,
                        use_fast_accum=True), args.calls)
            if m <= 16:
                c[f"{tag} fp8_gemv"] = per_call_us(lambda x=x, q=q, s=s: gv.fp8_gemv(x, q, s), args.calls)
    for name, (host, wall) in res["cases"].items():
        print(f"{name:48s} host {host:8.1f} us  wall {wall:8.1f} us", flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
