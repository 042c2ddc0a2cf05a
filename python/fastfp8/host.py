"""What the host machine is: its last-level cache and cores, for the loader's defaults.

A staging ring that fits in the last-level cache lets the GPU's DMA read the bytes the reader
threads just wrote from the cache instead of DRAM: on a 16-core H200 machine (300 MiB L3) a
128 MiB ring with 8 MiB chunks loaded at 43 - 45 GB/s where a 2 GiB ring gave 33 - 38
(``../shared/FACTS.md``). The defaults therefore follow the cache, not a fixed size.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

MiB = 1 << 20


def _parse_cache_size(text: str) -> int | None:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text.rstrip("KMG")
    return int(digits) * mult if digits.isdigit() else None


@functools.cache
def last_level_cache_bytes(cpu_dir: str = "/sys/devices/system/cpu") -> int | None:
    """Bytes of the largest-level data/unified cache that CPU 0 sees (one socket's L3 on
    x86), from sysfs; None where sysfs does not say."""
    best: tuple[int, int] | None = None
    for index in sorted(Path(cpu_dir, "cpu0", "cache").glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _parse_cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if size and (best is None or level > best[0] or (level == best[0] and size > best[1])):
            best = (level, size)
    return best[1] if best else None


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_staging(llc: int | None) -> tuple[int, int]:
    """``(memory_budget, chunk_bytes)`` for a last-level cache of ``llc`` bytes: the largest
    power of two at most half the cache, between 64 MiB and 512 MiB (256 MiB when the
    cache is unknown), cut into 16 chunks of 1 - 64 MiB."""
    if llc:
        budget = 1 << max(0, (llc // 2).bit_length() - 1)
        budget = min(max(budget, 64 * MiB), 512 * MiB)
    else:
        budget = 256 * MiB
    chunk = min(max(budget // 16, 1 * MiB), 64 * MiB)
    return budget, chunk
