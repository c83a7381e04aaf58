"""The tasks' commands of the ``logq`` CLI: ``logq worker module:app`` and
``logq tasks PATH list|show|cancel|retry|purge``.  Thin: parse, call the
App, print."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any

from logq.tasks import _state as S

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '2h', '1d', '1w' -> seconds."""
    t = text.strip()
    unit = _UNITS.get(t[-1:].lower())
    num = t[:-1] if unit else t
    try:
        value = float(num) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90, 30m, 2h, 1d)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a duration must not be negative")
    return value


def add_parsers(sub: Any) -> None:
    w = sub.add_parser("worker", help="run an app's tasks on a worker pool: logq worker module:app")
    w.add_argument("app", help="module:attribute of a logq.tasks.App (the current directory is on the path)")
    w.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: CPUs)")
    w.add_argument("--max-workers", type=int, default=None, help="autoscale up to this many")
    w.add_argument("--until-idle", action="store_true", help="return once nothing is left to do")
    w.set_defaults(func=_worker)

    t = sub.add_parser("tasks", help="list, show, cancel, retry or purge tasks of a queue")
    t.add_argument("path", help="the queue directory")
    ts = t.add_subparsers(dest="action", required=True)
    ls = ts.add_parser("list", help="tasks and their states")
    ls.add_argument("--status", choices=S.STATES, default=None)
    ls.add_argument("--name", default=None)
    ls.add_argument("--json", action="store_true")
    for name, help_ in (("show", "one task's status"), ("cancel", "cancel a task"),
                        ("retry", "run a failed or cancelled task again")):
        p = ts.add_parser(name, help=help_)
        p.add_argument("id")
        p.add_argument("--json", action="store_true")
    pg = ts.add_parser("purge", help="delete finished tasks' records")
    pg.add_argument("--status", choices=sorted(S.FINAL), default=None, help="default: every final state")
    pg.add_argument("--older-than", type=parse_duration, default=0.0, metavar="DURATION",
                    help="finished longer ago than this (90, 30m, 2h, 1d)")
    t.set_defaults(func=_tasks)


def _worker(args: argparse.Namespace) -> int:
    sys.path.insert(0, os.getcwd())
    mod, _, attr = args.app.partition(":")
    app: Any = importlib.import_module(mod)
    for part in (attr or "app").split("."):
        app = getattr(app, part)
    options: dict[str, Any] = {"workers": args.workers}
    if args.max_workers is not None:
        options["max_workers"] = max(args.max_workers, args.workers)
    pool = app.pool(f"{mod}:{attr or 'app'}", **options)
    st = pool.run(until_idle=args.until_idle)
    print(f"processed {st.processed}, failed {st.failed}, retried {st.retried}", file=sys.stderr)
    return 0


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _tasks(args: argparse.Namespace) -> int:
    from logq._check import require_queue
    from logq.tasks import App
    require_queue(args.path)
    app = App(args.path)
    try:
        if args.action == "list":
            sts = app.statuses(state=args.status, name=args.name)
            if args.json:
                print(json.dumps([s.as_dict() for s in sts], indent=1))
            else:
                for s in sts:
                    print(f"{s.id:<24} {s.state:<10} {s.attempts:>3} {_when(s.submitted)}  {s.name}")
            return 0
        if args.action == "purge":
            n = app.purge(args.status, args.older_than)
            print(f"purged {n} task record(s)", file=sys.stderr)
            return 0
        if args.action == "cancel":
            done = app.cancel(args.id)
            print("cancelled" if done else "already finished: nothing to cancel", file=sys.stderr)
        elif args.action == "retry":
            app.retry(args.id)
        st = app.get(args.id).status()
        if args.json:
            print(json.dumps(st.as_dict(), indent=1))
        else:
            for k, v in st.as_dict().items():
                if k in ("submitted", "started", "finished", "due"):
                    v = _when(v)
                if k == "error" and v:
                    v = f"{v['type']}: {v['message']}\n{v['traceback']}".rstrip()
                print(f"{k:>10}: {v}")
        return 0
    finally:
        app.close()
