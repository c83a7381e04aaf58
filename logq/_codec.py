"""The record codec in use: ``_codec_native`` (C, via cffi) when it is built,
else the pure-Python reference ``_codec_py``; ``LOGQ_PURE=1`` forces the pure one.
Both have the same functions and give identical results (tests/test_codec.py)."""

from __future__ import annotations

import os

if os.environ.get("LOGQ_PURE") == "1":
    from logq import _codec_py as impl
else:
    try:
        from logq import _codec_native as impl  # type: ignore[no-redef]
    except ImportError:
        from logq import _codec_py as impl

NAME = impl.NAME
crc32c = impl.crc32c
handle = impl.handle
release = impl.release
encode = impl.encode
encode_batch = impl.encode_batch
Writer = impl.Writer
put = impl.put
prefault = impl.prefault
wait = impl.wait
wake = impl.wake
wait_synced = impl.wait_synced
wake_synced = impl.wake_synced
written = impl.written
wait_written = impl.wait_written
bump_written = impl.bump_written
scan = impl.scan
find_next = impl.find_next
seek = impl.seek
seek_unchecked = getattr(impl, "seek_unchecked", impl.seek)


def native_enabled() -> bool:
    """Whether the native codec is the one in use."""
    return impl.NAME == "native"


__all__ = ["impl", "native_enabled", "crc32c", "handle", "release", "encode",
           "encode_batch", "Writer", "put", "prefault", "wait", "wake", "wait_synced",
           "wake_synced", "written", "wait_written", "bump_written", "scan", "find_next", "seek",
           "seek_unchecked"]
