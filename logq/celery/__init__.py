"""Celery on logq: a kombu transport and a result backend.

    import logq.celery                      # registers the logq:// transport with kombu
    app = Celery("app", broker="logq:///var/lib/app/q", backend="logq:///var/lib/app/q")

Importing this module registers ``logq`` in kombu's transport aliases
(kombu has no entry points for transports: the module that creates the
Celery app must import it, and so does every worker, which imports that
module).  The result backend is also registered as the entry point
``celery.result_backends: logq``, so ``backend="logq:///..."`` works
without the import.

Needs the ``celery`` extra (``pip install 'logq[celery]'``); nothing in
logq's core imports this package.  What the transport and the backend
promise: ``logq.celery._transport`` and ``logq.celery._backend``.
"""

from __future__ import annotations

from celery.loaders.base import BaseLoader
from kombu.transport import TRANSPORT_ALIASES

from logq.celery._backend import LogqBackend
from logq.celery._transport import Channel, QoS, Transport

TRANSPORT_ALIASES.setdefault("logq", "logq.celery._transport:Transport")
# (Celery's loaders look result backends up here, then in the entry points.)
BaseLoader.override_backends.setdefault("logq", "logq.celery._backend:LogqBackend")

__all__ = ["Transport", "Channel", "QoS", "LogqBackend"]
