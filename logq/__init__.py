"""logq: an embedded, log-structured persistent queue.

    import logq
    with logq.open("/var/lib/app/queue", fsync="batch") as q:
        off = q.put(b"payload")
        q.read(off)

See docs/durability.md for the durability table and docs/format.md for the on-disk format.
"""

from logq._codec import native_enabled
from logq._errors import (CorruptionError, DiskFullError, Empty, ForwardConfigError, ForwardError,
                          ForwarderBusyError, FormatVersionError, LogqError,
                          MessageTooLargeError, NotAQueueError, NotDeliveredError, OffsetError,
                          QueueClosedError, QueueFullError, QueueInUseError, RecordLostError)
from logq._options import FSYNC_POLICIES, MAX_PRIORITY, ON_FULL, Options
from logq._queue import Queue, open
from logq._consumer import Batch, Consumer, DeadLetter, GroupOptions, Message, reset_group
from logq._check import Report, repair, verify
from logq._pool import PoolOptions, PoolStats, WorkerPool
from logq._metrics import Collector as MetricsCollector, register as register_metrics

__version__ = "0.1.0"

__all__ = [
    "open", "Queue", "Options", "FSYNC_POLICIES", "ON_FULL", "MAX_PRIORITY", "native_enabled",
    "Consumer", "Batch", "GroupOptions", "reset_group", "verify", "repair", "Report", "Message", "DeadLetter", "WorkerPool", "PoolOptions", "PoolStats",
    "MetricsCollector", "register_metrics",
    "LogqError", "Empty", "NotDeliveredError", "CorruptionError", "RecordLostError", "FormatVersionError", "NotAQueueError",
    "OffsetError", "QueueClosedError", "QueueInUseError", "QueueFullError", "DiskFullError", "MessageTooLargeError",
    "Forwarder", "ForwardOptions", "ForwardError", "ForwardConfigError", "ForwarderBusyError",
]

_FORWARD = {"Forwarder", "ForwardOptions"}


def __getattr__(name: str) -> object:
    # Store and forward (logq.forward) is loaded on first use: it brings in
    # asyncio, which plain queue users need not pay for.  Its clients
    # (nats-py, paho-mqtt) are imported only when a forwarder connects.
    if name in _FORWARD:
        from logq import forward
        return getattr(forward, name)
    if name == "aio":
        # The asyncio adapter (logq.aio), on first use: ``import logq`` then
        # ``logq.aio.open(...)`` works; the core never imports it.
        import importlib
        return importlib.import_module("logq.aio")
    raise AttributeError(f"module 'logq' has no attribute {name!r}")
