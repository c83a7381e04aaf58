"""The exception hierarchy: everything logq raises on purpose is a LogqError,
or a stdlib type where one fits better (TypeError for a payload that is not
bytes, ValueError for a bad option)."""

from __future__ import annotations

import queue


class LogqError(Exception):
    """Base class of logq's own errors."""


class QueueClosedError(LogqError, ValueError):
    """The queue was closed; open it again to use it."""


class NotAQueueError(LogqError):
    """The path exists but is not a logq queue directory."""


class QueueInUseError(LogqError):
    """The operation needs the queue to itself (``exclusive=True``: repair,
    group reset) and another process has it open.  ``pids`` lists them
    where the system says (Linux), else it is empty."""

    def __init__(self, message: str, pids: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.pids = pids


class FormatVersionError(LogqError):
    """The queue was written by an incompatible version of logq."""


class CorruptionError(LogqError):
    """Stored data failed validation.  ``path``, ``position`` and ``reason``
    say where and why; logq never returns the damaged bytes as data."""

    def __init__(self, message: str, *, path: str | None = None,
                 position: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.position = position
        self.reason = reason


class RecordLostError(CorruptionError, LookupError):
    """The record at ``offset`` was destroyed by damage to its segment; the
    records around it are still served."""

    def __init__(self, offset: int, message: str, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.offset = offset


class OffsetError(LogqError, IndexError):
    """The offset is not in the queue: below the first retained offset, or at
    or past the next offset."""


class QueueFullError(LogqError, queue.Full):
    """The queue cannot take the message now (its limits, or the disk)."""


class DiskFullError(QueueFullError, OSError):
    """The filesystem ran out of space (ENOSPC).  Nothing stored was lost;
    the put can be retried once space is freed."""


class MessageTooLargeError(LogqError, ValueError):
    """A payload is larger than the queue's ``max_message_bytes``."""


class NotDeliveredError(LogqError, ValueError):
    """An ack, nack or extend names a message that is not out for delivery
    to this consumer group: acked or nacked already, fetched by another
    group, or not a message at all."""


class Empty(LogqError, queue.Empty):
    """``Consumer.get`` found no message within its timeout."""


class ForwardError(LogqError):
    """The forwarder failed for a reason that retrying will not cure."""


class ForwardConfigError(ForwardError, ValueError):
    """A bad target or option, or an upstream configured so that the
    promises cannot hold (a stream that does not capture the subject, a
    duplicate window shorter than asked)."""


class ForwarderBusyError(ForwardError):
    """Another forwarder runs for this queue and group (one at a time keeps
    the order)."""


class TaskError(LogqError):
    """Base class of the tasks layer's errors (``logq.tasks``)."""


class TaskFailed(TaskError):
    """The task failed (out of attempts, or an error not in ``retry_on``).
    ``task_id``, and the remote exception's ``type`` (qualified name),
    ``message`` and ``traceback`` (text) say what happened there."""

    def __init__(self, task_id: str, type: str, message: str, traceback: str) -> None:
        super().__init__(f"task {task_id} failed: {type}: {message}")
        self.task_id = task_id
        self.type = type
        self.message = message
        self.traceback = traceback


class TaskCancelled(TaskError):
    """The task was cancelled before it finished: it has no result."""


class TaskNotFound(TaskError, LookupError):
    """No task has this id here: never submitted to this queue, lost with
    the unsynced tail of the log, or finished and expired (``result_ttl``)."""


class UnknownTaskError(TaskError, LookupError):
    """A task name that this app (or the worker running it) does not know."""


class SerializationError(TaskError, TypeError):
    """Arguments or a result the task's serializer cannot encode (or
    decode).  At submission nothing is stored; a result that cannot be
    encoded fails the task with this error."""


class ResultTooLargeError(TaskError, ValueError):
    """An encoded result is larger than the app's ``max_result_bytes``; the
    task fails with this error (its result is not stored)."""
