"""The orders demo's tasks (see README.md): a shop takes orders, charges
them, and sends a confirmation email through a mail server that is slow
and sometimes down.

Everything lives under one directory, ``$ORDERS_DIR`` (default
``./orders-demo``): the queue (``q/``), the mail server's outage window
(``mail-outage``), the emails it accepted (``outbox.txt``) and the
periodic reports (``reports.txt``).
"""

from __future__ import annotations

import json
import os
import random
import time
from datetime import timedelta

from logq.tasks import App

DIR = os.path.abspath(os.environ.get("ORDERS_DIR", "orders-demo"))
EMAIL_SECONDS = float(os.environ.get("ORDERS_EMAIL_SECONDS", "0.2"))   # the slow mail server
FLAKY = float(os.environ.get("ORDERS_FLAKY", "0.2"))                   # its random failure rate
REPORT_EVERY = float(os.environ.get("ORDERS_REPORT_EVERY", "2"))
OUTAGE = float(os.environ.get("ORDERS_OUTAGE", "3"))        # seconds the mail server is down...
OUTAGE_AFTER = int(os.environ.get("ORDERS_OUTAGE_AFTER", "4"))  # ...once it has sent this many emails

app = App(os.path.join(DIR, "q"))


class MailServerDown(ConnectionError):
    """The mail server did not take the message (worth a retry)."""


def _outage() -> tuple[float, float]:
    """The outage window ("start end", epoch seconds, in ``mail-outage``):
    it begins once the server has sent OUTAGE_AFTER emails (the file is
    created once, by whichever worker sees that first)."""
    path = os.path.join(DIR, "mail-outage")
    try:
        start, end = map(float, open(path).read().split())
        return start, end
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(DIR, "outbox.txt")) as f:
            sent = sum(1 for _ in f)
    except OSError:
        sent = 0
    if OUTAGE <= 0 or sent < OUTAGE_AFTER:
        return 0.0, 0.0
    now = time.time()
    try:
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return 0.0, 0.0         # another worker is writing it
    os.write(fd, f"{now} {now + OUTAGE}".encode())
    os.close(fd)
    os.rename(path + ".tmp", path)
    return now, now + OUTAGE


def mail_server_send(order_id: int, text: str) -> None:
    """The flaky dependency: slow, failing at random, and down for a while
    after its first few emails (``_outage``)."""
    time.sleep(EMAIL_SECONDS)
    start, end = _outage()
    if start <= time.time() < end:
        raise MailServerDown("mail server unreachable (outage)")
    if random.random() < FLAKY:
        raise MailServerDown("mail server timed out")
    with open(os.path.join(DIR, "outbox.txt"), "a") as f:
        f.write(json.dumps({"order": order_id, "text": text}) + "\n")


@app.task(name="orders.place", retries=2, retry_on=(ConnectionError,))
def place_order(order_id: int, items: list[list]) -> dict:
    """Check and charge an order, then submit its confirmation email.  An
    empty order is refused (ValueError: not retried, so it fails for good
    and waits in the dead letters)."""
    if not items:
        raise ValueError(f"order {order_id} has no items")
    total = round(sum(qty * price for _sku, qty, price in items), 2)
    # The key makes the email idempotent: if this task runs again (its
    # worker was killed after this line), no second email is submitted.
    send_email.apply_async(args=(order_id, total), key=f"email:{order_id}")
    return {"order": order_id, "total": total}


@app.task(name="orders.email", retries=5, retry_on=(MailServerDown,), timeout=30)
def send_email(order_id: int, total: float) -> str:
    """Send the confirmation: retried with backoff while the mail server
    fails; a burst of failures opens the pool's circuit breaker."""
    mail_server_send(order_id, f"Thank you for order {order_id}: {total:.2f} EUR")
    return f"sent confirmation of order {order_id}"


@app.periodic(every=timedelta(seconds=REPORT_EVERY), name="orders.report", retries=0)
def report(slot: float) -> dict:
    """Every few seconds (each slot exactly once, however many workers run
    the scheduler): how many orders and emails are in each state."""
    counts: dict[str, dict[str, int]] = {}
    for st in app.statuses():
        if st.name in ("orders.place", "orders.email"):
            d = counts.setdefault(st.name, {})
            d[st.state] = d.get(st.state, 0) + 1
    with open(os.path.join(DIR, "reports.txt"), "a") as f:
        f.write(json.dumps({"slot": slot, "counts": counts}) + "\n")
    return counts
