"""The ``logq`` command (also ``python -m logq``).  Thin: parses arguments and
calls the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

import logq


def _bench(args: argparse.Namespace) -> int:
    import importlib.util
    import shutil
    import time

    from logq import bench

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ImportError("--plot needs matplotlib: pip install 'logq[plot]' (or leave out --plot)")
    if args.dir is not None and not os.path.isdir(args.dir):
        raise ValueError(f"--dir {args.dir}: not a directory")
    base = bench.Params(payload=args.payload, batch=args.batch, fsync=args.fsync,
                        fsync_interval=args.fsync_interval, fsync_bytes=args.fsync_bytes,
                        commit_every=args.commit_every, commit_interval=args.commit_interval,
                        producers=args.producers, consumers=args.consumers, workers=args.workers,
                        rate=args.rate, messages=args.messages, duration=args.duration)
    sweeps = args.sweep or []
    params = bench.grid(base, args.workload, sweeps)

    shown: dict[str, Any] = {"at": 0.0, "label": None}

    def progress(i: int, n: int, label: str, fraction: float) -> None:
        """A bar on stderr (a terminal only), redrawn at most 10 times a second."""
        now = time.monotonic()
        if label == shown["label"] and now - shown["at"] < 0.1:
            return
        shown.update(at=now, label=label)
        whole = (i + fraction) / n if n else 1.0
        width = 24
        line = (f"[{'#' * int(width * whole):<{width}}] {min(i + 1, n)}/{n} {label} "
                f"{min(fraction, 1.0):.0%}")
        cols = shutil.get_terminal_size((80, 24)).columns
        print(f"\r\033[K{line[:cols - 1]}", end="", file=sys.stderr, flush=True)

    tty = sys.stderr.isatty()
    try:
        report = bench.run(params, sweeps=sweeps, dirpath=args.dir, compare=args.compare,
                           progress=progress if tty else None)
    except KeyboardInterrupt:
        print("\nlogq bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
    doc = bench.as_json(report)
    if args.json not in (None, "-"):
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    if args.csv:
        bench.write_csv(report, args.csv)
    if args.plot:
        bench.plot(report, args.plot)
    if args.json == "-":
        print(json.dumps(doc, indent=2))
    else:
        print(bench.format_report(report))
        for what, path in (("JSON", args.json), ("CSV", args.csv), ("plot", args.plot)):
            if path:
                print(f"wrote {what} to {path}", file=sys.stderr)
    return 1 if report.failed else 0


def _work(args: argparse.Namespace) -> int:
    sys.path.insert(0, os.getcwd())     # handlers in the current directory, as `python -m` finds them
    options = {"workers": args.workers, "batch_size": args.batch_size}
    if args.timeout is not None:
        options["timeout"] = args.timeout
    if args.max_workers is not None:
        options["max_workers"] = max(args.max_workers, args.workers)
    if args.max_attempts is not None:
        options["max_attempts"] = args.max_attempts
    pool = logq.WorkerPool(args.path, args.handler, group=args.group, **options)
    st = pool.run(until_idle=args.until_idle)
    summary = {k: v for k, v in st.as_dict().items() if k != "busy_seconds"}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(", ".join(f"{k} {v}" for k, v in summary.items() if v not in (None, 0, {})), file=sys.stderr)
    return 0


# -- operating a queue: stat, tail, put, verify, repair, dlq, group ---------------
def _open_existing(path: str, **options: object) -> "logq.Queue":
    """Open a queue that must exist already (these commands never create one)."""
    from logq._check import require_queue
    require_queue(path)
    return logq.open(path, **options)


def _show(data: object, text: str, as_json: bool) -> None:
    print(json.dumps(data, indent=2, default=str) if as_json else text)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _stat(args: argparse.Namespace) -> int:
    from logq import _status
    from logq._fsutil import losses
    from logq._log import lock_holders
    with _open_existing(args.path) as q:
        st = q.stats()
        others = [] if q._log.alone else list(lock_holders(q._log.open_fd))  # type: ignore[union-attr]
        lost = len(losses(args.path))
        tasks = _task_census(q) if "tasks" in st["groups"] else None
    live = _status.read_all(args.path)
    st["processes_open"] = others
    st["quarantined_ranges"] = lost
    st["live"] = live
    if tasks is not None:
        st["tasks"] = {k: tasks[k] for k in ("states", "submitted", "truncated")}
    st.pop("fsync", None)          # this command's own policy, not the queue's
    st.pop("fsyncs", None)
    st.pop("durable_next_offset", None)
    if args.json:
        _show(st, "", True)
        return 0
    shutdown = ("in use" if others else
                "clean" if st["last_shutdown_clean"] else
                f"unclean (recovered now: {st['recovery_truncated_bytes']} torn bytes cut)")
    lines = [
        f"queue     {st['path']}  (id {st['queue_id']})",
        f"offsets   {st['first_offset']} .. {st['next_offset']}  ({st['messages']} messages retained)",
        f"disk      {st['segments']} segment(s), {st['segment_bytes_on_disk']:,} B of log, "
        f"{st['disk_bytes']:,} B in all",
        f"shutdown  {shutdown}" + (f"; open in pid {', '.join(map(str, others))}" if others else ""),
        f"damage    {st['lost_records']} record(s) known lost, {lost} range(s) in quarantine",
    ]
    policies = sorted({f"pid {s['pid']}: fsync={s['fsync']}" for s in live
                       if s.get("kind") == "queue" and "fsync" in s})
    lines.append("durability " + ("; ".join(policies) if policies else
                                  "set by each process that opens the queue (default fsync=batch); "
                                  "none is open now"))
    if st["groups"]:
        lines.append("")
        lines.append(f"{'group':<20} {'backlog':>10} {'in flight':>10} {'scheduled':>10} "
                     f"{'dead':>6} {'oldest unacked':>15} {'watermark':>12}")
        for name, g in sorted(st["groups"].items()):
            lines.append(f"{name:<20} {g['backlog']:>10} {g['in_flight']:>10} {g['scheduled']:>10} "
                         f"{g['dead_letters']:>6} {_age(g['oldest_unacked_age']):>15} {g['watermark']:>12}")
    for s in live:
        if s.get("kind") in ("pool", "forward"):
            fields = ", ".join(f"{k} {v}" for k, v in s.items()
                               if k not in ("kind", "name", "pid", "updated") and v not in (None, {}, []))
            lines.append(f"{s['kind']} {s['name']!r} (pid {s['pid']}): {fields}")
    if tasks is not None:
        from logq.tasks._census import table
        lines.append("")
        lines += table(tasks)
    print("\n".join(lines))
    return 0


def _task_census(q: Any) -> dict[str, Any]:
    """Tasks by name and state (the queue holds logq.tasks' tasks)."""
    from logq.tasks._census import census
    from logq.tasks._store import Store
    store = Store(q)
    try:
        return census(store)
    finally:
        store.close()


def _render(data: bytes, fmt: str) -> tuple[str, str]:
    """(encoding name, text) of a payload for printing."""
    if fmt in ("auto", "text"):
        try:
            text = data.decode("utf-8")
            if fmt == "text" or text.isprintable():
                return "text", text
        except UnicodeDecodeError:
            if fmt == "text":
                return "text", data.decode("utf-8", errors="replace")
    if fmt == "base64":
        import base64
        return "base64", base64.b64encode(data).decode()
    return "hex", data.hex()


def _tail(args: argparse.Namespace) -> int:
    import signal
    import time as _time
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with _open_existing(args.path) as q:
        first, nxt = q.first_offset, q.next_offset
        if args.from_offset is not None:
            off, left = max(first, args.from_offset), args.n
        else:
            off, left = max(first, nxt - (args.n if args.n is not None else 10)), None
        try:
            while not stop:
                at, payloads, ts, attrs, _meta = q._fetch(off, 1000 if left is None else min(1000, left))
                if not payloads:
                    if not args.follow or (left is not None and left <= 0):
                        break
                    q.wait(off, timeout=0.5)
                    continue
                if at > off:
                    note = {"lost": [off, at]}
                    print(json.dumps(note) if args.json else f"-- offsets {off}..{at - 1} lost to damage --")
                for i, data in enumerate(payloads):
                    kind, text = _render(bytes(data), args.format)
                    when = _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(ts[i] / 1e9))
                    if args.json:
                        print(json.dumps({"offset": at + i, "timestamp": ts[i] / 1e9,
                                          "priority": (attrs[i] >> 16) & 0xFF, kind: text}))
                    else:
                        print(f"{at + i}\t{when}Z\t{text if kind == 'text' else kind + ':' + text}")
                off = at + len(payloads)
                if left is not None:
                    left -= len(payloads)
                    if left <= 0 and not args.follow:
                        break
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        except BrokenPipeError:
            sys.stderr.close()      # `logq tail … | head`: the reader left
    return 0


def _put(args: argparse.Namespace) -> int:
    if args.files:
        items = []
        for name in args.files:
            with open(name, "rb") as f:
                items.append(f.read())
    else:
        items = sys.stdin.buffer.read().split(b"\n")
        if items and items[-1] == b"":
            items.pop()
    if args.key is not None and len(items) != 1:
        raise ValueError(f"--key names one message; {len(items)} were given")
    opener = logq.open if args.create else _open_existing
    with opener(args.path, fsync=args.fsync) as q:
        opts = {k: v for k, v in (("key", args.key), ("priority", args.priority or None),
                                  ("delay", args.delay)) if v is not None}
        if opts:
            offsets = [q.put(d, **opts) for d in items]
            first = offsets[0] if offsets else q.next_offset
        else:
            first = q.put_many(items).start if items else q.next_offset
        q.flush()
    last = first + len(items) - 1
    _show({"count": len(items), "first_offset": first, "last_offset": last},
          f"put {len(items)} message(s) at offsets {first}..{last}, on stable storage", args.json)
    return 0


def _progress_bar() -> Callable[[int, int], None] | None:
    if not sys.stderr.isatty():
        return None

    def bar(done: int, total: int) -> None:
        frac = done / total if total else 1.0
        print(f"\r\033[K  [{'#' * int(frac * 30):<30}] {frac * 100:5.1f}%  {done >> 20} MiB",
              end="", file=sys.stderr, flush=True)
    return bar


def _report_text(rep: "logq.Report", verb: str) -> str:
    lines = [f"{rep.path}: {rep.segments} segment(s), {rep.records} intact record(s), "
             f"offsets {rep.first_offset}..{rep.next_offset}, {rep.bytes_scanned:,} B scanned"
             + (" (open in another process: checked up to its published tail)" if rep.in_use else "")]
    for d in rep.damage:
        what = "known loss (in quarantine)" if d.known else "DAMAGE"
        held = (f"offsets {d.first_offset}..{d.end_offset - 1} ({d.offsets})" if d.offsets
                else "no offsets")
        lines.append(f"  {what}: {d.segment} bytes {d.start}..{d.end}: {d.kind}, {d.reason}; {held}")
    if rep.torn_tail is not None:
        t = rep.torn_tail
        lines.append(f"  torn tail: {t.segment} bytes {t.start}..{t.end} after offset {t.first_offset - 1} "
                     "(a writer died mid-write; the next open or repair cuts it)")
    if rep.index != "ok":
        lines.append(f"  index: {rep.index}")
    for a in rep.actions:
        lines.append(f"  {verb}: {a}")
    for u in rep.unrepairable:
        lines.append(f"  cannot repair: {u}")
    lines.append("clean" if rep.clean else
                 f"damaged: {sum(d.offsets for d in rep.damage if not d.known)} record(s) lost")
    return "\n".join(lines)


def _verify(args: argparse.Namespace) -> int:
    bar = _progress_bar()
    rep = logq.verify(args.path, progress=bar)
    if bar:
        print("\r\033[K", end="", file=sys.stderr)
    _show(rep.as_dict(), _report_text(rep, ""), args.json)
    return 0 if rep.clean else 1


def _repair(args: argparse.Namespace) -> int:
    bar = _progress_bar()
    rep = logq.repair(args.path, dry_run=args.dry_run, rebuild_index=args.rebuild_index, progress=bar)
    if bar:
        print("\r\033[K", end="", file=sys.stderr)
    after = None if args.dry_run else logq.verify(args.path)
    out = rep.as_dict()
    out["dry_run"] = args.dry_run
    if after is not None:
        out["after"] = after.as_dict()
    text = _report_text(rep, "would" if args.dry_run else "did")
    if after is not None:
        text += "\nafter repair: " + ("verifies clean" if after.clean else "STILL DAMAGED")
    _show(out, text, args.json)
    return 0 if args.dry_run or (after is not None and after.clean and not rep.unrepairable) else 1


def _dlq(args: argparse.Namespace) -> int:
    with _open_existing(args.path) as q:
        if args.group not in q._index.watermarks():
            raise ValueError(f"no consumer group {args.group!r} in {args.path}")
        c = q.consumer(args.group)
        try:
            offsets = args.offset or None
            if args.action == "list":
                letters = c.dead_letters(limit=None if offsets else args.limit)
                if offsets:
                    letters = [d for d in letters if d.offset in set(offsets)][:args.limit]
                rows = []
                for d in letters:
                    kind, text = _render(d.data, "auto")
                    rows.append({"offset": d.offset, "attempts": d.attempts, "error": d.error,
                                 "timestamp": d.timestamp, "dead_at": d.dead_at, kind: text})
                _show(rows, "\n".join(
                    f"{r['offset']}\tattempts {r['attempts']}\t{r['error'].strip().splitlines()[-1] if r['error'].strip() else ''}"
                    f"\t{r.get('text', r.get('hex', ''))[:80]}" for r in rows) or "no dead letters", args.json)
            elif args.action == "replay":
                new = c.replay(offsets)
                _show({"replayed": len(new), "new_offsets": new},
                      f"replayed {len(new)} dead letter(s) as new messages" +
                      (f" at offsets {new[0]}..{new[-1]}" if new else ""), args.json)
            else:
                n = c.purge(offsets)
                _show({"purged": n}, f"purged {n} dead letter(s)", args.json)
        finally:
            c.close()
    return 0


def _group(args: argparse.Namespace) -> int:
    if args.action == "list":
        with _open_existing(args.path) as q:
            groups = q.stats()["groups"]
        _show(groups, "\n".join(f"{n}\twatermark {g['watermark']}\tbacklog {g['backlog']}\t"
                                f"in flight {g['in_flight']}\tdead letters {g['dead_letters']}"
                                for n, g in sorted(groups.items())) or "no consumer groups", args.json)
        return 0
    if args.group is None or args.to is None:
        raise ValueError("usage: logq group PATH reset GROUP --to OFFSET|earliest|latest")
    to = args.to if args.to in ("earliest", "latest") else int(args.to)
    with _open_existing(args.path, exclusive=True) as q:
        old = q._index.watermarks().get(args.group)
        new = logq.reset_group(q, args.group, to)
    _show({"group": args.group, "from": old, "to": new},
          f"group {args.group!r}: moved from offset {old} to {new}", args.json)
    return 0


def _add_operator(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("stat", help="a queue's offsets, disk use, shutdown state and consumer groups")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_stat)

    t = sub.add_parser("tail", help="print messages without consuming them")
    t.add_argument("path")
    t.add_argument("-n", type=int, default=None, help="the last N messages (default 10); with --from, at most N")
    t.add_argument("-f", "--follow", action="store_true", help="keep printing new messages as they are put")
    t.add_argument("--from", dest="from_offset", type=int, default=None, help="start at this offset")
    t.add_argument("--format", choices=("auto", "text", "hex", "base64"), default="auto",
                   help="payload as text where printable, else hex (auto, the default)")
    t.add_argument("--json", action="store_true", help="one JSON object per line")
    t.set_defaults(func=_tail)

    p = sub.add_parser("put", help="put one message per line of stdin, or one per FILE")
    p.add_argument("path")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.add_argument("--key", default=None, help="idempotency key (one message only)")
    p.add_argument("--priority", type=int, default=None)
    p.add_argument("--delay", type=float, default=None, help="seconds before the message is delivered")
    p.add_argument("--fsync", choices=logq.FSYNC_POLICIES, default="batch",
                   help="the queue's fsync policy while putting (the command flushes before it exits)")
    p.add_argument("--create", action="store_true", help="create the queue if it does not exist")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_put)

    v = sub.add_parser("verify", help="check every record's CRC; exit 1 on damage (a pre-start gate)")
    v.add_argument("path")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_verify)

    r = sub.add_parser("repair", help="quarantine damage, cut a torn tail, rebuild the index")
    r.add_argument("path")
    r.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    r.add_argument("--rebuild-index", action="store_true",
                   help="rebuild the whole index from the log (consumer groups restart at the oldest message)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=_repair)

    d = sub.add_parser("dlq", help="list, replay or purge a consumer group's dead letters")
    d.add_argument("path")
    d.add_argument("group")
    d.add_argument("action", choices=("list", "replay", "purge"))
    d.add_argument("--offset", type=int, action="append", help="only this dead letter (repeatable)")
    d.add_argument("--limit", type=int, default=None, help="list at most this many")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_dlq)

    g = sub.add_parser("group", help="list consumer groups, or reset one to an offset")
    g.add_argument("path")
    g.add_argument("action", choices=("list", "reset"))
    g.add_argument("group", nargs="?", default=None)
    g.add_argument("--to", default=None, help="OFFSET, earliest or latest")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=_group)


# -- metrics ---------------------------------------------------------------------------
def _add_metrics(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser("metrics", help="serve Prometheus metrics for a queue directory")
    m.add_argument("path", help="the queue directory")
    m.add_argument("--port", type=int, default=9464, help="TCP port (default 9464; 0: any free one, printed)")
    m.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    m.set_defaults(func=_metrics)


def _metrics(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading
    from logq import _metrics as M
    import logq.tasks  # noqa: F401  (adds the logq_task_* families)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, not {args.port}")
    if not logging.getLogger().handlers:     # what the queue's opens find (recovery, damage)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = M.serve(args.path, args.port, args.host)
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"logq metrics: serving {os.path.abspath(args.path)} at http://{host}:{port}/metrics",
          file=sys.stderr, flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
    return 0


# -- forward ---------------------------------------------------------------------------
def _add_forward(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    f = sub.add_parser("forward", help="forward a queue's messages to NATS JetStream or MQTT",
                       description="Publish every message of a consumer group upstream, acking each in "
                                   "the queue once the upstream acknowledged it.  Runs until SIGTERM or "
                                   "^C (then drains: waits for in-flight acks, commits) or, with "
                                   "--until-idle, until nothing is left.")
    f.add_argument("path", help="the queue directory")
    f.add_argument("--to", required=True, metavar="URL",
                   help="nats://HOST:PORT (JetStream) or mqtt://HOST:PORT; user:password@ allowed")
    f.add_argument("--subject", help="NATS subject to publish to (nats://)")
    f.add_argument("--stream", help="JetStream stream; created with file storage if missing "
                                    "(default: the stream that captures the subject)")
    f.add_argument("--duplicate-window", type=float, default=None, metavar="SECONDS",
                   help="the stream's duplicate window: a created stream gets it, an existing one "
                        "must have at least it (default 120)")
    f.add_argument("--topic", help="MQTT topic to publish to (mqtt://)")
    f.add_argument("--qos", type=int, default=1, help="MQTT QoS, 1 or 2 (default 1)")
    f.add_argument("--group", default="forward", help="consumer group (default 'forward')")
    f.add_argument("--window", type=int, default=None, help="publishes in flight (default 1000)")
    f.add_argument("--until-idle", action="store_true", help="return once nothing is left to forward")
    f.add_argument("--json", action="store_true", help="print the final stats as JSON")
    f.set_defaults(func=_forward)


def _forward(args: argparse.Namespace) -> int:
    from logq import forward

    options = {"group": args.group, "qos": args.qos}
    if args.window is not None:
        options["window"] = args.window
    if args.stream is not None:
        options["stream"] = args.stream
    if args.duplicate_window is not None:
        options["duplicate_window"] = args.duplicate_window
    fw = forward.Forwarder(args.path, args.to, subject=args.subject, topic=args.topic, **options)
    st = fw.run(until_idle=args.until_idle)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        keys = ("published_total", "duplicates_total", "resent_total", "reconnects_total",
                "failures_total", "breaker_opened_total", "lag", "last_error")
        print(f"forwarded to {st['target']}: " + ", ".join(f"{k} {st[k]}" for k in keys
                                                           if st[k] not in (None, 0)), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="logq", description="Operate logq queues.")
    parser.add_argument("--version", action="version", version=f"logq {logq.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from logq import bench as lb

    def typed(fn: Callable[[str], Any]) -> Callable[[str], Any]:
        """An argparse type from a parser that raises ValueError with a message."""
        def parse(text: str) -> Any:
            try:
                return fn(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        parse.__name__ = fn.__name__.strip("_")
        return parse

    def workloads(text: str) -> list[str]:
        names = list(lb.WORKLOADS) if text.strip() == "all" else [w.strip() for w in text.split(",")]
        bad = [w for w in names if w not in lb.WORKLOADS]
        if bad or not names:
            raise ValueError(f"unknown workload {', '.join(map(repr, bad or [text]))}: "
                             f"one or more of {','.join(lb.WORKLOADS)}, or all")
        return list(dict.fromkeys(names))

    class Sweep(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
                     option_string: str | None = None) -> None:
            have = list(getattr(namespace, self.dest) or [])
            if len(have) >= 2:
                parser.error("at most two --sweep options (they make a grid)")
            if value[0] in [n for n, _ in have]:
                parser.error(f"--sweep {value[0]} given twice")
            setattr(namespace, self.dest, have + [value])

    d = lb.Params()
    b = sub.add_parser("bench", help="measure throughput on a temporary queue, beside this machine's floors",
                       description="Run logq's workloads over a grid of settings on temporary queues, beside "
                       "this machine's floors measured in the same run (os.write per record, joined writes, "
                       "fdatasync, an mmap slice loop), so every figure also reads as a ratio.")
    b.add_argument("--workload", type=typed(workloads), default=list(lb.QUEUE_WORKLOADS), metavar="W[,W...]",
                   help=f"which workloads: {', '.join(lb.WORKLOADS)}, or all (default: "
                        f"{','.join(lb.QUEUE_WORKLOADS)}; tasks adds a pool run to read it beside)")
    b.add_argument("--messages", type=typed(lb.parse_int), default=d.messages, metavar="N",
                   help=f"messages per run (default {d.messages})")
    b.add_argument("--duration", type=typed(lb.parse_float), default=None, metavar="SECONDS",
                   help="stop each run after this long, if --messages has not stopped it first")
    b.add_argument("--payload", type=typed(lb.parse_size), default=d.payload, metavar="BYTES",
                   help=f"payload size, e.g. 100 or 4KiB (default {d.payload})")
    b.add_argument("--batch", type=typed(lb.parse_int), default=d.batch, metavar="N",
                   help=f"put_many / get_many size; 1 uses put() / get() (default {d.batch})")
    b.add_argument("--fsync", type=typed(lb.parse_fsync), default=d.fsync, metavar="POLICY",
                   help=f"the producers' fsync policy: always, batch or never (default {d.fsync})")
    b.add_argument("--fsync-interval", type=typed(lb.parse_float), default=d.fsync_interval,
                   metavar="SECONDS", help=f"fsync=batch: the timer (default {d.fsync_interval})")
    b.add_argument("--fsync-bytes", type=typed(lb.parse_size), default=d.fsync_bytes, metavar="BYTES",
                   help="fsync=batch: fsync once this much is unsynced (default 4MiB)")
    b.add_argument("--commit-every", type=typed(lb.parse_int), default=d.commit_every, metavar="N",
                   help=f"consumers commit every N acks... (default {d.commit_every})")
    b.add_argument("--commit-interval", type=typed(lb.parse_float), default=None, metavar="SECONDS",
                   help="...or every this many seconds (default: the library's, 1 s; the pool's, 0.2 s)")
    b.add_argument("--producers", type=typed(lb.parse_int), default=d.producers, metavar="N",
                   help=f"producer processes (default {d.producers})")
    b.add_argument("--consumers", type=typed(lb.parse_int), default=d.consumers, metavar="N",
                   help=f"consumer processes in consume and e2e (default {d.consumers})")
    b.add_argument("--workers", type=typed(lb.parse_int), default=d.workers, metavar="N",
                   help=f"worker processes in pool (default {d.workers})")
    b.add_argument("--rate", type=typed(lb.parse_float), default=None, metavar="MSGS_PER_S",
                   help="pace the producers at this many messages/s in all (default: as fast as they can)")
    b.add_argument("--sweep", type=typed(lb.parse_sweep), action=Sweep, default=None,
                   metavar="PARAM=V1,V2,...",
                   help=f"run every value; twice for a grid. PARAM: {', '.join(lb.SWEEPABLE)}")
    b.add_argument("--compare", type=typed(lb.parse_peers), default=None, metavar="PEER[,PEER...]",
                   help=f"also run produce/consume through peer queues, when installed: "
                   f"{','.join(lb.PEERS)}, or all (pip install 'logq[compare]')")
    b.add_argument("--dir", default=None,
                   help="where to make the temporary queues (default: the system temp dir)")
    b.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write the results as JSON to FILE; without FILE, print them instead of the table")
    b.add_argument("--csv", default=None, metavar="FILE", help="write the results as CSV to FILE")
    b.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw throughput and latency against the swept parameter (needs matplotlib: "
                   "pip install 'logq[plot]')")
    b.set_defaults(func=_bench)

    w = sub.add_parser("work", help="run a worker pool: HANDLER on every message of a consumer group")
    w.add_argument("path", help="the queue directory")
    w.add_argument("handler", help="module:function, importable (the current directory is on the path)")
    w.add_argument("--group", default="default", help="consumer group (default 'default')")
    w.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: CPUs)")
    w.add_argument("--max-workers", type=int, default=None, help="autoscale up to this many")
    w.add_argument("--batch-size", type=int, default=None, help="messages sent to a worker at once (default: adaptive)")
    w.add_argument("--timeout", type=float, default=None, help="seconds a message may run")
    w.add_argument("--max-attempts", type=int, default=None, help="deliveries before dead-lettering")
    w.add_argument("--until-idle", action="store_true", help="return once nothing is left to do")
    w.add_argument("--json", action="store_true", help="print the final stats as JSON")
    w.set_defaults(func=_work)

    from logq.tasks._cli import add_parsers as _add_tasks
    _add_tasks(sub)            # logq worker, logq tasks
    from logq.workflows._cli import add_to_tasks as _add_workflows
    _add_workflows(sub)        # logq tasks show/list --workflow/graph of workflows
    _add_operator(sub)
    _add_metrics(sub)
    _add_forward(sub)

    args = parser.parse_args(argv)
    if getattr(args, "messages", 1) <= 0 or getattr(args, "payload", 1) < 0:
        parser.error("--messages must be positive and --payload not negative")
    try:
        return args.func(args)
    except (logq.LogqError, ValueError, TypeError, ImportError, AttributeError, OSError) as e:
        # 2, not 1: `logq verify` says "damage" with 1, and a gate must tell them apart
        print(f"logq: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
