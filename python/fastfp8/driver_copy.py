"""Host-to-device copies queued through the CUDA driver itself (``cuMemcpyHtoDAsync``), for
the engine's consumer thread: it queues one copy per chunk (about 1,900 for a 16 GB
checkpoint), and ``Tensor.copy_`` adds its slicing, checks and dispatch to each (9 us a copy
alone on an H200 host, 20 - 40 us beside busy reader threads). The caller passes raw
addresses and has checked the bounds; the copy is ordered on ``stream`` like any other work
queued there, and torch's caching allocator sees nothing new (the memory is torch's)."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

#: (device address, host address, bytes, CUstream) -> None
Copier = Callable[[int, int, int, int], None]


@functools.cache
def h2d_copier() -> Copier | None:
    """The driver's asynchronous host-to-device copy as a Python function, or None where the
    driver library does not load (no CUDA driver: the caller copies with torch)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuMemcpyHtoDAsync_v2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fn.restype = ctypes.c_int

    def copy(dst: int, src: int, nbytes: int, stream: int) -> None:
        err = fn(dst, src, nbytes, stream)
        if err:
            raise RuntimeError(f"cuMemcpyHtoDAsync of {nbytes} bytes failed: CUresult {err}")

    return copy
