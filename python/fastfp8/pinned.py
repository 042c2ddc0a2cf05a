"""Host staging memory: page-locked (pinned) when CUDA is present, plain otherwise.

Pinning costs hundreds of milliseconds per GiB, but pinned memory held idle is memory no one
else can use (a vLLM worker would keep its staging buffer for the server's life). So by
default a released buffer is freed at once: nothing stays pinned after a load returns.
Back-to-back loads that want to reuse one buffer say so::

    with POOL.retain():          # or fastfp8.pinned.retain()
        load_quantized(a)        # allocates (and pins) its staging buffer
        load_quantized(b)        # reuses it
    # idle buffers are freed here

Inside a ``retain()`` block (process-wide, nestable: the outermost exit frees), ``release``
keeps the buffer idle and ``acquire`` hands out an idle buffer of at least the asked size
if one exists; at most ``max_idle_bytes`` stay idle. A load that acquires several buffers
one after another should run inside ``retain()`` too.

Concurrent loads each hold their own buffer, so without a limit the process holds the sum
of their budgets. A process-wide limit bounds that sum: ``POOL.set_limit("8GiB")`` (or the
environment variable ``FASTFP8_PINNED_LIMIT=8GiB``) makes ``acquire`` evict idle buffers,
then wait for loads to give theirs back, when a new buffer would take the pool's live bytes
(idle plus handed out, counted until the memory is actually freed) past the limit. A wait
longer than the timeout (``FASTFP8_PINNED_TIMEOUT`` seconds, default 600) or a request larger
than the limit itself raises :class:`~fastfp8.errors.BudgetError`.

``release`` and the bookkeeping of freed buffers may run from a garbage collector's
finalizer at any point, on any thread, even inside the pool's own critical sections:
``release`` only queues the buffer there (the next holder of the lock takes it in), and a
freed buffer's reservation is dropped with one atomic ``dict.pop``, called by the buffer's
weak reference itself (no Python code that an interrupt could cut short). The lock is only taken
with ``with``, so an interrupt (KeyboardInterrupt) anywhere leaves it released and the
pool consistent.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import mmap
import os
import threading
import time
import weakref

import torch

from .errors import BudgetError
from .units import format_bytes, parse_bytes

_ALIGN = 2 << 20  # round sizes up to 2 MiB so that nearby budgets share buffers
_WAIT_SLICE = 0.1  # waits wake at least this often (to pick up frees queued from finalizers)


def cuda_available() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # a broken driver is "no CUDA" for staging purposes
        return False


def _env_limit() -> int | None:
    v = os.environ.get("FASTFP8_PINNED_LIMIT", "").strip()
    return parse_bytes(v) if v else None


def _env_timeout() -> float:
    v = os.environ.get("FASTFP8_PINNED_TIMEOUT", "").strip()
    return float(v) if v else 600.0


class BufferPool:
    """A thread-safe pool of uint8 host buffers, with an optional limit on their total."""

    def __init__(self, max_idle_bytes: int = 8 << 30, max_total_bytes: int | str | None = None,
                 timeout: float = 600.0) -> None:
        # Re-entrant, because finalizers (ChunkReader.__del__ -> release) may run on a thread
        # inside one of our own sections; _poke then leaves its work to that section.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._idle: list[torch.Tensor] = []
        self._max_idle = max_idle_bytes
        self._limit = None if max_total_bytes is None else parse_bytes(max_total_bytes)
        self._timeout = timeout
        # Buffers given back by release(), taken into the idle list under the lock.
        self._returned: collections.deque[torch.Tensor] = collections.deque()
        # key -> bytes, for each of this pool's buffers whose memory is not yet freed (idle
        # or handed out; key: a weak reference to its storage), and for reservations being
        # allocated (key: an int token). When a buffer's memory is freed, its weak
        # reference's callback, ``dict.pop`` itself, removes the entry: C code only, so
        # atomic, safe from any thread at any time, and out of reach of a KeyboardInterrupt
        # (which Python code, a ``weakref.finalize`` among it, may take in its middle and
        # drop, leaving the buffer counted forever).
        self._alive: dict[object, int] = {}
        self._tokens = itertools.count()
        self._waiting = 0
        self._retain = 0  # depth of retain() blocks: > 0 keeps released buffers idle
        self.allocated_bytes = 0  # pinned/plain bytes this pool has allocated in total
        self.peak_live_bytes = 0

    # --- configuration and figures -------------------------------------------------------

    def set_limit(self, max_total_bytes: int | str | None, *, timeout: float | None = None) -> None:
        """Limits the bytes of all live buffers (idle and in use) to ``max_total_bytes``
        (``None``: no limit); ``timeout``: how long ``acquire`` waits for room (seconds)."""
        with self._lock:
            self._limit = None if max_total_bytes is None else parse_bytes(max_total_bytes)
            if timeout is not None:
                self._timeout = timeout
            self._cond.notify_all()

    @property
    def limit(self) -> int | None:
        return self._limit

    def live_bytes(self) -> int:
        """Bytes of this pool's buffers that exist now: idle, or handed out and not freed."""
        with self._lock:
            self._drain()
            return self._live()

    def idle_bytes(self) -> int:
        with self._lock:
            self._drain()
            return sum(b.numel() for b in self._idle)

    def stats(self) -> dict[str, int | None]:
        """``live``, ``idle``, ``in_use`` (live minus idle), ``peak_live``, ``allocated``
        (in total, ever), ``limit`` (None: none), ``waiting`` (acquires waiting for room)."""
        with self._lock:
            self._drain()
            idle = sum(b.numel() for b in self._idle)
            live = self._live()
            return {"live": live, "idle": idle, "in_use": live - idle, "peak_live": self.peak_live_bytes,
                    "allocated": self.allocated_bytes, "limit": self._limit, "waiting": self._waiting}

    def reset_peak(self) -> None:
        with self._lock:
            self._drain()
            self.peak_live_bytes = self._live()

    # --- acquire and release ---------------------------------------------------------------

    def acquire(self, nbytes: int, *, pin: bool | None = None, timeout: float | None = None) -> torch.Tensor:
        """A buffer of at least ``nbytes`` (exactly the rounded size when new). With a limit
        set, waits up to ``timeout`` seconds (default: the pool's) for room."""
        pin = cuda_available() if pin is None else pin
        size = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        token = next(self._tokens)
        try:
            with self._lock:
                idle = self._idle_or_reserve(token, size, pin, timeout)
                if idle is not None:
                    return idle
            buf = _pinned(size) if pin else torch.empty(size, dtype=torch.uint8)
            # The reservation ends when the memory is freed: when the storage dies, not when
            # this tensor object does (views of it keep the memory alive). Its entry moves
            # from the token to the storage's weak reference (an interrupt between the two
            # lines leaves both, and the handler below drops the token's).
            ref = weakref.ref(buf.untyped_storage(), self._alive.pop)
            self._alive[ref] = size
            self._alive.pop(token, None)
        except BaseException:
            self._alive.pop(token, None)  # idempotent: the entry may have moved to the weak reference
            raise
        with self._lock:
            self.allocated_bytes += size
        return buf

    def release(self, buf: torch.Tensor) -> None:
        """Gives ``buf`` back; once, and only when nothing uses it any more (a second release
        while it is idle is ignored). Inside :meth:`retain` it stays idle for reuse, else the
        pool drops it (its memory is freed once no view of it remains). Safe from finalizers
        (``__del__``)."""
        self._returned.append(buf)
        self._poke()

    @contextlib.contextmanager
    def retain(self):
        """Keeps released buffers idle for reuse until the outermost ``retain()`` block ends,
        which frees them. Process-wide: loads on other threads meanwhile reuse them too."""
        with self._lock:
            self._retain += 1
        try:
            yield self
        finally:
            with self._lock:
                self._retain -= 1
                self._drain()
                if self._retain == 0:
                    self._idle.clear()

    @property
    def retaining(self) -> bool:
        """Whether a :meth:`retain` block is active."""
        return self._retain > 0

    def clear(self) -> None:
        """Frees every idle buffer (pinned memory goes back to the OS)."""
        with self._lock:
            self._drain()
            self._idle.clear()

    # --- internals (those named "lock held" run with self._lock held) ----------------------

    def _idle_or_reserve(self, token: int, size: int, pin: bool, timeout: float | None) -> torch.Tensor | None:
        """An idle buffer that fits, or None once ``size`` live bytes are reserved under
        ``token`` within the limit, waiting for room if need be (lock held)."""
        deadline: float | None = None
        counted = False  # counted in self._waiting from the first wait until this returns
        try:
            while True:
                self._drain()
                fits = [i for i, b in enumerate(self._idle) if b.numel() >= size and b.is_pinned() == pin]
                if fits:
                    return self._idle.pop(min(fits, key=lambda i: self._idle[i].numel()))
                limit = self._limit
                live = self._live()
                if limit is None or live + size <= limit:
                    self._alive[token] = size
                    if live + size > self.peak_live_bytes:
                        self.peak_live_bytes = live + size
                    return None
                if size > limit:
                    raise BudgetError(
                        f"a host staging buffer of {format_bytes(size)} is larger than the process-wide "
                        f"limit of {format_bytes(limit)} (FASTFP8_PINNED_LIMIT / fastfp8.pinned.POOL.set_limit)")
                if self._idle:  # idle buffers that cannot serve this request make way for it
                    self._idle.sort(key=lambda b: b.numel())
                    self._idle.pop()  # freed now, unless something else still holds it
                    continue
                now = time.monotonic()
                if deadline is None:
                    deadline = now + (self._timeout if timeout is None else timeout)
                if now >= deadline:
                    raise BudgetError(
                        f"timed out waiting for {format_bytes(size)} of host staging memory: "
                        f"{format_bytes(live)} of the process-wide limit of {format_bytes(limit)} "
                        "are held by other loads")
                if not counted:
                    counted = True
                    self._waiting += 1
                self._cond.wait(min(_WAIT_SLICE, deadline - now))
        finally:
            if counted:
                self._waiting -= 1

    def _live(self) -> int:
        return sum(list(self._alive.values()))

    def _poke(self) -> None:
        """Takes released buffers in now, unless this thread is inside a section already (a
        finalizer run in the middle of one): that section's owner, or the next, does it."""
        if self._lock._is_owned():  # type: ignore[attr-defined]
            return
        with self._lock:
            self._drain()

    def _drain(self) -> None:
        """Moves released buffers to the idle list, trimming it, or drops them outside
        :meth:`retain` unless an acquire is waiting for room (lock held)."""
        while self._returned:
            buf = self._returned.popleft()
            if self._retain == 0 and not self._waiting:
                pass  # dropped: freed once no view of it remains (its finalizer then runs)
            elif not any(b is buf for b in self._idle):  # a second release is a no-op
                # (kept idle inside retain(), or for an acquire waiting for room meanwhile)
                self._idle.append(buf)
                self._idle.sort(key=lambda b: -b.numel())
                while sum(b.numel() for b in self._idle) > self._max_idle:
                    self._idle.pop()  # freed: its finalizer drops its reservation
            if self._waiting:
                self._cond.notify_all()
        if self._retain == 0 and not self._waiting and self._idle:
            self._idle.clear()  # kept for a waiter that has since been served or gave up


#: how :func:`_pinned` page-locks memory (``FASTFP8_PINNED``): ``"thp"`` (the default)
#: anonymous memory on transparent huge pages registered with CUDA, ``"cuda"`` torch's
#: pinned allocation (``cudaHostAlloc``'s 4 KiB pages)
PINNED_WAYS = ("thp", "cuda")


def _pinned(size: int) -> torch.Tensor:
    """``size`` bytes of page-locked memory: on transparent huge pages registered with CUDA
    (:func:`_huge_registered`), or torch's pinned allocation with ``FASTFP8_PINNED=cuda`` and
    where registering fails. A warm load's setup is mostly its ring's pinning: on an H200
    machine 64 MiB took 8.6 ms this way against 35 ms from torch's allocator (128 MiB: 13
    against 57), and the GPU read both at the same 55 GB/s (``benches/probe_pin.py``); the
    load moved 49.1 against 47.7 GB/s (medians of 5, round robin, ``benches/NOTES.md``,
    session 19). Torch's allocator keeps a freed block pinned for the process's next
    allocation, so a second load in a process paid nothing there; here a new load registers
    its ring again (inside :meth:`BufferPool.retain` it reuses it)."""
    way = os.environ.get("FASTFP8_PINNED", "thp")
    if way not in PINNED_WAYS:
        raise ValueError(f"FASTFP8_PINNED must be one of {', '.join(PINNED_WAYS)}, got {way!r}")
    if way == "thp":
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            return _huge_registered(size)
    return torch.empty(size, dtype=torch.uint8, pin_memory=True)


def _huge_registered(size: int) -> torch.Tensor:
    """Anonymous memory backed by transparent huge pages (where the kernel can), faulted in,
    then page-locked with cudaHostRegister; unregistered when its storage dies (the last
    view of it, not the first tensor object), the mapping kept until then."""
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    buf = torch.frombuffer(m, dtype=torch.uint8)
    buf.fill_(0)  # fault the pages in, as huge pages where the kernel can
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(buf.data_ptr(), size, 0)
    if int(err) != 0:
        _clear_cuda_error()
        torch.cuda.check_error(err)
    weakref.finalize(buf.untyped_storage(), _unregister, cudart, buf.data_ptr(), m)
    return buf


#: mappings whose unregistration failed: kept mapped for the process's life, so that no new
#: mapping at those addresses meets a registration that is still there
_STILL_REGISTERED: list[mmap.mmap] = []


def _unregister(cudart, ptr: int, mapping: mmap.mmap) -> None:
    """Unpins ``ptr``; ``mapping`` keeps the memory mapped until this ran (and for good if
    unpinning fails: a new mapping at a still-registered address could not be registered)."""
    if int(cudart.cudaHostUnregister(ptr)) != 0:
        _clear_cuda_error()
        _STILL_REGISTERED.append(mapping)


def _clear_cuda_error() -> None:
    """Resets the CUDA runtime's last error of this thread (``cudaGetLastError``). A runtime
    call that fails leaves it set, and torch's check after its next kernel launch raises it
    there, in an unrelated op: a failed registration, which falls back to torch's pinned
    memory, once surfaced so in a later test's ``torch.equal`` ("part or all of the requested
    memory range is already mapped"). Torch's cudart bindings lack the call; the runtime
    library torch loaded is taken by its soname (``RTLD_NOLOAD``: nothing is loaded here)."""
    major = (torch.version.cuda or "").split(".")[0]
    if not major:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(f"libcudart.so.{major}", mode=os.RTLD_NOLOAD | os.RTLD_LAZY).cudaGetLastError()


POOL = BufferPool(max_total_bytes=_env_limit(), timeout=_env_timeout())


def retain():
    """``POOL.retain()``: keep pinned staging buffers for reuse across the loads in the block."""
    return POOL.retain()
