"""Small filesystem helpers with the durability rules written once."""

from __future__ import annotations

import errno
import json
import os
import time
from typing import Any

from logq import _format as F
from logq._errors import DiskFullError


def fsync_dir(path: str) -> None:
    """Make the creation, removal or rename of entries in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def quarantine_path(qdir: str, name: str) -> str:
    """A new path in ``<qdir>/quarantine/`` for damaged bytes named after
    ``name``: they are kept aside, never deleted."""
    where = os.path.join(qdir, F.QUARANTINE_DIR)
    os.makedirs(where, exist_ok=True)
    return os.path.join(where, f"{name}.{time.time_ns()}")


def keep_aside(qdir: str, name: str, data: bytes) -> str:
    """Write ``data`` durably to a new file in quarantine; its path."""
    dest = quarantine_path(qdir, name)
    with open(dest, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(os.path.dirname(dest))
    return dest


def record_loss(qdir: str, entry: dict[str, Any]) -> None:
    """Append one range of offsets given up to ``quarantine/manifest``
    (durably, before the bytes it describes are zeroed): ``verify`` then
    reports the range as a known loss, not as damage."""
    where = os.path.join(qdir, F.QUARANTINE_DIR)
    os.makedirs(where, exist_ok=True)
    path = os.path.join(where, F.QUARANTINE_MANIFEST)
    line = json.dumps(dict(entry, time=time.time()), sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(where)


def losses(qdir: str) -> list[dict[str, Any]]:
    """The ranges recorded by ``record_loss`` (a torn last line is skipped)."""
    try:
        with open(os.path.join(qdir, F.QUARANTINE_DIR, F.QUARANTINE_MANIFEST), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def given_up(ranges: Any, first: int, end: int) -> bool:
    """Whether the offsets [first, end) all lie in ``ranges`` ((first, end)
    pairs given up earlier): ranges given up one after another (a torn batch
    and the damage before it) are met again as one."""
    at = first
    for a, b in sorted(r for r in ranges if None not in r):
        if a > at:
            break
        at = max(at, b)
        if at >= end:
            return True
    return first >= end


def _full(e: OSError, size: int, path: str) -> None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        raise DiskFullError(e.errno, f"no space to allocate {size} bytes for {path}: {e.strerror}") from e


def preallocate(fd: int, size: int, path: str, start: int = 0) -> None:
    """Reserve real blocks for bytes ``start``..``size`` of ``fd`` (extending
    the file if it is shorter) so that writes through a mapping cannot
    fault for lack of space: a full disk shows up here, as DiskFullError,
    instead of as SIGBUS later."""
    if size <= start:
        return
    try:
        os.posix_fallocate(fd, start, size - start)
    except OSError as e:
        _full(e, size, path)
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            # Filesystems without fallocate: write real zeros instead.
            _write_zeros(fd, start, size, path)
        else:
            raise


def extend(fd: int, size: int) -> bool:
    """Make the file at least ``size`` bytes long without allocating the
    new bytes (a hole: nothing may be written there before
    ``preallocate``); whether it is.  Best effort: where the file may not be
    that long (RLIMIT_FSIZE, a filesystem's limit) it stays as it is, and
    grows only as its bytes are allocated."""
    if os.fstat(fd).st_size >= size:
        return True
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        if e.errno in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EPERM, errno.EINVAL):
            return False
        raise
    return True


def _write_zeros(fd: int, start: int, size: int, path: str) -> None:
    chunk = bytes(1 << 20)
    have = start
    try:
        while have < size:
            n = os.pwrite(fd, chunk[: min(len(chunk), size - have)], have)
            have += n
    except OSError as e:
        _full(e, size, path)
        raise
