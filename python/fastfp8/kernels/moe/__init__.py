"""FP8 mixture-of-experts: routing, tokens sorted per expert, grouped GEMMs.

One module per concern: :mod:`.routing` (routing, the reference loop, bf16 baselines),
:mod:`.sort` (tokens sorted per expert, combination), :mod:`.fused` (the Triton fused-MoE
kernels), :mod:`.grouped` (``torch._scaled_grouped_mm``), :mod:`.dispatch` (backend choice,
:func:`fused_moe`). This package re-exports their public names.

Expert weights (vLLM's fused-MoE layout, what :func:`fastfp8.load_quantized` produces for
Llama4 and :mod:`fastfp8.model` stacks for per-expert checkpoints):

- ``w13 [E, 2I, H]`` float8_e4m3fn, rows ``[0, I)`` gate, ``[I, 2I)`` up, ``w13_scale [E, 2I, 1]``,
- ``w2 [E, H, I]`` float8_e4m3fn, ``w2_scale [E, H, 1]``,

per output channel. Each token ``t`` goes to ``top_k`` experts ``e`` with weight ``w``:
``out[t] = sum_e w * W2_e(silu(G_e x) * U_e x)`` (or ``W2_e(...(w * x))`` with
``weights_on_input``, Llama4's way).

Backends of :func:`fused_moe` (``"auto"`` picks one per call from the device and the batch):

- ``"triton"``: fused Triton kernels over tokens sorted per expert and padded to the block
  size (vLLM's fused-MoE scheme). Stage 1 computes gate and up tiles together and writes
  ``silu(g) * u``; stage 2 multiplies by ``w2`` and the routing weight. ``a8=False``: the
  activations stay bf16 and the fp8 weights are widened in registers (W8A16, named only:
  slower than W8A8 on the H200 even at one token); ``a8=True`` (``"triton_a8"``, what
  ``"auto"`` takes up to :data:`MOE_SMALL_PAIRS_PER_EXPERT` pairs per expert): per-token fp8
  activations and fp8 tensor-core dots (W8A8, sm89+).
- ``"grouped"``: ``torch._scaled_grouped_mm`` (sm90, torch >= 2.8), W8A8 rowwise with fast
  accumulation; the activation between the GEMMs is fused with its quantization
  (:func:`fastfp8.kernels.act_quant.triton_act_quant` ``gated=True``).
- ``"reference"``: a loop over the experts that were hit, weights dequantized to the
  activation dtype (the CPU / pre-sm89 fallback, and the tests' oracle).

Nothing here synchronizes with the host on CUDA (buffers are sized by upper bounds), so
every backend can be captured in a CUDA graph.
"""

from __future__ import annotations

from .dispatch import MOE_SMALL_PAIRS_PER_EXPERT, fused_moe, pick_backend
from .fused import moe_config, moe_triton
from .grouped import grouped_supported, moe_grouped
from .routing import moe_bf16_grouped, moe_bf16_loop, moe_reference, route_llama4, route_softmax_topk
from .sort import align_tokens, align_tokens_torch, sort_tokens, sort_tokens_torch

__all__ = [
    "MOE_SMALL_PAIRS_PER_EXPERT",
    "align_tokens",
    "align_tokens_torch",
    "fused_moe",
    "grouped_supported",
    "moe_bf16_grouped",
    "moe_bf16_loop",
    "moe_config",
    "moe_grouped",
    "moe_reference",
    "moe_triton",
    "pick_backend",
    "route_llama4",
    "route_softmax_topk",
    "sort_tokens",
    "sort_tokens_torch",
]
