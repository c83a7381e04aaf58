"""`logq bench`, run as a real subprocess (``python -m logq bench``) on tiny
grids: the table, JSON, CSV and PNG it writes, what it measured (every
message put was consumed and committed, the figures are positive and agree
with each other), its errors, and the peers of ``--compare``.

Nothing here looks at how fast anything was: only that the figures are
there, consistent, and checked by the harness itself."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

import helpers

FIELDS = ("name", "workload", "messages_put", "messages_consumed", "seconds", "msgs_per_s", "mb_per_s",
          "latency_p50_ms", "latency_p99_ms", "latency_p999_ms", "fsyncs", "fsyncs_per_s",
          "records_per_fsync", "commits", "cpu_percent", "rss_parent_mb", "rss_children_mb", "floor",
          "floor_msgs_per_s", "ratio", "check", "payload", "batch", "fsync", "producers", "consumers")


def bench(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "logq", "bench", *args], cwd=helpers.ROOT,
                          env=env or helpers.child_env(), capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "\r" not in proc.stderr, "a progress bar was drawn on a stderr that is not a terminal"
    return proc


def check_result(r: dict, messages: int) -> None:
    """One run's figures: present, positive, and consistent with each other."""
    for f in FIELDS:
        assert f in r, f"{r['name']}: no {f!r}"
    assert r["check"] == "ok", f"{r['name']}: {r['check']}"
    assert r["system"] == "logq"
    assert r["messages_put"] == messages
    if r["workload"] == "produce":
        assert r["messages_consumed"] == 0
        n = r["messages_put"]
    else:
        assert r["messages_consumed"] == r["messages_put"], r
        n = r["messages_consumed"]
    assert r["seconds"] > 0 and r["msgs_per_s"] > 0
    assert math.isclose(r["msgs_per_s"], n / r["seconds"], rel_tol=1e-6)
    assert math.isclose(r["mb_per_s"], r["msgs_per_s"] * r["payload"] / 1e6, rel_tol=1e-6)
    assert r["floor"] and r["floor_msgs_per_s"] > 0
    assert math.isclose(r["ratio"], r["msgs_per_s"] / r["floor_msgs_per_s"], rel_tol=1e-6)
    assert r["cpu_percent"] > 0
    assert r["rss_parent_mb"] > 0 and r["rss_children_mb"] > 0
    assert r["fsyncs"] >= 0 and r["fsyncs_per_s"] >= 0
    if r["fsync"] == "always" and r["workload"] != "consume":
        # an fdatasync per put() or put_many(), or fewer (group commit): 1 to batch records each
        assert r["fsyncs"] >= 1
        assert 1 <= r["records_per_fsync"] <= r["batch"] * r["producers"] + 1e-9, r
    if r["workload"] == "consume":
        assert r["fsyncs"] == 0       # (the queue was filled before the clock started)
    if r["fsyncs"]:
        assert r["records_per_fsync"] >= 1
        assert math.isclose(r["records_per_fsync"], r["messages_put"] / r["fsyncs"], rel_tol=1e-6)
    else:
        assert r["records_per_fsync"] is None
    if r["workload"] in ("e2e", "pool"):
        assert r["commits"] >= 1
        assert 0 < r["latency_p50_ms"] <= r["latency_p99_ms"] <= r["latency_p999_ms"]
        assert r["latency_samples"] == n
    else:
        assert r["latency_p50_ms"] is None
        assert (r["commits"] >= 1) == (r["workload"] == "consume")


def test_grid_json_and_csv(tmp_path):
    """A 2 x 2 grid over two workloads: one result per grid point, in
    order, with every promised field; the CSV holds the same rows."""
    j, c = tmp_path / "out.json", tmp_path / "out.csv"
    n = 2000
    proc = ok(bench("--workload", "produce,e2e", "--sweep", "batch=1,100", "--sweep", "fsync=always,batch",
                    "--messages", str(n), "--json", str(j), "--csv", str(c)))
    doc = json.loads(j.read_text())
    assert doc["native"] in (True, False) and doc["logq_version"]
    assert doc["sweep"] == {"batch": [1, 100], "fsync": ["always", "batch"]}
    fl = doc["floors"]
    assert fl["fdatasync_s"] > 0 and fl["by_payload"][0]["payload"] == 100
    for k in ("write", "joined", "slices"):
        assert fl["by_payload"][0][k] > 0
    results = doc["results"]
    grid = [(w, b, f) for w in ("produce", "e2e") for b in (1, 100) for f in ("always", "batch")]
    assert [(r["workload"], r["batch"], r["fsync"]) for r in results] == grid
    for r in results:
        check_result(r, n)
    assert doc["peers"] == []

    with open(c, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["name"] for row in rows] == [r["name"] for r in results]
    for row, r in zip(rows, results):
        assert row["system"] == "logq"
        assert float(row["msgs_per_s"]) == pytest.approx(r["msgs_per_s"])
        assert int(row["messages_put"]) == r["messages_put"]
        assert row["fsync"] == r["fsync"] and int(row["batch"]) == r["batch"]

    # the table: the floors, then a row per grid point
    out = proc.stdout
    assert "floors (same run)" in out and "fdatasync" in out and "os.write per record" in out
    table = [line for line in out.splitlines() if line.split()[:1] in (["produce"], ["e2e"])]
    assert len(table) == len(grid)
    assert all(line.rstrip().endswith("ok") for line in table)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib is not installed (pip install -e '.[test]')")
def test_plot_and_json_on_stdout(tmp_path):
    """The pool workload; ``--plot`` writes a PNG made by matplotlib;
    ``--json`` without a file prints the JSON (with the fields the earlier
    harness had) instead of the table."""
    png = tmp_path / "tuning.png"
    proc = ok(bench("--workload", "e2e,pool", "--sweep", "commit_every=10,1000", "--messages", "1000",
                    "--plot", str(png), "--json"))
    doc = json.loads(proc.stdout)
    assert [(r["workload"], r["commit_every"]) for r in doc["results"]] == \
        [("e2e", 10), ("e2e", 1000), ("pool", 10), ("pool", 1000)]
    for r in doc["results"]:
        for k in ("name", "msgs_per_s", "mb_per_s", "floor", "floor_msgs_per_s", "ratio"):
            assert k in r
        check_result(r, 1000)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 600 and height >= 300
    assert b"Matplotlib" in data          # its tEXt "Software" chunk
    assert data.rstrip(b"\0")[-8:-4] == b"IEND"


@pytest.mark.parametrize("args, says", [
    (["--sweep", "batch"], "PARAM=v1,v2"),
    (["--sweep", "nosuch=1,2"], "unknown parameter 'nosuch'"),
    (["--sweep", "batch=1,x"], "not an integer: 'x'"),
    (["--sweep", "batch=0"], "batch must be an integer >= 1"),
    (["--sweep", "fsync=always,sometimes"], "not an fsync policy: 'sometimes'"),
    (["--sweep", "batch=1,1"], "repeated"),
    (["--sweep", "batch=1,2", "--sweep", "batch=3"], "--sweep batch given twice"),
    (["--sweep", "batch=1", "--sweep", "fsync=never", "--sweep", "payload=1"], "at most two --sweep"),
    (["--workload", "produce,nope"], "unknown workload 'nope'"),
    (["--compare", "kafka"], "unknown peer 'kafka'"),
])
def test_bad_arguments(args, says):
    """Usage errors say what is wrong, exit 2, and run nothing."""
    proc = bench(*args, "--messages", "100", timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert says in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_bad_value_outside_a_sweep(tmp_path):
    """A bad plain option is refused before anything runs, too."""
    proc = bench("--batch", "0", "--messages", "100", timeout=60)
    assert proc.returncode != 0 and "batch must be an integer >= 1" in proc.stderr
    proc = bench("--dir", str(tmp_path / "missing"), "--messages", "100", timeout=60)
    assert proc.returncode != 0 and "not a directory" in proc.stderr


def test_compare_installed_and_missing_peers(tmp_path):
    """An installed peer runs the produce/consume workload beside logq, at
    a durability setting the table states; a peer that cannot be imported
    is reported as not installed, and the run still succeeds.  (The missing
    one is made so by a module on PYTHONPATH that raises ImportError.)"""
    from logq import bench as LB
    hidden = "queuelib"
    installed = [name for name, pe in LB.PEERS.items()
                 if name != hidden and importlib.util.find_spec(pe.module) is not None]
    if not installed:
        pytest.skip("no peer queue installed (pip install -e '.[test]' brings diskcache)")
    peer = installed[0]
    shim = tmp_path / "shim" / LB.PEERS[hidden].module
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('hidden by test_cli_bench')\n")
    env = helpers.child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(shim.parent), env["PYTHONPATH"]])
    j = tmp_path / "out.json"
    proc = ok(bench("--workload", "produce,consume", "--messages", "300", "--fsync", "always",
                    "--compare", f"{peer},{hidden}", "--json", str(j), env=env))
    doc = json.loads(j.read_text())
    for r in doc["results"]:
        check_result(r, 300)
    rows = {(p["peer"], p["workload"]): p for p in doc["peers"]}
    assert set(rows) == {(peer, "produce"), (peer, "consume"), (hidden, "-")}
    for phase in ("produce", "consume"):
        p = rows[(peer, phase)]
        assert p["installed"] and p["messages"] == 300 and p["msgs_per_s"] > 0
        assert p["fsync"] == "always" and p["durability"]
        assert p["floor_msgs_per_s"] > 0 and p["logq_vs_peer"] > 0
    assert rows[(peer, "produce")]["durability"] in proc.stdout
    gone = rows[(hidden, "-")]
    assert not gone["installed"] and "not installed" in gone["note"] and "hidden by test_cli_bench" in gone["note"]
    line = next(x for x in proc.stdout.splitlines() if x.startswith(hidden))
    assert "not installed" in line
