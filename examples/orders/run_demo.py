"""The orders demo end to end (see README.md): a worker pool, a producer
process submitting orders, a mail-server outage in the middle, and a
dashboard of the tasks' states until every order and every email is
final (succeeded or failed).  Exit status 0 then, 1 if some were not
final within --timeout seconds.

    python run_demo.py [--orders 40] [--dir orders-demo] [--outage 2] [--timeout 120]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FINAL = ("succeeded", "failed", "cancelled")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orders", type=int, default=40)
    ap.add_argument("--dir", default="orders-demo", help="where the queue and the demo's files go (emptied)")
    ap.add_argument("--outage", type=float, default=3.0,
                    help="seconds the mail server is down, once it has sent 4 emails")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    d = os.path.abspath(args.dir)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    env = dict(os.environ, ORDERS_DIR=d, ORDERS_OUTAGE=str(args.outage))
    env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    start = time.time()
    qdir = os.path.join(d, "q")
    log = open(os.path.join(d, "worker.log"), "wb")
    worker = subprocess.Popen([sys.executable, os.path.join(HERE, "worker.py"), "--workers", str(args.workers)],
                              env=env, cwd=d, stdout=log, stderr=subprocess.STDOUT)
    sys.path.insert(0, HERE)
    os.environ["ORDERS_DIR"] = d
    import dashboard
    try:
        prod = subprocess.run([sys.executable, os.path.join(HERE, "producer.py"), "--orders", str(args.orders)],
                              env=env, cwd=d, capture_output=True, text=True, timeout=args.timeout)
        if prod.returncode != 0:
            print(prod.stderr, file=sys.stderr)
            return 1
        orders = [json.loads(line) for line in prod.stdout.splitlines() if line.strip()]
        with open(os.path.join(d, "orders.json"), "w") as f:
            json.dump(orders, f)
        print(f"submitted {len(orders)} orders from a producer process", flush=True)
        done = False
        while time.time() - start < args.timeout:
            counts = dashboard.snapshot(qdir)
            print(f"\n--- {time.time() - start:5.1f} s: logq tasks {qdir} list ---")
            print(dashboard.render(counts))
            print(dashboard.pool_line(qdir), flush=True)
            place = counts.get("orders.place", {})
            email = counts.get("orders.email", {})
            try:
                a, b = map(float, open(os.path.join(d, "mail-outage")).read().split())
                now = time.time()
                print(f"mail server: {'DOWN' if a <= now < b else 'up'} (down from {a - start:.1f} s "
                      f"to {b - start:.1f} s)", flush=True)
            except (OSError, ValueError):
                print("mail server: up", flush=True)
            placed_ok = place.get("succeeded", 0)
            if (sum(place.get(s, 0) for s in FINAL) == len(orders)
                    and sum(email.get(s, 0) for s in FINAL) == placed_ok == sum(email.values())):
                done = True
                break
            time.sleep(0.5)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()
    with open(os.path.join(d, "worker.log")) as f:
        tail = [line for line in f.read().splitlines() if "worker:" in line or "breaker" in line]
    print("\n" + "\n".join(tail[-6:]))
    try:
        with open(os.path.join(d, "reports.txt")) as f:
            reports = f.read().splitlines()
        print(f"{len(reports)} periodic report(s); the last: {reports[-1] if reports else '-'}")
    except OSError:
        print("no periodic report yet")
    print("every order and email is final" if done else f"not all final within {args.timeout:g} s")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
