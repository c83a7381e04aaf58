"""A dashboard of the tasks' states, from ``logq tasks PATH list --json``
(run by itself: refreshes every second until Ctrl-C)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

STATES = ("scheduled", "queued", "running", "retrying", "succeeded", "failed", "cancelled")


def snapshot(qdir: str) -> dict[str, dict[str, int]]:
    """name -> state -> count, as `logq tasks QDIR list --json` reports."""
    out = subprocess.run([sys.executable, "-m", "logq", "tasks", qdir, "list", "--json"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"logq tasks list failed: {out.stderr.strip()}")
    counts: dict[str, dict[str, int]] = {}
    for t in json.loads(out.stdout):
        d = counts.setdefault(t["name"], {})
        d[t["state"]] = d.get(t["state"], 0) + 1
    return counts


def pool_line(qdir: str) -> str:
    """The pools working on the queue, as `logq stat QDIR --json` reports
    them (workers, in flight, circuit breaker)."""
    out = subprocess.run([sys.executable, "-m", "logq", "stat", qdir, "--json"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return f"logq stat failed: {out.stderr.strip()}"
    pools = [s for s in json.loads(out.stdout).get("live", []) if s.get("kind") == "pool"]
    return "; ".join(f"pool pid {p['pid']}: {p.get('workers')} workers, {p.get('in_flight')} in flight, "
                     f"breaker {p.get('breaker')} (opened {p.get('breaker_opened', 0)}x)"
                     for p in pools) or "pool: not reporting yet"


def render(counts: dict[str, dict[str, int]]) -> str:
    lines = [f"{'task':<16}" + "".join(f"{s:>11}" for s in STATES)]
    for name in sorted(counts):
        lines.append(f"{name:<16}" + "".join(f"{counts[name].get(s, 0):>11}" for s in STATES))
    return "\n".join(lines)


def main() -> None:
    qdir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("ORDERS_DIR", "orders-demo"), "q")
    while True:
        print(time.strftime("%H:%M:%S"))
        print(render(snapshot(qdir)))
        print(pool_line(qdir), flush=True)
        time.sleep(1.0)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
