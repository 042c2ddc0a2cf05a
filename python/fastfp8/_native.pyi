"""Type stubs of the private native module ``fastfp8._native`` (``rust/python/src/lib.rs``),
checked against the built module by ``python -m mypy.stubtest fastfp8._native``."""

from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, final

__all__ = [
    "MAX_HEADER_LEN",
    "Checkpoint",
    "Reader",
    "ReaderStats",
    "ShardInfo",
    "TensorEntry",
    "default_thread_count",
    "error_classes",
    "quantize_rows",
]

MAX_HEADER_LEN: int

_Segments = Sequence[tuple[int, ...]]
#: ``(name, segments)``, ``(name, segments, (dtype, cols, rounding))`` or ``(name, segments,
#: (dtype, cols, rounding), amax)``
_Item = (
    tuple[str, _Segments]
    | tuple[str, _Segments, tuple[str, int, str]]
    | tuple[str, _Segments, tuple[str, int, str], Sequence[float]]
)

def default_thread_count() -> int: ...
def error_classes() -> list[tuple[str, str]]: ...
def quantize_rows(src: bytes, dtype: str, cols: int, rounding: str = "fp32") -> tuple[bytes, bytes]: ...

@final
class ShardInfo:
    @property
    def path(self) -> Path: ...
    @property
    def size(self) -> int: ...
    @property
    def data_start(self) -> int: ...

@final
class TensorEntry:
    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def shard(self) -> int: ...
    @property
    def begin(self) -> int: ...
    @property
    def end(self) -> int: ...

@final
class ReaderStats:
    @property
    def budget(self) -> int: ...
    @property
    def peak_in_flight(self) -> int: ...
    @property
    def bytes_read(self) -> int: ...
    @property
    def threads(self) -> int: ...

@final
class Checkpoint:
    def __new__(cls, path: str | PathLike[str]) -> Checkpoint: ...
    @property
    def root(self) -> Path: ...
    @property
    def index(self) -> Path | None: ...
    def shards(self) -> list[ShardInfo]: ...
    def tensors(self) -> list[TensorEntry]: ...
    def fileno(self, shard: int) -> int: ...
    def metadata(self, shard: int) -> dict[str, str] | None: ...
    def check_unchanged(self, shard: int) -> None: ...
    def row_amax(
        self, items: Sequence[_Item], *, threads: int | None = None, method: str = "mmap"
    ) -> bytes: ...

@final
class Reader:
    def __new__(
        cls,
        checkpoint: Checkpoint,
        items: Sequence[_Item],
        buffer: Any,
        ptr: int,
        nbytes: int,
        *,
        chunk_bytes: int | None = None,
        threads: int | None = None,
        piece_bytes: int = ...,  # 4 MiB
        method: str = "mmap",
    ) -> Reader: ...
    def next(self) -> tuple[int, int, int, int] | None: ...
    def release(self, buf_offset: int, len: int) -> None: ...
    def close(self) -> None: ...
    def cancel(self) -> None: ...
    def live_threads(self) -> int: ...
    def stats(self) -> ReaderStats: ...
