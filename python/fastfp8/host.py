"""What the host machine is: its last-level cache, cores and NUMA nodes, for the loader's
defaults.

A staging ring that fits in the last-level cache lets the GPU's DMA read the bytes the reader
threads just wrote from the cache instead of DRAM: on a 16-core H200 machine (300 MiB L3) a
128 MiB ring with 8 MiB chunks loaded at 43 - 45 GB/s where a 2 GiB ring gave 33 - 38
(``../shared/FACTS.md``). The defaults therefore follow the cache, not a fixed size.

On a host of several NUMA nodes (a two-socket server of eight GPUs), a GPU's DMA reads
host memory fastest from its own node. So a CUDA load starts its reader threads, and
allocates its staging ring, on the CPUs of the GPU's node (:func:`reader_cpus`,
:func:`on_cpus`), among those the process may use; the threads' default count follows
those CPUs. Where the process is already confined to one node (``numactl``, a container),
or the host has one node, nothing changes. ``FASTFP8_NUMA=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
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


def topology(cpu_dir: str = "/sys/devices/system/cpu", node_dir: str = "/sys/devices/system/node") -> dict:
    """What this process may run on, from sysfs: ``cpus`` (logical), ``cores`` (physical:
    distinct package and core ids among them), ``sockets``, ``numa_nodes`` (of the host),
    ``llc_bytes``. A count sysfs does not give is None. (For benchmark reports: on a host
    with two threads per core, 16 CPUs are 8 cores, which is what copying threads scale by.)"""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    packages: set[str] = set()
    for c in cpus:
        t = Path(cpu_dir, f"cpu{c}", "topology")
        try:
            pkg = (t / "physical_package_id").read_text().strip()
            core = (t / "core_id").read_text().strip()
        except OSError:
            cores.clear()
            packages.clear()
            break
        packages.add(pkg)
        cores.add((pkg, core))
    nodes = [d for d in Path(node_dir).glob("node[0-9]*") if d.is_dir()]
    return {"cpus": len(cpus), "cores": len(cores) or None, "sockets": len(packages) or None,
            "numa_nodes": len(nodes) or None, "llc_bytes": last_level_cache_bytes(cpu_dir)}


def default_staging(llc: int | None, *, fp8: bool = False) -> tuple[int, int]:
    """``(memory_budget, chunk_bytes)`` for a last-level cache of ``llc`` bytes: the largest
    power of two at most half the cache, between 64 MiB and 512 MiB (256 MiB when the
    cache is unknown), cut into 16 chunks of 1 - 64 MiB. With ``fp8`` (the reader threads
    quantize every weight on the way: the ring holds e4m3 bytes, half the bytes they read)
    half that, at least 64 MiB: the same span of the checkpoint in flight, and the cache
    left to the pages they read. On two H200 machines (a 300 MiB L3 shared with other
    guests) 64 MiB rings of 4 MiB chunks loaded 47.2 and 51.4 GB/s against 42.2 and 43.0 with
    128 MiB, ahead in each of nine rounds (benches/NOTES.md, session 18)."""
    if llc:
        budget = 1 << max(0, (llc // 2).bit_length() - 1)
        budget = min(max(budget, 64 * MiB), 512 * MiB)
    else:
        budget = 256 * MiB
    if fp8:
        budget = max(budget // 2, 64 * MiB)
    chunk = min(max(budget // 16, 1 * MiB), 64 * MiB)
    return budget, chunk


def parse_cpulist(text: str) -> set[int]:
    """The CPUs of a sysfs cpulist (``"0-15,32-47"``); ValueError if malformed."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi or lo)
        if a < 0 or b < a:
            raise ValueError(f"bad cpulist range {part!r}")
        cpus.update(range(a, b + 1))
    return cpus


def node_cpus(node: int, node_dir: str = "/sys/devices/system/node") -> set[int] | None:
    """The CPUs of NUMA node ``node``, from sysfs; None where sysfs does not say."""
    try:
        return parse_cpulist(Path(node_dir, f"node{node}", "cpulist").read_text()) or None
    except (OSError, ValueError):
        return None


def gpu_numa_node(device, pci_dir: str = "/sys/bus/pci/devices") -> int | None:
    """The NUMA node of CUDA ``device``'s PCI function, from sysfs; None where unknown
    (no such attribute, a host of one node: ``-1``)."""
    import torch

    try:
        props = torch.cuda.get_device_properties(device)
        bdf = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        node = int(Path(pci_dir, bdf, "numa_node").read_text())
    except (AttributeError, OSError, RuntimeError, ValueError, AssertionError):
        return None
    return node if node >= 0 else None


#: fewer of the GPU node's CPUs than this (among the process's) and the readers stay where
#: the process runs: a few local cores read slower than many remote ones
MIN_NODE_CPUS = 4


def reader_cpus(device) -> set[int] | None:
    """The CPUs a load onto ``device`` should read on: those of the GPU's NUMA node that
    this process may use; None (leave the threads where they are) for a non-CUDA device,
    an unknown node, a process already inside the node, fewer than :data:`MIN_NODE_CPUS`
    of the node's CPUs allowed, or ``FASTFP8_NUMA=0``."""
    if getattr(device, "type", None) != "cuda" or os.environ.get("FASTFP8_NUMA", "").strip() in ("0", "off"):
        return None
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None
    node = gpu_numa_node(device)
    cpus = node_cpus(node) if node is not None else None
    if not cpus:
        return None
    cpus &= allowed
    if len(cpus) < MIN_NODE_CPUS or cpus == allowed:  # too few to read on, or nothing to change
        return None
    return cpus


@contextlib.contextmanager
def on_cpus(cpus: set[int] | None) -> Iterator[None]:
    """Runs the block with the calling thread confined to ``cpus`` (None: unchanged), then
    restores its CPUs. Threads started inside (the reader's) keep ``cpus``, and memory the
    block first touches (the pinned staging ring) comes from their node. A mask the
    kernel refuses leaves the thread as it was."""
    before = None
    if cpus:
        try:
            before = os.sched_getaffinity(0)
            os.sched_setaffinity(0, cpus)
        except (AttributeError, OSError):
            before = None
    try:
        yield
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)
