"""Byte sizes written the way people write them: ``"1GiB"``, ``"512 MiB"``, ``2e9``.

What fastfp8 prints (summaries, tables, progress bars) is in binary units: KiB, MiB,
GiB, and GiB/s for rates (:func:`format_bytes`, :func:`format_rate`,
:data:`TQDM_BYTES`), so that a progress bar and the summary after it agree. Parsing
accepts both (``"5GB"`` is 5e9 bytes, ``"5GiB"`` 5 * 2**30).
"""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30,
}


def parse_bytes(value: int | float | str) -> int:
    """``"1GiB"`` -> 1073741824. Integers and floats are bytes."""
    if isinstance(value, bool):
        raise TypeError("a byte size cannot be a bool")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"not a byte size: {value!r} (try '1GiB' or '512MiB')")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 0:
        raise ValueError(f"a byte size cannot be negative: {value!r}")
    return n


def format_bytes(n: float) -> str:
    """1073741824 -> ``"1.00 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def format_rate(bytes_per_second: float) -> str:
    """2**30 bytes/s -> ``"1.00 GiB/s"`` (binary, like :func:`format_bytes`)."""
    return f"{bytes_per_second / 2**30:.2f} GiB/s"


#: ``tqdm(**TQDM_BYTES)``: a byte-counting progress bar in binary units (KiB, MiB, GiB),
#: the units of :func:`format_bytes`.
TQDM_BYTES: dict[str, object] = {"unit": "B", "unit_scale": True, "unit_divisor": 1024}
