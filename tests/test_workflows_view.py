"""Seeing workflows (issue 13): ``logq tasks show`` draws a workflow's
DAG with its tasks' states, ``list --workflow``, and ``graph --html``
writes a static page that a real headless browser (Debian's chromium,
installed by .ci/run) renders: a screenshot that is not blank, a DOM with
the node names.  The queue and the workers are real; the app is
tests/test_workflows_app.py."""

from __future__ import annotations

import contextlib
import io
import shutil
import struct
import subprocess
import zlib

import pytest

import helpers
import test_workflows_app as W
from logq import cli
from logq.workflows import DAG, chain


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished DAG with a failure in it, a chain left waiting (no worker
    after it was submitted), and a finished durable workflow."""
    a = W.app
    a.close()
    a.path = str(tmp_path_factory.mktemp("view") / "q")
    p = a.pool("test_workflows_app:app", workers=2)
    p.start()
    try:
        d = DAG()
        d.add("extract", W.add.s(1, 2))
        d.add("transform", W.double.s(), after=["extract"], pass_results=True)
        d.add("audit", W.boom.s())
        d.add("report", W.collect.s(), after=["transform", "audit"], pass_results=True,
              allow_failure=True)
        d.add("publish", W.echo.s("x"), after=["audit"])
        h = d.delay()
        assert h["report"].result(timeout=30) == [6, None]
        helpers.wait_for(lambda: h["publish"].status().state == "failed", 30, "publish to fail")
        w = W.three.start(0.0)
        assert w.result(timeout=30) == ["s0", "s1", "s2"]
    finally:
        p.stop()
    waiting = chain(W.add.s(1, 1), W.double.s()).delay()
    a.close()
    yield a.path, h, w, waiting
    a.close()


def logq_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The ``logq`` command, run in this process (its start-up costs
    seconds on a loaded machine); its exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_show_list_and_graph_text(done) -> None:
    path, h, w, waiting = done
    r = logq_cli("tasks", path, "show", h.id)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"dag {h.id}: ")
    states = {ln.split("[")[0].split()[-1]: ln.split("[")[1].split("]")[0] for ln in lines[1:]}
    assert states == {"extract": "succeeded", "transform": "succeeded", "audit": "failed",
                      "report": "succeeded", "publish": "failed"}
    assert "⇐ transform, audit" in r.stdout                    # a join drawn with its parents
    # A task of a workflow: its own status, then its workflow.
    r = logq_cli("tasks", path, "show", h["audit"].id)
    assert r.returncode == 0 and "state: failed" in r.stdout and f"dag {h.id}" in r.stdout
    r = logq_cli("tasks", path, "show", waiting.id)
    assert "[queued]" in r.stdout and "[waiting]" in r.stdout
    r = logq_cli("tasks", path, "list", "--workflow", h.id)
    assert r.returncode == 0
    assert {ln.split()[0] for ln in r.stdout.splitlines()} == {t.id for t in h.tasks}
    r = logq_cli("tasks", path, "show", w.id)                   # a durable workflow: its steps
    assert r.returncode == 0 and "0: slow_effect" in r.stdout and "end: succeeded" in r.stdout
    r = logq_cli("tasks", path, "graph", "nope")
    assert r.returncode == 2 and "neither a workflow nor a task" in r.stderr


def _png_pixels(path: str) -> tuple[int, int, bytes]:
    """Width, height and the raw (filtered) scanlines of a PNG."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat, w, h = 8, b"", 0, 0
    while at < len(data):
        n, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + n]
        if kind == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        at += 12 + n
    return w, h, zlib.decompress(idat)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed "
                    "(.ci/run installs it)")
def test_graph_html_in_a_headless_browser(done, tmp_path) -> None:
    path, h, _w, _waiting = done
    page = str(tmp_path / "graph.html")
    r = logq_cli("tasks", path, "graph", h.id, "--html", page)
    assert r.returncode == 0, r.stderr
    html = open(page, encoding="utf-8").read()
    assert "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")   # nothing fetched
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = str(tmp_path / "shot.png")
    dom = subprocess.run(browser + ["--window-size=1000,400", f"--screenshot={shot}", "--dump-dom",
                                    f"file://{page}"], capture_output=True, text=True, timeout=120).stdout
    w, hgt, raw = _png_pixels(shot)
    assert (w, hgt) == (1000, 400)
    assert len(set(raw)) > 20                       # not one flat colour: something was drawn
    for name in ("extract", "transform", "audit", "report", "publish"):
        assert f">{name}</text>" in dom
    assert dom.count('data-state="failed"') == 2 and dom.count('data-state="succeeded"') == 3


def test_purge_forgets_finished_workflows(done) -> None:
    """Last (it empties the shared queue's workflow records): finished
    graphs and durable workflows are forgotten; the waiting chain is kept."""
    from logq.tasks import TaskNotFound
    from logq.workflows import get_workflow, handle, purge
    path, h, w, waiting = done
    a = W.app
    a.path = path
    assert purge(a, older_than=3600) == 0           # too recent
    assert purge(a) == 2
    with pytest.raises(TaskNotFound):
        handle(a, h.id)
    with pytest.raises(TaskNotFound):
        get_workflow(a, w.id)
    assert handle(a, waiting.id).tasks[0].id == waiting.tasks[0].id
    assert logq_cli("tasks", path, "graph", h.id).returncode == 2
