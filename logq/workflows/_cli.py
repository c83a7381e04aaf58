"""The workflows' part of ``logq tasks`` (whose parser ``logq.tasks._cli``
builds): ``show ID`` also draws the workflow of a task, or the workflow
``ID`` itself (a graph's tree/DAG, a durable workflow's steps), ``list
--workflow ID``, and ``graph ID [--html FILE]``.  Importing this module
imports ``logq.workflows``, so ``logq worker`` pools run the workflows'
hooks.  Thin: parse, call, print."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

import logq.workflows  # noqa: F401  (the App extension, for `logq worker` too)
from logq._errors import TaskNotFound
from logq.workflows import _view


def add_to_tasks(sub: Any) -> None:
    """Extend the ``tasks`` parser of the ``logq`` command (built already)."""
    t = sub.choices["tasks"]
    acts = next(a for a in t._actions if isinstance(a, argparse._SubParsersAction))
    acts.choices["list"].add_argument("--workflow", default=None, metavar="ID",
                                      help="only the tasks of this workflow (chain, group, chord, DAG)")
    g = acts.add_parser("graph", help="draw a workflow's DAG and its tasks' states")
    g.add_argument("id", help="a workflow id, or the id of one of its tasks")
    g.add_argument("--html", metavar="FILE", default=None,
                   help="write a static HTML page (inline SVG, no network) instead of text")
    g.add_argument("--json", action="store_true")
    base = t.get_default("func")
    t.set_defaults(func=lambda args: _tasks(args, base))


def _tasks(args: argparse.Namespace, base: Callable[[argparse.Namespace], int]) -> int:
    wanted = args.action == "graph" or (args.action == "list" and getattr(args, "workflow", None)) \
        or args.action == "show"
    if not wanted:
        return base(args)
    from logq._check import require_queue
    from logq.tasks import App
    require_queue(args.path)
    app = App(args.path)
    try:
        if args.action == "list":
            sts = _view.statuses_of(app, args.workflow)
            if args.json:
                print(json.dumps([s.as_dict() for s in sts], indent=1))
            else:
                for s in sts:
                    print(f"{s.id:<24} {s.state:<10} {s.attempts:>3}  {s.name}")
            return 0
        wid = _workflow_id(app, args.id)
        if args.action == "show":
            if wid != args.id:
                code = base(args)       # a task: its status first
                if wid is None or code:
                    return code
                print()
            print(_view.text(_view.nodes(app, wid)))  # type: ignore[arg-type]
            return 0
        if wid is None:
            raise TaskNotFound(f"{args.id!r} is neither a workflow nor a task of one")
        v = _view.nodes(app, wid)
        if args.html:
            with open(args.html, "w", encoding="utf-8") as f:
                f.write(_view.html(v))
            print(f"wrote {args.html} ({len(v.nodes)} nodes)", file=sys.stderr)
        elif args.json:
            print(json.dumps({"id": v.id, "kind": v.kind, "state": v.state, "nodes": v.nodes}, indent=1))
        else:
            print(_view.text(v))
        return 0
    finally:
        app.close()


def _workflow_id(app: Any, ident: str) -> str | None:
    """``ident`` itself if it names a workflow, else the workflow of the
    task ``ident``, else None."""
    from logq.workflows._plugin import flows_of, joins_of
    if joins_of(app).meta(ident) is not None or flows_of(app).flow(ident) is not None:
        return ident
    return _view.workflow_of(app, ident)
