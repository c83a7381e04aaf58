"""How the workflows layer plugs into ``logq.tasks`` (which never imports
it): importing ``logq.workflows`` registers ``install`` in
``App.extensions``, so every App of this process, and the workers of its
pools (which import this module first), call the workflows' settle and
run hooks.  The process that runs a pool must have imported
``logq.workflows`` (``logq worker`` does); otherwise the dependants of its
tasks are not released."""

from __future__ import annotations

from typing import Any

from logq.tasks._app import App
from logq.workflows._flows import Flows
from logq.workflows._joins import Joins


def open_db(idx: Any, name: bytes, txn: Any = None) -> Any:
    """A named index database, opened once per index: through ``txn``
    when called inside a write transaction (a hook: opening one of its own
    would wait for the lock this thread holds)."""
    dbs = idx.__dict__.setdefault("_named", {})
    db = dbs.get(name)
    if db is None:
        db = dbs[name] = idx.env.open_db(name, txn=txn) if txn is not None else idx.open_db(name)
    return db


def _per_store(app: Any, attr: str, make: Any, txn: Any) -> Any:
    """``app``'s ``make(app, txn)`` object for its current store, kept in
    ``attr`` (made again after a reopen)."""
    obj = app.__dict__.get(attr)
    if obj is None or obj.store is not app._store():
        obj = app.__dict__[attr] = make(app, txn)
    return obj


def joins_of(app: Any, txn: Any = None) -> Any:
    """The Joins of ``app``'s current store."""
    return _per_store(app, "_wf_joins", Joins, txn)


def flows_of(app: Any, txn: Any = None) -> Any:
    """The Flows (durable workflows) of ``app``'s current store."""
    return _per_store(app, "_wf_flows", Flows, txn)


def install(app: Any) -> None:
    """Add the workflows' hooks to ``app`` (an App extension)."""
    def settle(txn: Any, task_id: str, event: str, out: Any) -> None:
        joins_of(app, txn).on_settle(txn, task_id, event, out)
        flows_of(app, txn).on_settle(txn, task_id, event, out)

    def run(task_id: str, name: str, args: Any, kwargs: Any) -> tuple[Any, Any]:
        return joins_of(app).run_hook(task_id, name, args, kwargs)
    app.settle_hooks.append(settle)
    app.run_hooks.append(run)
    joins_of(app)       # (open their databases now, outside any transaction)
    flows_of(app)


if install not in App.extensions:
    App.extensions.append(install)
