"""A Celery result backend on logq's LMDB index:
``Celery(..., backend="logq:///var/lib/app/q")``.

Results live in ``<root>/celery-results.kv/`` (a logq queue whose index
holds the table; ``logq._named.KV``), so one URL serves as both broker and
backend.  Promises:

* a stored result is durable when ``store_result`` returns (one fsynced
  LMDB transaction) and seen at once by every process;
* results expire after ``result_expires`` (1 day by default; 0/None: never),
  deleted by later writes -- no ``celery.backend_cleanup`` beat task needed;
* chords join without polling: each header task's completion increments
  the chord's counter atomically (across processes), and the task that
  brings it to the chord's size publishes the body, which then reads every
  header result in one transaction (``supports_native_join``).  The
  counter counts each header task once, even if it ran twice (a task
  redelivered after its worker died): the chord body is never started
  before every header task finished, and never twice by a redelivery.
  No ``celery.chord_unlock`` task is ever scheduled.

Waiting for a result (``AsyncResult.get``) sleeps on the table's write
count (a futex: the next stored result, in any process, wakes it), not
the base backend's 0.5 s polling; joins (``get_many``) poll every 50 ms.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import states
from celery.backends.base import KeyValueStoreBackend
from celery.exceptions import ImproperlyConfigured

from logq._named import KV

RESULTS_DIR = "celery-results.kv"
_TABLE = "celery.results"
_MAX_NAP = 0.05


def path_of(url: str | None) -> str:
    """The root directory of ``logq:///<path>`` (or ``logq://localhost/<path>``)."""
    if not url or not url.startswith("logq://"):
        raise ImproperlyConfigured(f"the logq result backend needs a logq:///<directory> URL, "
                                   f"not {url!r}")
    rest = url[len("logq://"):]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost"):]
    if not rest.startswith("/") or rest == "/":
        raise ImproperlyConfigured(f"a logq:// URL names a local directory "
                                   f"(logq:///var/lib/app/q), not {url!r}")
    return rest


class LogqBackend(KeyValueStoreBackend):  # type: ignore[misc]  # (celery is untyped)
    """Celery results in a logq index (see the module docstring)."""

    implements_incr = True
    supports_native_join = True
    supports_autoexpire = True
    supports_result_compression = True

    def __init__(self, url: str | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, url=url, **kwargs)
        self.url = url
        self.root = path_of(url)
        self.kv = KV(f"{self.root}/{RESULTS_DIR}", _TABLE)
        self._member = threading.local()

    def __reduce__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        return super().__reduce__(args, {**(kwargs or {}), "url": self.url})

    # -- the key-value contract -----------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        return self.kv.get(key)

    def mget(self, keys: list[bytes]) -> list[bytes | None]:
        return self.kv.mget(list(keys))

    def set(self, key: bytes, value: Any) -> None:
        if isinstance(value, str):
            value = value.encode()
        self.kv.set(key, value, self.expires)

    def delete(self, key: bytes) -> None:
        self.kv.delete(key)

    def incr(self, key: bytes) -> int:
        member = getattr(self._member, "id", None)
        return self.kv.incr(key, member.encode() if member else None, self.expires)

    def expire(self, key: bytes, value: Any) -> None:
        self.kv.expire(key, value)

    # -- chords ---------------------------------------------------------------------
    def on_chord_part_return(self, request: Any, state: Any, result: Any, **kwargs: Any) -> Any:
        # The header task's id goes with the increment: a task counted once.
        self._member.id = request.id
        try:
            return super().on_chord_part_return(request, state, result, **kwargs)
        finally:
            self._member.id = None

    # -- waiting --------------------------------------------------------------------
    def wait_for(self, task_id: Any, timeout: float | None = None, interval: float = 0.5,
                 no_ack: bool = True, on_interval: Any = None) -> Any:
        """The task's meta once it is ready; TimeoutError after ``timeout``."""
        self._ensure_not_eager()
        limit = None if timeout is None else time.monotonic() + timeout
        while True:
            seen = self.kv.stamp()
            meta = self.get_task_meta(task_id)
            if meta["status"] in states.READY_STATES:
                return meta
            if on_interval:
                on_interval()
            left = None if limit is None else limit - time.monotonic()
            if left is not None and left <= 0:
                raise self.TimeoutError("The operation timed out.")
            # Woken by the next stored result (any process), not a timer.
            self.kv.changed(seen, min(interval or 0.5, 0.5) if left is None else min(left, 0.5))

    def get_many(self, task_ids: Any, timeout: float | None = None, interval: float = 0.5,
                 **kwargs: Any) -> Any:
        return super().get_many(task_ids, timeout=timeout,
                                interval=min(interval if interval is not None else 0.5, _MAX_NAP),
                                **kwargs)
