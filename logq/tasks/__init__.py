"""logq.tasks: submit functions, follow their state, get their results.

    from logq.tasks import App
    app = App("/var/lib/app/q")

    @app.task(retries=5, timeout=30, result_ttl=86400)
    def resize(path: str, width: int) -> dict: ...

    h = resize.delay("a.jpg", 200)
    h.status().state; h.result(timeout=5); h.cancel(); app.get(h.id)

Run them with ``logq worker module:app`` (or ``app.pool().run()``); operate
them with ``logq tasks PATH list|show|cancel|retry|purge``.  States and
their transitions: ``logq.tasks._state``; where each fact is kept and how
a state is derived from them: ``logq.tasks._store``.
Flow control (``concurrency``, ``rate_limit``, ``serialize_by``): where the
pool dispatches, ``logq.tasks._flow``; periodic tasks (``@app.periodic``),
each slot submitted once by a scheduler in every pool:
``logq.tasks._periodic``.
"""

from logq._errors import (ResultTooLargeError, SerializationError, TaskCancelled, TaskError,
                          TaskFailed, TaskNotFound, UnknownTaskError)
from logq.tasks._app import App, Task, TaskHandle, TaskOptions
from logq.tasks._records import JSON, PICKLE, Serializer
from logq.tasks._run import TaskContext, current
from logq.tasks._state import FINAL, STATES, InvalidTransition
from logq.tasks._store import TaskStatus

__all__ = [
    "App", "Task", "TaskHandle", "TaskOptions", "TaskStatus", "TaskContext", "current",
    "Serializer", "JSON", "PICKLE", "STATES", "FINAL",
    "TaskError", "TaskFailed", "TaskCancelled", "TaskNotFound", "UnknownTaskError",
    "SerializationError", "ResultTooLargeError", "InvalidTransition",
]
