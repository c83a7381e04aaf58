"""Small filesystem helpers with the durability rules written once."""

from __future__ import annotations

import errno
import os
import time

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


def preallocate(fd: int, size: int, path: str) -> None:
    """Reserve ``size`` bytes of real blocks for ``fd`` so that writes through
    a mapping cannot fault for lack of space: a full disk shows up here, as
    DiskFullError, instead of as SIGBUS later."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskFullError(e.errno, f"no space to allocate {size} bytes for {path}: {e.strerror}") from e
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            # Filesystems without fallocate: extend with real zeros instead.
            _write_zeros(fd, size, path)
        else:
            raise


def _write_zeros(fd: int, size: int, path: str) -> None:
    have = os.fstat(fd).st_size
    chunk = bytes(1 << 20)
    try:
        while have < size:
            n = os.pwrite(fd, chunk[: min(len(chunk), size - have)], have)
            have += n
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskFullError(e.errno, f"no space to allocate {size} bytes for {path}: {e.strerror}") from e
        raise
