"""`logq tasks PATH list|show|cancel|retry|purge` and `logq worker`, as a
user runs them (real processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import helpers
import task_app
from logq.tasks import TaskFailed


def logq_cmd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "logq", *args], capture_output=True, text=True,
                          env=helpers.child_env(), cwd=helpers.TESTS, timeout=timeout)


def test_list_show_cancel_retry_purge(app, tmp_path) -> None:
    ok = task_app.add.delay(1, 2)
    bad = task_app.bad.delay()
    later = task_app.add.apply_async(args=(3, 4), delay=3600)
    app.close()
    r = logq_cmd("tasks", app.path, "list", "--json")
    assert r.returncode == 0, r.stderr
    assert {d["id"]: d["state"] for d in json.loads(r.stdout)} == {
        ok.id: "queued", bad.id: "queued", later.id: "scheduled"}
    r = logq_cmd("tasks", app.path, "cancel", later.id)
    assert r.returncode == 0 and "cancelled" in r.stdout
    # run what is there with `logq worker`, until idle
    w = subprocess.run([sys.executable, "-c",
                        "import sys, task_app; task_app.app.path = sys.argv[1]; "
                        "from logq.cli import main; sys.exit(main(['worker', 'task_app:app', "
                        "'--workers', '2', '--until-idle']))", app.path],
                       env=helpers.child_env(), cwd=helpers.TESTS, capture_output=True, text=True,
                       timeout=120)
    assert w.returncode == 0, w.stderr
    assert ok.result(timeout=10) == 3
    with pytest.raises(TaskFailed):
        bad.result(timeout=10)
    app.close()
    r = logq_cmd("tasks", app.path, "list", "--status", "failed")
    assert r.returncode == 0 and bad.id in r.stdout and ok.id not in r.stdout
    r = logq_cmd("tasks", app.path, "show", bad.id)
    assert "failed" in r.stdout and "ValueError: not retried" in r.stdout and "Traceback" in r.stdout
    r = logq_cmd("tasks", app.path, "retry", bad.id, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "queued"
    r = logq_cmd("tasks", app.path, "show", "nope-12")
    assert r.returncode == 2 and "not a task id" in r.stderr
    r = logq_cmd("tasks", app.path, "purge", "--status", "succeeded", "--older-than", "1d")
    assert r.returncode == 0 and "purged 0" in r.stderr
    r = logq_cmd("tasks", app.path, "purge", "--status", "succeeded", "--older-than", "0")
    assert r.returncode == 0 and "purged 1" in r.stderr
    r = logq_cmd("tasks", app.path, "list", "--json")
    ids = {d["id"]: d["state"] for d in json.loads(r.stdout)}
    assert ok.id not in ids and ids[bad.id] == "queued" and ids[later.id] == "cancelled"
