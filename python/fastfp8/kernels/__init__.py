"""fastfp8's compute kernels (Triton, each beside the torch reference it is tested against).

- :mod:`.act_quant`: fused per-token dynamic FP8 activation quantization (and its gated
  ``silu(gate) * up`` variant).
- :mod:`.gemv`: small-M (decode) W8A16 linear that streams the fp8 weight once.
- :mod:`.moe`: routing, tokens sorted per expert, grouped GEMMs (Triton fused-MoE kernel,
  ``torch._scaled_grouped_mm``) and the reference loop.

The submodules' names are not shadowed by functions (``fastfp8.kernels.act_quant`` is the
module). Triton is optional: without it every entry point falls back to torch.
"""

from .act_quant import SCALE_FLOOR, act_quant_reference, gated_act_quant_reference
from .gemv import fp8_gemv_reference
from .moe import fused_moe, moe_reference, route_llama4, route_softmax_topk

__all__ = [
    "SCALE_FLOOR",
    "act_quant_reference",
    "fp8_gemv_reference",
    "fused_moe",
    "gated_act_quant_reference",
    "moe_reference",
    "route_llama4",
    "route_softmax_topk",
]
