"""Which path :func:`fastfp8.ops.fp8_linear` takes for a shape: a selection table measured on
the GPU, stored in the package (``linear_table.json``), read once, never re-tuned at import.

Backends: ``"gemv"`` (W8A16 weight streaming, M <= :data:`GEMV_MAX_ROWS`, :mod:`.gemv`), ``"w16"``
(the W8A16 tiled GEMM: bf16/fp16 activations as they are, the fp8 weight widened in
registers, :func:`.gemm.w16_gemm`), ``"scaled_mm"`` (fused
per-token activation quantization + ``torch._scaled_mm`` rowwise), ``"tile"`` / ``"tma"``
(the same quantization + the Triton W8A8 GEMM of :mod:`.gemm`).

The JSON (written by ``benches/tune_linear.py --table``)::

    {"sm": [9, 0], "gpu": ..., "date": ..., "source": ...,
     "entries": {"N,K": [[m_max, backend, config], ...]},
     "generic": [[m_max, backend, config], ...]}

Rows of one shape are sorted by ``m_max``: a call with ``M`` rows takes the first row with
``M <= m_max`` (the last row also serves every larger ``M``). ``config`` is the backend's
launch configuration (``gemv``: ``[BLOCK_N, BLOCK_K, num_warps, num_stages(, SPLIT_K(, LOAD_STAGES))]``;
``w16``/``tile``/``tma``: a :data:`fastfp8.kernels.gemm.GemmConfig` list; ``null``:
the backend's own default).
Shapes not in ``entries`` use ``generic``. The table serves only GPUs of its compute
capability ``sm`` (tiles sized for Hopper's shared memory); elsewhere :data:`DEFAULT`
(GEMV up to 16 rows, ``_scaled_mm`` above: fastfp8's rule before the table) applies.

``FASTFP8_LINEAR_TABLE=/path/table.json`` reads another table (for the tuning run that
measures a new one, and its tests).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT", "TABLE_PATH", "load", "rows_for", "select", "table"]

TABLE_PATH = Path(__file__).with_name("linear_table.json")
#: the rule where no table applies
#: the most rows a ``"gemv"`` row may serve (the W8A16 kernel pads them to one ``tl.dot`` tile)
GEMV_MAX_ROWS = 128
DEFAULT: list[list[Any]] = [[16, "gemv", None], [None, "scaled_mm", None]]
BACKENDS = ("gemv", "w16", "scaled_mm", "tile", "tma")

_TABLE: dict[str, Any] | None = None
_CACHE: dict[tuple[int, int, int, tuple[int, int]], tuple[str, Any]] = {}


def load(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Reads and checks a table (default: ``FASTFP8_LINEAR_TABLE`` or the packaged one)."""
    p = Path(path or os.environ.get("FASTFP8_LINEAR_TABLE") or TABLE_PATH)
    t = json.loads(p.read_text())
    t.setdefault("entries", {})
    t.setdefault("generic", DEFAULT)
    for key, rows in [*t["entries"].items(), ("generic", t["generic"])]:
        _check_rows(key, rows, p)
    t["entries"] = {tuple(int(v) for v in key.split(",")): rows for key, rows in t["entries"].items()}
    t["sm"] = tuple(t.get("sm") or (0, 0))
    return t


def _check_rows(key, rows, path) -> None:
    if not rows or rows[-1][0] is not None:
        raise ValueError(f"{path}: rows of {key} must end with an open row (m_max null)")
    last = 0
    for m_max, backend, cfg in rows:
        if backend not in BACKENDS:
            raise ValueError(f"{path}: unknown backend {backend!r} for {key}")
        if m_max is not None:
            if m_max <= last:
                raise ValueError(f"{path}: rows of {key} are not sorted by m_max")
            last = m_max
        if backend == "gemv" and (m_max is None or m_max > GEMV_MAX_ROWS):
            raise ValueError(f"{path}: the GEMV serves at most {GEMV_MAX_ROWS} rows ({key})")
        if backend in ("w16", "tile", "tma") and cfg is not None and (len(cfg) != 8 or cfg[0] != backend):
            raise ValueError(f"{path}: a {backend} config is [{backend!r}, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, "
                             f"SPLIT_K, num_warps, num_stages], got {cfg} ({key})")
        if backend == "gemv" and cfg is not None and (len(cfg) not in (4, 5, 6) or min(cfg) < 1):
            raise ValueError(f"{path}: a GEMV config is [BLOCK_N, BLOCK_K, num_warps, num_stages(, SPLIT_K(, "
                             "LOAD_STAGES))] "
                             f"of positive integers, got {cfg} ({key})")


def table() -> dict[str, Any]:
    """The table in use (read on first use)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = load()
    return _TABLE


def use(path: str | os.PathLike[str] | None) -> None:
    """Switches to another table file (``None``: back to the default); clears the cache."""
    global _TABLE
    _TABLE = load(path) if path is not None else None
    _CACHE.clear()


def rows_for(n: int, k: int, sm: tuple[int, int]) -> list[list[Any]]:
    """The rows that serve an ``(N, K)`` weight on a GPU of capability ``sm``."""
    t = table()
    if tuple(sm) != t["sm"]:
        return DEFAULT
    return t["entries"].get((n, k), t["generic"])


def select(m: int, n: int, k: int, sm: tuple[int, int]) -> tuple[str, Any]:
    """``(backend, config)`` for ``M`` rows times an ``[N, K]`` weight on capability ``sm``."""
    key = (m, n, k, sm)
    hit = _CACHE.get(key)
    if hit is None:
        rows = rows_for(n, k, sm)
        row = next((r for r in rows if r[0] is None or m <= r[0]), rows[-1])
        hit = (row[1], tuple(row[2]) if row[2] is not None else None)
        if len(_CACHE) < 65536:
            _CACHE[key] = hit
    return hit
