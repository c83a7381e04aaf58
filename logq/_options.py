"""Queue options: every tunable of a queue with its default, and the checks
of the numbers that the queue, its consumers and the pool take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from logq import _format as F
from logq._index import RESERVE_BYTES

FSYNC_POLICIES = ("always", "batch", "never")
ON_FULL = ("block", "reject", "drop_oldest")
MAX_PRIORITY = 9              # put(priority=0..MAX_PRIORITY); higher is delivered first
MAX_KEY_BYTES = 256


@dataclass(frozen=True)
class Options:
    """Every tunable of a queue, with its default."""
    fsync: str = "batch"              # "always" | "batch" | "never"
    fsync_interval: float = 0.2       # batch: longest a put waits to be fsynced (s)
    fsync_bytes: int = 4 << 20        # batch: fsync once this much is unsynced
    segment_bytes: int = 64 << 20     # roll the active segment at this size
    preallocate_bytes: int = 4 << 20  # grow the active segment's file this much at a time, ahead
                                      # of the writer (allocated before use: a full disk is
                                      # DiskFullError at put, never SIGBUS); disk use follows
                                      # the contents within about this much per queue
    max_message_bytes: int = 16 << 20
    checkpoint_interval: float = 1.0  # most often the index checkpoint is committed (s)
    retention: float | None = None    # keep a settled segment at least this long (s)
    max_bytes: int | None = None      # disk budget: log, index and lease table together
    on_full: str = "block"            # at max_bytes: "block" | "reject" | "drop_oldest"
    put_timeout: float | None = None  # "block": longest a put waits for room (None: no limit)
    dedup_window: float = 600.0       # put(key=k) within this long of k's first put stores nothing (s)
    exclusive: bool = False           # maintenance: raise QueueInUseError if another process has
                                      # the queue open; others' opens wait until this one closes

    def __post_init__(self) -> None:
        if self.fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(map(repr, FSYNC_POLICIES))}, not {self.fsync!r}")
        _check_int("segment_bytes", self.segment_bytes, 4096, 1 << 40)
        _check_int("preallocate_bytes", self.preallocate_bytes, 4096, 1 << 40)
        _check_int("fsync_bytes", self.fsync_bytes, 1, 1 << 40)
        _check_int("max_message_bytes", self.max_message_bytes, 1, F.MAX_PAYLOAD)
        _check_seconds("fsync_interval", self.fsync_interval)
        _check_seconds("checkpoint_interval", self.checkpoint_interval)
        _check_seconds("dedup_window", self.dedup_window)
        if self.retention is not None:
            _check_seconds("retention", self.retention)
        if self.put_timeout is not None:
            _check_seconds("put_timeout", self.put_timeout)
        if self.on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {', '.join(map(repr, ON_FULL))}, not {self.on_full!r}")
        if self.max_bytes is not None:
            least = 2 * self.segment_bytes + 3 * RESERVE_BYTES
            _check_int("max_bytes", self.max_bytes, 1, 1 << 60)
            if self.max_bytes < least:
                raise ValueError(f"max_bytes={self.max_bytes} leaves no room to work: with "
                                 f"segment_bytes={self.segment_bytes} it must be at least {least} "
                                 "(two segments and the index reserves)")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, not {value}")


def _check_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not 0 < value < 1e9:
        raise ValueError(f"{name} must be a positive number of seconds, not {value}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not 0 <= value < 1e11:
        raise ValueError(f"{name} must be a finite, non-negative number of seconds, not {value!r}")

