"""Handlers for the worker-pool tests (tests/test_pool.py), importable by
the pool's worker processes (forkserver or spawn: a fresh interpreter
imports this module by name; the tests directory is on its sys.path).

Every message says what to do with it.  Its data is ``CTL \\0 PAYLOAD``:
``CTL`` is a control directory (the handler's log and marker files live
there; environment variables would not do, a forkserver's workers inherit
the environment the fork server was started with, not the pool's), and
``PAYLOAD`` is ``helpers.payload(tag, i)``, checked with ``identity``.  The
tag names the behaviour:

* ``ok``: succeed;
* ``slowN``: sleep N milliseconds, then succeed;
* ``raise``: raise ``ValueError("boom OFFSET attempt A")`` every time;
* ``hang``: sleep forever (until the pool's timeout kills the worker);
* ``killN``: SIGKILL its own worker process at attempt N or lower (so
  ``kill1`` dies on first delivery only), then succeed;
* ``outN``: sleep N ms, then fail while the file ``CTL/outage`` exists (a
  downstream outage), succeed otherwise;
* ``poison``: (batch mode) fail the whole batch it is in.

The log, ``CTL/log``, gets one line per event, ``event pid offset attempt
t`` (t is time.monotonic(): the same clock in every process), written with
one ``os.write`` each (a SIGKILL keeps the page cache; a last line without
its newline was cut and is ignored by the reader):

* ``start`` before the handler works on the message;
* ``done`` when it finished successfully (fsynced: the handler "committed"
  its side effect);
* ``fail`` just before it raises;
* ``kill`` just before it SIGKILLs itself; ``hang`` before it hangs.

In batch mode (``handle_batch``) the line ``batch pid t OFF:ATTEMPT,...``
is written first for each call (``notalist`` instead when the handler did
not get a list), then the per-message lines.
"""

from __future__ import annotations

import os
import re
import signal
import time

from helpers import identity

_fds: dict[str, int] = {}
_TAG = re.compile(r"([a-z]+)(\d*)$")


def message_data(ctl: str, payload: bytes) -> bytes:
    return ctl.encode() + b"\0" + payload


def _split(data: bytes) -> tuple[str, str, int]:
    """(ctl dir, behaviour, number) of a message's data; checks the payload."""
    ctl, _, payload = data.partition(b"\0")
    tag, _i = identity(payload)
    m = _TAG.match(tag)
    assert m, f"unknown tag {tag!r}"
    return ctl.decode(), m.group(1), int(m.group(2) or 0)


def _log(ctl: str, text: str, sync: bool = False) -> None:
    fd = _fds.get(ctl)
    if fd is None:
        fd = _fds[ctl] = os.open(os.path.join(ctl, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, text.encode())
    if sync:
        os.fsync(fd)


def _event(ctl: str, event: str, m, sync: bool = False) -> None:
    _log(ctl, f"{event} {os.getpid()} {m.offset} {m.attempt} {time.monotonic():.6f}\n", sync)


def _one(m, ctl: str, what: str, n: int) -> None:
    _event(ctl, "start", m)
    if what == "slow":
        time.sleep(n / 1000)
    elif what == "raise":
        _event(ctl, "fail", m)
        raise ValueError(f"boom {m.offset} attempt {m.attempt}")
    elif what == "hang":
        _event(ctl, "hang", m)
        while True:
            time.sleep(60)
    elif what == "kill" and m.attempt <= n:
        _event(ctl, "kill", m, sync=True)
        os.kill(os.getpid(), signal.SIGKILL)
    elif what == "out":
        time.sleep(n / 1000)
        if os.path.exists(os.path.join(ctl, "outage")):
            _event(ctl, "fail", m)
            raise ConnectionError(f"downstream unavailable (offset {m.offset})")
    elif what not in ("ok", "kill", "poison"):
        raise AssertionError(f"unknown behaviour {what!r}")
    _event(ctl, "done", m, sync=True)


def handle(m) -> None:
    """The per-message handler (``pool_handlers:handle``)."""
    ctl, what, n = _split(m.data)
    _one(m, ctl, what, n)


def handle_batch(msgs) -> None:
    """The batch handler (``batch=True``): log the batch, fail all of it
    when it holds a ``poison`` message, else handle each in turn."""
    if not isinstance(msgs, list):
        ctl = _split(msgs.data)[0]
        _log(ctl, f"notalist {os.getpid()} {type(msgs).__name__}\n", sync=True)
        raise TypeError(f"batch handler got a {type(msgs).__name__}")
    parsed = [_split(m.data) for m in msgs]
    ctl = parsed[0][0]
    _log(ctl, f"batch {os.getpid()} {time.monotonic():.6f} "
              f"{','.join(f'{m.offset}:{m.attempt}' for m in msgs)}\n", sync=True)
    poisoned = [m.offset for m, (_, what, _n) in zip(msgs, parsed) if what == "poison"]
    if poisoned:
        _log(ctl, f"batchfail {os.getpid()} {','.join(map(str, poisoned))}\n", sync=True)
        raise RuntimeError(f"poison message(s) {poisoned} in the batch")
    for m, (c, what, n) in zip(msgs, parsed):
        _one(m, c, what, n)
