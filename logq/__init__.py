"""logq: an embedded, log-structured persistent queue.

    import logq
    with logq.open("/var/lib/app/queue", fsync="batch") as q:
        off = q.put(b"payload")
        q.read(off)

See README.md for the durability table and docs/ for the on-disk format.
"""

from logq._codec import native_enabled
from logq._errors import (CorruptionError, DiskFullError, FormatVersionError, LogqError,
                          MessageTooLargeError, NotAQueueError, OffsetError, QueueClosedError,
                          QueueFullError, RecordLostError)
from logq._queue import FSYNC_POLICIES, Options, Queue, open

__version__ = "0.1.0"

__all__ = [
    "open", "Queue", "Options", "FSYNC_POLICIES", "native_enabled",
    "LogqError", "CorruptionError", "RecordLostError", "FormatVersionError", "NotAQueueError",
    "OffsetError", "QueueClosedError", "QueueFullError", "DiskFullError", "MessageTooLargeError",
]
