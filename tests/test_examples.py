"""The runnable examples run: examples/orders (the orders demo: a pool, a
producer process, a mail server outage behind the circuit breaker, a
periodic report, a dashboard from `logq tasks list`), briefly, and every
order ends succeeded or failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import helpers
from logq.tasks import App

DEMO = os.path.join(helpers.ROOT, "examples", "orders", "run_demo.py")


def test_orders_demo_every_order_ends_succeeded_or_failed(tmp_path) -> None:
    d = tmp_path / "orders"
    env = helpers.child_env(ORDERS_EMAIL_SECONDS="0.05", ORDERS_REPORT_EVERY="1")
    out = subprocess.run([sys.executable, DEMO, "--orders", "12", "--dir", str(d), "--outage", "1",
                          "--timeout", "90"], env=env, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "logq tasks" in out.stdout and "orders.place" in out.stdout     # the dashboard ran
    orders = json.load(open(d / "orders.json"))
    assert [o["order"] for o in orders] == list(range(1, 13))
    app = App(str(d / "q"))
    try:
        states = {o["order"]: app.get(o["id"]).status() for o in orders}
        assert all(st.state in ("succeeded", "failed") for st in states.values()), states
        assert states[10].state == "failed" and states[10].error["type"] == "ValueError"   # empty
        emails = [st for st in app.statuses(name="orders.email")]
        ok = [n for n, st in states.items() if st.state == "succeeded"]
        assert len(emails) == len(ok)                   # one email per order placed (the key)
        assert all(st.state in ("succeeded", "failed") for st in emails)
        sent = [json.loads(line)["order"] for line in open(d / "outbox.txt")]
        assert set(sent) <= set(ok)
        assert len(set(sent)) == sum(st.state == "succeeded" for st in emails)
        assert app.statuses(name="orders.report")       # the periodic report fired
    finally:
        app.close()
