"""fastfp8's compute kernels (Triton, each beside the torch reference it is tested against).

- :mod:`.common`: the FP8 dtype, the optional Triton import, the one GPU capability check.
- :mod:`.act_quant`: fused per-token dynamic FP8 activation quantization (and its gated
  ``silu(gate) * up`` variant).
- :mod:`.gemv`: small-M (decode) W8A16 linear that streams the fp8 weight once.
- :mod:`.gemm`: W8A8 FP8 GEMM with per-token and per-channel scales in the epilogue (a
  tiled kernel with split-K, a persistent TMA kernel for Hopper).
- :mod:`.linear_table`: which of those ``Fp8Linear`` uses per shape (a stored table).
- :mod:`.moe`: mixture of experts, one module per concern: routing and references, token
  sorting, the Triton fused-MoE kernels, the grouped-GEMM backend, dispatch.

The submodules' names are not shadowed by functions (``fastfp8.kernels.act_quant`` is the
module). Triton is optional: without it every entry point falls back to torch.
"""

from .act_quant import SCALE_FLOOR, act_quant_reference, gated_act_quant_reference
from .common import FP8
from .gemm import fp8_gemm_reference
from .gemv import fp8_gemv_reference
from .moe import fused_moe, moe_reference, route_llama4, route_softmax_topk

__all__ = [
    "FP8",
    "SCALE_FLOOR",
    "act_quant_reference",
    "fp8_gemm_reference",
    "fp8_gemv_reference",
    "fused_moe",
    "gated_act_quant_reference",
    "moe_reference",
    "route_llama4",
    "route_softmax_topk",
]
