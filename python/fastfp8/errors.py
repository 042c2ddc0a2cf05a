"""fastfp8's exceptions. The native core's errors arrive as these classes, converted once
in the bindings (``rust/python/src/lib.rs``), with messages that name the file and tensor."""

from __future__ import annotations


class Error(Exception):
    """Base class of every fastfp8 error."""


class CheckpointError(Error):
    """A checkpoint that cannot be resolved: no safetensors files, a bad or unsafe index,
    a missing shard, a tensor in two shards, an unknown tensor name."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path does not exist."""


class HeaderError(CheckpointError):
    """A safetensors header that breaks the format's rules (one message per rule)."""


class ReadError(Error, OSError):
    """A read that failed or came back short: a shard truncated, rewritten or unreadable."""


class BudgetError(Error):
    """A request that cannot be served within the memory budget."""


class CancelledError(Error):
    """The stream was stopped (by an error elsewhere, an interrupt, or ``close()``)."""


class ReleaseError(Error, ValueError):
    """A release of something that is not a delivered, unreleased chunk of the reader
    (``ChunkReader.release``): not delivered yet, released already, a wrong length, or an
    offset where no chunk starts. Nothing is freed. A ``ValueError`` too: it is the caller's
    argument that is wrong."""


class SlotReleasedError(Error):
    """A streamed tensor was used after its pinned slot was given back for reuse."""


class UnsupportedDtypeError(Error, TypeError):
    """A tensor's dtype has no torch equivalent here."""


class NonFiniteWeightError(Error, ValueError):
    """A weight to quantize holds NaN or Inf."""


def one_line(e: BaseException) -> str:
    """The error as one line, for the command line: an OSError's reason and file name (not
    its ``[Errno N]`` prefix), else its message, whitespace collapsed."""
    if isinstance(e, OSError) and e.strerror and not isinstance(e, Error):
        msg = e.strerror + (f": {e.filename}" if e.filename else "")
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


__all__ = [
    "BudgetError",
    "CancelledError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "Error",
    "HeaderError",
    "NonFiniteWeightError",
    "ReadError",
    "ReleaseError",
    "SlotReleasedError",
    "UnsupportedDtypeError",
]


class LayoutError(Error, ValueError):
    """The checkpoint's model layout is not one fastfp8 knows (an unknown architecture, or
    a tensor whose layout it cannot tell); the message says what to pass instead."""
