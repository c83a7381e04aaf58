"""The ``logq`` command (also ``python -m logq``).  Thin: parses arguments and
calls the library."""

from __future__ import annotations

import argparse
import json
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

    args = parser.parse_args(argv)
    if getattr(args, "messages", 1) <= 0 or getattr(args, "payload", 1) < 0:
        parser.error("--messages must be positive and --payload not negative")
    try:
        return args.func(args)
    except logq.LogqError as e:
        print(f"logq: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
