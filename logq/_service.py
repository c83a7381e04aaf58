"""What a worker pool and a forwarder share: running in the foreground
until SIGTERM/SIGINT, or in a background thread until ``stop()``.

A subclass provides ``_serve(until_idle)`` (the work, returning when it is
done or asked to stop), ``_request_stop()`` (thread- and signal-safe) and
``stats()``.  A failure of the background thread is logged and raised again
by ``stop()``."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from logq._errors import LogqError

log = logging.getLogger("logq")


class Service:
    _thread: threading.Thread | None = None
    _error: BaseException | None = None
    _thread_name = "logq-service"
    _started_error: type[LogqError] = LogqError

    def _serve(self, until_idle: bool) -> None:
        raise NotImplementedError

    def _request_stop(self) -> None:
        raise NotImplementedError

    def stats(self) -> Any:
        raise NotImplementedError

    def _run(self, until_idle: bool) -> Any:
        """``_serve`` in this thread, SIGTERM and SIGINT (in the main
        thread) asking it to stop; the final stats."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, lambda *_: self._request_stop())
        try:
            self._serve(until_idle)
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)
        if self._error is not None:
            raise self._error
        return self.stats()

    def start(self) -> Any:
        """Run in a background thread of this process (``stop()`` ends it)."""
        if self._thread is not None:
            raise self._started_error(f"{self!r} is already started")
        self._thread = threading.Thread(target=self._background, name=self._thread_name, daemon=True)
        self._thread.start()
        return self

    def _background(self) -> None:
        try:
            self._serve(False)
        except BaseException as e:  # noqa: BLE001 - raised again by stop()
            self._error = e
            log.exception("%r failed", self)

    def _join(self) -> Any:
        """After ``_request_stop``: wait for the background thread; raise
        what ended it, if it failed; the final stats."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        return self.stats()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()     # type: ignore[attr-defined]
