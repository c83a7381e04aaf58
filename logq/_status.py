"""Status files: how a process that works on a queue (a queue handle that
puts, a worker pool, a forwarder) shows its live, in-memory state to other
processes (``logq stat``, ``logq metrics``).

Each writer owns one file, ``<qdir>/status/<kind>.<name>.<pid>.json``,
replaced atomically (write a temporary file, rename) and never fsynced: it
describes a live process and means nothing after that process is gone, so
readers drop the files of dead processes.  Durable facts (offsets, backlog,
acknowledgements, dead letters, damage) are never kept here; they come from
the log and the index.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from typing import Any

from logq import _format as F

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _name(kind: str, name: str, pid: int) -> str:
    safe = _UNSAFE.sub("_", name)
    if safe != name:    # "a.b" and "a_b" must not share a file
        safe += "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{kind}.{safe}.{pid}.json"


def publish(qdir: str, kind: str, name: str, data: dict[str, Any]) -> None:
    """Replace this process's status file for (kind, name).  Best effort:
    a status file must never fail the work it describes."""
    pid = os.getpid()
    where = os.path.join(qdir, F.STATUS_DIR)
    body = dict(data, kind=kind, name=name, pid=pid, updated=time.time())
    try:
        os.makedirs(where, exist_ok=True)
        path = os.path.join(where, _name(kind, name, pid))
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(body, f, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError:
        pass


def withdraw(qdir: str, kind: str, name: str) -> None:
    """Remove this process's status file for (kind, name), if any."""
    try:
        os.unlink(os.path.join(qdir, F.STATUS_DIR, _name(kind, name, os.getpid())))
    except OSError:
        pass


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_all(qdir: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The status of every live process that published one (of ``kind``,
    if given).  Files of dead processes are removed as they are found."""
    where = os.path.join(qdir, F.STATUS_DIR)
    try:
        names = sorted(os.listdir(where))
    except FileNotFoundError:
        return []
    out = []
    for fname in names:
        parts = fname.split(".")
        if len(parts) != 4 or parts[3] != "json" or not parts[2].isdigit():
            continue
        if kind is not None and parts[0] != kind:
            continue
        path = os.path.join(where, fname)
        if not pid_alive(int(parts[2])):
            try:
                os.unlink(path)
            except OSError:
                pass
            continue
        try:
            with open(path, encoding="utf-8") as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            continue        # replaced or removed meanwhile
    return out
