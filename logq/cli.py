"""The ``logq`` command (also ``python -m logq``).  Thin: parses arguments and
calls the library."""

from __future__ import annotations

import argparse
import json
import os
import sys

import logq


def _bench(args: argparse.Namespace) -> int:
    from logq import bench

    def progress(stage: str) -> None:
        if sys.stderr.isatty():
            print(f"\r\033[K  running: {stage}", end="", file=sys.stderr, flush=True)

    results = bench.run(messages=args.messages, payload_size=args.payload, dirpath=args.dir,
                        progress=progress)
    if sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr)
    if args.json:
        print(json.dumps({"native": logq.native_enabled(), "results": bench.as_dicts(results)}, indent=2))
    else:
        codec = "native" if logq.native_enabled() else "pure-Python"
        print(f"logq {logq.__version__} ({codec} codec), {args.messages:,} messages of {args.payload} B\n")
        print(bench.format_table(results))
    return 0


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


# -- metrics (owned by the metrics module's author) ---------------------------
def _add_metrics(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("metrics", help="serve Prometheus metrics for a queue directory")
    m.add_argument("path", help="the queue directory")
    m.add_argument("--port", type=int, default=9464, help="TCP port (default 9464)")
    m.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    m.set_defaults(func=_metrics)


def _metrics(args: argparse.Namespace) -> int:
    raise NotImplementedError("logq metrics")


# -- forward (owned by the forwarder's author) ----------------------------------
def _add_forward(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("forward", help="forward a queue's messages to NATS JetStream or MQTT")
    f.add_argument("path", help="the queue directory")
    f.set_defaults(func=_forward)


def _forward(args: argparse.Namespace) -> int:
    raise NotImplementedError("logq forward")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="logq", description="Operate logq queues.")
    parser.add_argument("--version", action="version", version=f"logq {logq.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="measure throughput on a temporary queue, beside this machine's floors")
    b.add_argument("--messages", type=int, default=300_000, help="messages per workload (default 300000)")
    b.add_argument("--payload", type=int, default=100, help="payload bytes (default 100)")
    b.add_argument("--dir", default=None, help="where to make the temporary queue (default: the system temp dir)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
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

    _add_metrics(sub)
    _add_forward(sub)

    args = parser.parse_args(argv)
    if getattr(args, "messages", 1) <= 0 or getattr(args, "payload", 1) < 0:
        parser.error("--messages must be positive and --payload not negative")
    try:
        return args.func(args)
    except (logq.LogqError, ValueError, ImportError, AttributeError) as e:
        print(f"logq: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
