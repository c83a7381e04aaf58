"""chain, group, chord, DAG and depends_on: submitting a graph of tasks,
and the handle that follows it.

    h = chain(resize.s("a.jpg", 200), upload.s(), notify.s("ops")).delay()
    g = group(resize.s(p, 200) for p in paths).delay()      # GroupHandle
    c = chord((resize.s(p, 200) for p in paths), merge.s()).delay()
    r = depends_on(report.s(day), [h1, h2], allow_failure=True)

Submitting puts every task of the graph (``_joins``: the ones with parents
parked), then writes the graph and the join counters in one index
transaction; from then on each join is settled with its parent's ack.
Returns once that transaction is durable.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterable

from logq._errors import TaskError, TaskNotFound
from logq.tasks import _state as S
from logq.tasks._app import TaskHandle
from logq.tasks._records import Outcome, dumps, encode_task, make_id, new_nonce
from logq.tasks._store import TaskStatus
from logq.workflows import _graph as G
from logq.workflows._joins import (ALL, ALLOW, DONE, INPUT_MARK, NEVER, NONE, _U32, _WAIT, Joins, _k)
from logq.workflows._plugin import joins_of


def _new_wid(kind: str) -> str:
    return f"{kind}-{os.urandom(6).hex()}"


def _app_of(nodes: list[G.Node]) -> Any:
    apps = {id(n.sig.task.app): n.sig.task.app for n in nodes}
    if len(apps) != 1:
        raise G.GraphError("every task of a workflow must belong to the same App")
    return next(iter(apps.values()))


def _record(n: G.Node) -> tuple[bytes, int, int]:
    t = n.sig.task
    app = t.app
    ser = app._serializer(t.options.serializer)
    kwargs = dict(n.sig.kwargs or {})
    if n.mode != NONE:
        kwargs[INPUT_MARK] = 1
    body = dumps(ser, [list(n.sig.args), kwargs], f"the arguments of task {t.name}")
    nonce = new_nonce()
    return encode_task(nonce, t.name, ser.name, body), nonce, t.options.priority


def submit(nodes: list[G.Node], kind: str, wid: str | None = None,
           handlers: list[G.Node] = ()) -> "GraphHandle":  # type: ignore[assignment]
    """Put the tasks of ``nodes`` (parents first) and write their graph;
    ``handlers``: link_error tasks, started by the first failure."""
    if not nodes:
        raise G.GraphError("nothing to submit")
    app = _app_of(nodes + list(handlers))
    joins: Joins = joins_of(app)
    wid = wid or _new_wid(kind)
    q = app.queue
    recs = [_record(n) for n in nodes]
    hrecs = [_record(h) for h in handlers]
    ids: list[str] = [""] * len(nodes)
    # 1. The parked ones (with parents; the error handlers), one put each.
    for i, n in enumerate(nodes):
        if n.parents:
            data, nonce, prio = recs[i]
            ids[i] = make_id(q.put(data, priority=prio, deliver_at=NEVER), nonce)
    hids = [make_id(q.put(d, priority=p, deliver_at=NEVER), nc) for d, nc, p in hrecs]
    # 2. The roots, ready at once: one put_many when plain.
    roots = [i for i, n in enumerate(nodes) if not n.parents]
    if all(recs[i][2] == 0 for i in roots):
        offs = q.put_many([recs[i][0] for i in roots])
        for i, off in zip(roots, offs):
            ids[i] = make_id(off, recs[i][1])
    else:
        for i in roots:
            ids[i] = make_id(q.put(recs[i][0], priority=recs[i][2]), recs[i][1])
    # 3. The graph, in one transaction.  A root may have finished already:
    #    its end is counted here instead of by its settlement.
    external = sorted({p for n in nodes for p in n.parents if isinstance(p, str)})
    store = joins.store
    for p in external:
        store.status(p)       # raises TaskNotFound for an unknown (or expired) id
    children: dict[Any, list[tuple[str, int]]] = {}
    for i, n in enumerate(nodes):
        for pos, p in enumerate(n.parents):
            children.setdefault(ids[p] if isinstance(p, int) else p, []).append((ids[i], pos))
    db = joins.db
    now = time.time_ns()
    meta = {"kind": kind, "created": time.time(), "n": len(nodes), "le": hids,
            "names": [n.label for n in nodes]}

    def fn(txn: Any) -> None:
        if txn.get(_k(b"M", wid), db=db) is not None:
            raise TaskError(f"workflow id {wid!r} is taken")
        txn.put(_k(b"M", wid), json.dumps(meta).encode(), db=db)
        txn.put(_k(b"C", wid), _U32.pack(len(nodes)), db=db)
        for i, n in enumerate(nodes):
            tid = ids[i]
            node = {"w": wid, "n": n.sig.task.name, "i": i, "l": n.label,
                    "p": [ids[p] if isinstance(p, int) else p for p in n.parents],
                    "d": children.get(tid, []), "le": hids}
            txn.put(_k(b"N", tid), json.dumps(node).encode(), db=db)
            flags = (ALLOW if n.allow_failure else 0) | (0 if n.parents else DONE)
            txn.put(_k(b"W", tid), _WAIT.pack(len(n.parents), flags, n.mode, len(n.parents)), db=db)
            txn.put(_k(b"L", wid) + b"\0" + _U32.pack(i), tid.encode(), db=db)
        for j, h in enumerate(handlers):
            tid = hids[j]
            txn.put(_k(b"N", tid), json.dumps({"w": "", "n": h.sig.task.name, "i": len(nodes) + j,
                                               "l": h.label, "p": [], "d": [], "le": []}).encode(), db=db)
            txn.put(_k(b"W", tid), _WAIT.pack(1, 0, h.mode, 1), db=db)
            txn.put(_k(b"L", wid) + b"\0" + _U32.pack(len(nodes) + j), tid.encode(), db=db)
        # Parents outside this graph: registered as such, or counted now.
        for p in external:
            raw = txn.get(p.encode(), db=store.outcome)
            out = Outcome.unpack(raw) if raw is not None else None
            if out is not None and out.state in S.FINAL:
                for d, pos in children[p]:
                    nxt = joins._edge(txn, p, out, d, pos, now)
                    if nxt is not None:
                        joins.finish(txn, [nxt])
                continue
            nraw = txn.get(_k(b"N", p), db=db)
            node = json.loads(nraw) if nraw is not None else {"w": "", "n": "", "d": []}
            node["d"] = node.get("d", []) + [list(x) for x in children[p]]
            txn.put(_k(b"N", p), json.dumps(node).encode(), db=db)
        # Roots already finished (their settlement found no graph yet).
        ended = []
        for i in roots:
            raw = txn.get(ids[i].encode(), db=store.outcome)
            if raw is not None and Outcome.unpack(raw).state in S.FINAL:
                ended.append((ids[i], json.loads(txn.get(_k(b"N", ids[i]), db=db)), Outcome.unpack(raw)))
        if ended:
            joins.finish(txn, ended)
    joins.idx.write(fn)
    q._poke()
    return GraphHandle(app, wid, ids, [n.label for n in nodes], hids)


class GraphHandle:
    """A submitted chain, group, chord or DAG, by its workflow ``id``
    (``logq tasks show``, ``list --workflow``, ``graph`` take it).
    ``tasks``: the TaskHandle of every task, in submission order
    (parents first); ``handle``/``[label]``: one of them; ``result()``:
    the last task's result (a chain's end, a chord's callback)."""

    def __init__(self, app: Any, wid: str, ids: list[str], labels: list[str],
                 handlers: list[str] = ()) -> None:  # type: ignore[assignment]
        self.app = app
        self.id = wid
        self.tasks = [TaskHandle(app, t) for t in ids]
        self.labels = labels
        self.handlers = [TaskHandle(app, t) for t in handlers]

    def __getitem__(self, label: str) -> TaskHandle:
        try:
            return self.tasks[self.labels.index(label)]
        except ValueError:
            raise KeyError(f"no task labelled {label!r} in workflow {self.id}") from None

    @property
    def last(self) -> TaskHandle:
        return self.tasks[-1]

    def result(self, timeout: float | None = None) -> Any:
        """The last task's result (see TaskHandle.result)."""
        return self.last.result(timeout)

    def statuses(self) -> list[TaskStatus]:
        return [h.status() for h in self.tasks]

    def cancel(self) -> int:
        """Cancel every task not finished: the ones not started never start.
        How many were cancelled."""
        return joins_of(self.app).cancel(self.id)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} ({len(self.tasks)} tasks)>"


class GroupHandle(GraphHandle):
    """A submitted group: ``results()`` in the order of its members."""

    def results(self, timeout: float | None = None) -> list[Any]:
        """Every member's result, in order; raises the first failure
        (TaskFailed / TaskCancelled) or TimeoutError."""
        limit = None if timeout is None else time.monotonic() + timeout
        out = []
        for h in self.tasks:
            left = None if limit is None else max(0.0, limit - time.monotonic())
            out.append(h.result(left))
        return out

    def result(self, timeout: float | None = None) -> list[Any]:
        return self.results(timeout)


class _Composition:
    def __init__(self, c: Any, kind: str, link_error: Any = None) -> None:
        self.c = c
        self.kind = kind
        self.link_error = link_error

    def delay(self, *, workflow_id: str | None = None) -> GraphHandle:
        nodes, _exits = G.build(self.c, allow_failure=getattr(self, "allow_failure", False))
        handlers = [G.error_handler(self.link_error)] if self.link_error is not None else []
        h = submit(nodes, self.kind, workflow_id, handlers)
        if self.kind == "group":
            h.__class__ = GroupHandle
        return h

    apply_async = delay


def chain(*parts: Any, link_error: Any = None) -> _Composition:
    """Run ``parts`` one after the other; each gets the previous one's
    result as its first argument (a ``task.si(...)`` does not; after a
    group, the list of its results).  ``link_error``: a signature run once,
    with the failed task's id first, if any task of it fails."""
    return _Composition(G.Chain(parts), "chain", link_error)


def group(parts: Iterable[Any], *, link_error: Any = None) -> _Composition:
    """Run ``parts`` in parallel; ``.delay()`` gives a GroupHandle."""
    return _Composition(G.Group(parts), "group", link_error)


def chord(header: Iterable[Any], body: Any, *, allow_failure: bool = False,
          link_error: Any = None) -> _Composition:
    """Run ``header`` in parallel, then ``body`` once with the list of
    their results (in order) as its first argument; with
    ``allow_failure``, also when some failed (their results None),
    else a failed member fails it ("dependency X failed")."""
    comp = _Composition(G.Chain([G.Group(header), body]), "chord", link_error)
    comp.allow_failure = allow_failure  # type: ignore[attr-defined]
    return comp


def depends_on(sig: Any, parents: Iterable[Any], *, allow_failure: bool = False,
               pass_results: bool = False, link_error: Any = None) -> TaskHandle:
    """Submit ``sig`` to start once every task of ``parents`` (handles or
    ids) has finished; a parent that failed or was cancelled fails it,
    unless ``allow_failure``.  ``pass_results``: the list of their results
    is its first argument.  Raises TaskNotFound for an unknown parent."""
    ids = []
    for p in parents:
        tid = p if isinstance(p, str) else getattr(p, "id", None)
        if isinstance(p, GraphHandle):
            tid = p.last.id
        if not isinstance(tid, str):
            raise G.GraphError(f"a parent must be a TaskHandle or a task id, not {p!r}")
        ids.append(tid)
    if not ids:
        raise G.GraphError("depends_on needs at least one parent")
    mode = ALL if pass_results else NONE
    node = G.Node(sig, list(dict.fromkeys(ids)), mode, allow_failure, sig.task.name)
    handlers = [G.error_handler(link_error)] if link_error is not None else []
    return submit([node], "after", None, handlers).tasks[0]


class DAG:
    """Named tasks and their dependencies, submitted at once:

        d = DAG()
        d.add("extract", extract.s(day))
        d.add("load", load.s(), after=["extract"], pass_results=True)
        d.add("report", report.s(), after=["load", "audit"], allow_failure=True)
        d.add("audit", audit.s(day))
        h = d.delay(); h["report"].result(timeout=60)

    A cycle or an unknown name is refused at ``delay()`` (GraphError),
    nothing submitted."""

    def __init__(self, *, link_error: Any = None) -> None:
        self.named: dict[str, tuple[Any, list[str], bool, bool]] = {}
        self.link_error = link_error

    def add(self, name: str, sig: Any, *, after: Iterable[str] = (), allow_failure: bool = False,
            pass_results: bool = False) -> "DAG":
        if name in self.named:
            raise G.GraphError(f"DAG node {name!r} added twice")
        if not G._is_sig(sig):
            raise G.GraphError(f"DAG node {name!r}: not a task signature (task.s(...)): {sig!r}")
        self.named[name] = (sig, list(after), allow_failure, pass_results)
        return self

    def delay(self, *, workflow_id: str | None = None) -> GraphHandle:
        nodes, _at = G.order(self.named)
        handlers = [G.error_handler(self.link_error)] if self.link_error is not None else []
        return submit(nodes, "dag", workflow_id, handlers)


def handle(app: Any, wid: str) -> GraphHandle:
    """The handle of a submitted graph by its id; raises TaskNotFound."""
    j = joins_of(app)
    meta = j.meta(wid)
    if meta is None:
        raise TaskNotFound(f"no workflow {wid!r} in {app.path}")
    ids = j.members(wid)
    n = meta.get("n", len(ids))
    cls = GroupHandle if meta.get("kind") == "group" else GraphHandle
    return cls(app, wid, ids[:n], meta.get("names", [])[:n], ids[n:])
