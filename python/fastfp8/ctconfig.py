"""The ``quantization_config`` of an FP8_DYNAMIC compressed-tensors checkpoint, built with
compressed-tensors' own classes so that it cannot drift from what llm-compressor writes.

llm-compressor saves a model through ``ModelCompressor.update_config``, which writes
``QuantizationConfig.model_dump()`` plus ``version`` (compressed-tensors' version),
``quant_method``, ``sparsity_config`` and ``transform_config``. :func:`quantization_config`
does the same from the ``FP8_DYNAMIC`` preset scheme (weights FP8 per output channel,
static; input activations FP8 per token, dynamic) targeting ``Linear``, with the group's
and the config's ``format`` set to ``float-quantized`` as ``ModelCompressor`` sets them
for a compressed model. ``tests/test_ctconfig.py`` compares it key by key with what
``ModelCompressor`` writes for a transformers model.

compressed-tensors is imported on the first call (it takes seconds), not at import.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["FORMAT", "SCHEME", "quantization_config"]

#: compressed-tensors' preset scheme fastfp8 produces, and the format of its checkpoints.
SCHEME = "FP8_DYNAMIC"
FORMAT = "float-quantized"


def quantization_config(ignore: Iterable[str]) -> dict:
    """The ``quantization_config`` dict for ``config.json`` of an FP8_DYNAMIC checkpoint
    whose modules ``ignore`` (exact names or ``re:<pattern>``) stay unquantized, as the
    installed compressed-tensors' ``ModelCompressor`` writes it.

    Raises:
        ImportError: compressed-tensors is not installed (a dependency of fastfp8).
    """
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme

    ignore = list(ignore)
    for entry in ignore:
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"ignore entries must be non-empty strings, got {entry!r}")
    scheme = preset_name_to_scheme(SCHEME, ["Linear"])
    scheme.format = FORMAT
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=FORMAT,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )
    # ModelCompressor.update_config: these four keys, then the config without quant_method
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **config.model_dump(mode="json", exclude={"quant_method"}),
    }
