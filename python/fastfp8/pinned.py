"""Host staging memory: page-locked (pinned) when CUDA is present, plain otherwise.

Pinning costs hundreds of milliseconds per GiB, so buffers are pooled for the process:
``acquire`` hands out an idle buffer of at least the asked size if one exists, and
``release`` returns it for the next load. At most ``max_idle_bytes`` stay idle.
"""

from __future__ import annotations

import threading

import torch

_ALIGN = 2 << 20  # round sizes up to 2 MiB so that nearby budgets share buffers


def cuda_available() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # a broken driver is "no CUDA" for staging purposes
        return False


class BufferPool:
    """A thread-safe pool of uint8 host buffers."""

    def __init__(self, max_idle_bytes: int = 8 << 30) -> None:
        self._lock = threading.Lock()
        self._idle: list[torch.Tensor] = []
        self._max_idle = max_idle_bytes
        self.allocated_bytes = 0  # pinned/plain bytes this pool has allocated in total

    def acquire(self, nbytes: int, *, pin: bool | None = None) -> torch.Tensor:
        """A buffer of at least ``nbytes`` (exactly the rounded size when new)."""
        pin = cuda_available() if pin is None else pin
        size = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        with self._lock:
            fits = [i for i, b in enumerate(self._idle)
                    if b.numel() >= size and b.is_pinned() == pin]
            if fits:
                best = min(fits, key=lambda i: self._idle[i].numel())
                return self._idle.pop(best)
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        with self._lock:
            self.allocated_bytes += size
        return buf

    def release(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._idle.append(buf)
            self._idle.sort(key=lambda b: -b.numel())
            while sum(b.numel() for b in self._idle) > self._max_idle:
                self._idle.pop()

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._idle)

    def clear(self) -> None:
        """Frees every idle buffer (pinned memory goes back to the OS)."""
        with self._lock:
            self._idle.clear()


POOL = BufferPool()
