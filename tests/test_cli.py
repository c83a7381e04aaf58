"""The operator's commands, each run as a real ``logq`` subprocess on real
queues (``python -m logq``), with ``--json`` output parsed: stat, tail,
put, verify, repair, dlq and group.

Damage is made by editing segment bytes on a closed queue of single-record
puts (so every record stands alone, with no batch framing around it):
``verify`` must find exactly the injected ranges and exit 1; ``repair
--dry-run`` must change nothing; ``repair`` must leave a queue that
verifies clean and still serves every intact record, with the damaged
bytes kept in quarantine; and a second ``verify`` reports the ranges as
known losses.  ``verify`` of a queue that a live process is writing to must
never report damage.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import logq
from helpers import Child, children, child_env, deadline, identity, payload, record_map, write_at
from logq import _format as F

N = 300
TAG = "c"


def logq_cmd(*args: object, input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "logq", *map(str, args)], input=input,
                          capture_output=True, timeout=timeout, env=child_env())


def ok_json(*args: object, input: bytes | None = None, rc: int = 0) -> object:
    r = logq_cmd(*args, "--json", input=input)
    assert r.returncode == rc, f"logq {args} exited {r.returncode}:\n{r.stdout.decode()}\n{r.stderr.decode()}"
    return json.loads(r.stdout)


def build(qdir: str, n: int = N) -> list[bytes]:
    """A closed queue of n single-record puts over many 4 KiB segments."""
    items = [payload(TAG, i) for i in range(n)]
    with logq.open(qdir, segment_bytes=4096) as q:
        for it in items:
            q.put(it)
    return items


def digest(qdir: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(qdir)):
        if F.parse_segment_name(name) is not None:
            with open(os.path.join(qdir, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


# -- put, tail, stat ------------------------------------------------------------
def test_put_tail_stat(tmp_path):
    q = str(tmp_path / "q")
    r = logq_cmd("put", q, input=b"one\n")
    assert r.returncode == 2 and b"no such queue" in r.stderr, "put must not create a queue unasked"
    out = ok_json("put", q, "--create", input=b"hello\nworld\n\x00\xffbin\n")
    assert out == {"count": 3, "first_offset": 0, "last_offset": 2}
    f1, f2 = tmp_path / "a.bin", tmp_path / "b.txt"
    f1.write_bytes(b"\x01\x02\x03" * 1000)
    f2.write_bytes(b"line1\nline2\n")
    assert ok_json("put", q, f1, f2) == {"count": 2, "first_offset": 3, "last_offset": 4}
    # --key: a second put with the same key stores nothing (idempotent producer)
    k1 = ok_json("put", q, "--key", "order-7", input=b"keyed\n")
    k2 = ok_json("put", q, "--key", "order-7", input=b"keyed\n")
    assert k1["first_offset"] == k2["first_offset"] == 5
    r = logq_cmd("put", q, "--key", "k", input=b"a\nb\n")
    assert r.returncode == 2 and b"--key" in r.stderr

    with logq.open(q) as qq:
        assert qq.read(3) == b"\x01\x02\x03" * 1000 and qq.read(4) == b"line1\nline2\n"
        assert len(qq) == 6

    r = logq_cmd("tail", q, "-n", "3")
    lines = r.stdout.decode().splitlines()
    assert r.returncode == 0 and [ln.split("\t")[0] for ln in lines] == ["3", "4", "5"]
    assert lines[0].split("\t")[2].startswith("hex:010203") and lines[2].endswith("\tkeyed")
    rows = [json.loads(ln) for ln in logq_cmd("tail", q, "--from", "1", "-n", "2", "--json").stdout.splitlines()]
    assert [(x["offset"], x.get("text"), x.get("hex")) for x in rows] == [(1, "world", None), (2, None, "00ff62696e")]
    rows = [json.loads(ln) for ln in
            logq_cmd("tail", q, "--from", "0", "--json", "--format", "base64").stdout.splitlines()]
    import base64
    assert [base64.b64decode(x["base64"]) for x in rows][:3] == [b"hello", b"world", b"\x00\xffbin"]
    assert len(rows) == 6

    st = ok_json("stat", q)
    with logq.open(q) as qq:
        mine = qq.stats()
    for k in ("queue_id", "first_offset", "next_offset", "messages", "segments", "lost_records"):
        assert st[k] == mine[k], k
    assert st["last_shutdown_clean"] is True and st["processes_open"] == []
    text = logq_cmd("stat", q).stdout.decode()
    assert "offsets   0 .. 6" in text and "shutdown  clean" in text


def test_tail_follow_prints_new_puts_and_stops_on_sigterm(tmp_path):
    q = str(tmp_path / "q")
    with logq.open(q) as qq:
        qq.put(b"before")
    proc = subprocess.Popen([sys.executable, "-m", "logq", "tail", q, "-f", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    try:
        with deadline(30, "tail -f"):
            first = json.loads(proc.stdout.readline())
            assert first["text"] == "before"
            with logq.open(q) as qq:
                qq.put_many([b"n%d" % i for i in range(5)])
            got = [json.loads(proc.stdout.readline())["text"] for _ in range(5)]
            assert got == [f"n{i}" for i in range(5)]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_stat_after_a_crash_says_unclean(tmp_path):
    q = str(tmp_path / "q")
    code = ("import logq, os, sys\nq = logq.open(sys.argv[1], fsync='always')\n"
            "q.put_many([b'x'] * 100)\nos.kill(os.getpid(), 9)")
    r = subprocess.run([sys.executable, "-c", code, q], env=child_env(), timeout=60)
    assert r.returncode == -signal.SIGKILL
    st = ok_json("stat", q)
    assert st["last_shutdown_clean"] is False and st["next_offset"] == 100


# -- verify and repair -----------------------------------------------------------
def inject(qdir: str) -> tuple[set[int], int]:
    """Damage record 40 (one byte of payload) and three records from 150 on
    (garbage over them, in the middle of a sealed segment), and leave a
    torn record after the tail.  Returns (offsets destroyed, bytes of torn
    tail)."""
    rm = record_map(qdir)
    path, pos, end = rm[40]
    with open(path, "rb") as f:
        f.seek(end - 1)
        last = f.read(1)
    write_at(path, end - 1, bytes([last[0] ^ 0x5A]))
    k = next(k for k in range(150, 200) if rm[k - 1][0] == rm[k][0] == rm[k + 3][0])
    path, a, _ = rm[k]
    _, _, b = rm[k + 2]
    write_at(path, a + 2, b"\x7f" * (b - a - 4))
    tail_path, _, tail_end = rm[N - 1]
    write_at(tail_path, tail_end, b"\x91" * 50)
    return {40, k, k + 1, k + 2}, 50


def lost_offsets(rep: dict, known: bool | None = None) -> set[int]:
    out = set()
    for d in rep["damage"]:
        if known is None or d["known"] == known:
            out.update(range(d["first_offset"], d["end_offset"]))
    return out


def test_verify_repair_verify(tmp_path, caplog):
    q = str(tmp_path / "q")
    build(q)
    ok_clean = ok_json("verify", q)
    assert ok_clean["clean"] and ok_clean["damage"] == [] and ok_clean["records"] == N

    destroyed, torn = inject(q)
    rep = ok_json("verify", q, rc=1)
    assert lost_offsets(rep) == destroyed and not rep["clean"]
    assert all(d["kind"] == "records" and not d["known"] for d in rep["damage"])
    assert rep["torn_tail"]["end"] - rep["torn_tail"]["start"] == torn
    assert rep["records"] == N - len(destroyed) and rep["next_offset"] == N
    text = logq_cmd("verify", q)
    k = min(destroyed - {40})
    assert text.returncode == 1 and b"offsets 40..40 (1)" in text.stdout
    assert f"offsets {k}..{k + 2} (3)".encode() in text.stdout

    before = digest(q)
    dry = ok_json("repair", q, "--dry-run")
    assert dry["dry_run"] and len(dry["actions"]) == 4, dry["actions"]
    assert digest(q) == before, "repair --dry-run changed the log"
    assert not os.path.exists(os.path.join(q, F.QUARANTINE_DIR, F.QUARANTINE_MANIFEST))

    fixed = ok_json("repair", q)
    assert fixed["after"]["clean"], fixed
    assert lost_offsets(fixed["after"], known=True) == destroyed
    again = ok_json("verify", q)
    assert again["clean"] and again["torn_tail"] is None and lost_offsets(again, known=True) == destroyed

    # every intact record is still served, at its offset, intact; meeting
    # the losses that repair recorded is no longer an error
    caplog.set_level("DEBUG", logger="logq")
    with logq.open(q) as qq:
        got = dict(qq.scan())
        assert set(got) == set(range(N)) - destroyed
        for off, data in got.items():
            assert identity(data) == (TAG, off)
        with pytest.raises(logq.RecordLostError):
            qq.read(40)
        assert qq.put(b"after repair") == N
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert "given up earlier" in caplog.text
    # the damaged bytes were kept aside, and the manifest says what they held
    qdir = os.path.join(q, F.QUARANTINE_DIR)
    manifest = [json.loads(ln) for ln in open(os.path.join(qdir, F.QUARANTINE_MANIFEST))]
    assert {(m["first_offset"], m["end_offset"]) for m in manifest} == {(40, 41), (k, k + 3)}
    for m in manifest:
        kept = open(os.path.join(qdir, m["file"]), "rb").read()
        assert len(kept) == m["end"] - m["start"] and kept.strip(b"\0")
    torn_files = [n for n in os.listdir(qdir) if ".torn." in n]
    assert len(torn_files) == 1 and open(os.path.join(qdir, torn_files[0]), "rb").read() == b"\x91" * torn


def test_repair_keeps_group_state_and_consumers_skip_the_loss(tmp_path):
    q = str(tmp_path / "q")
    build(q)
    with logq.open(q) as qq:
        c = qq.consumer("g")
        ms = c.get_many(30, timeout=1)
        c.ack_many(ms)
        c.close()
    destroyed, _ = inject(q)
    assert ok_json("repair", q)["after"]["clean"]
    with logq.open(q) as qq:
        assert qq.stats()["groups"]["g"]["watermark"] == 30
        c = qq.consumer("g")
        seen = []
        while True:
            got = c.get_many(100, timeout=0.2)
            if not got:
                break
            seen += [m.offset for m in got]
            c.ack_many(got)
        c.close()
    assert seen == [o for o in range(30, N) if o not in destroyed]


def test_verify_and_repair_a_damaged_index(tmp_path):
    q = str(tmp_path / "q")
    build(q, 50)
    data = os.path.join(q, F.INDEX_DIR, "data.mdb")
    with open(data, "r+b") as f:
        f.truncate(4096 + 100)
    rep = ok_json("verify", q, rc=1)
    assert rep["index"].startswith("damaged") and rep["damage"] == []
    fixed = ok_json("repair", q)
    assert any("index" in a and "quarantine" in a for a in fixed["actions"])
    assert fixed["after"]["clean"] and fixed["after"]["index"] == "ok"
    with logq.open(q) as qq:
        assert [identity(d)[1] for _, d in qq.scan()] == list(range(50))


def test_verify_finds_a_bad_segment_header_and_repair_rewrites_it(tmp_path):
    q = str(tmp_path / "q")
    build(q, 100)
    second = sorted(n for n in os.listdir(q) if F.parse_segment_name(n) is not None)[1]
    write_at(os.path.join(q, second), 0, b"XOGQSEG\x00")
    rep = ok_json("verify", q, rc=1)
    assert [(d["segment"], d["kind"]) for d in rep["damage"]] == [(second, "header")]
    assert lost_offsets(rep) == set()
    assert ok_json("repair", q)["after"]["clean"]
    with logq.open(q) as qq:
        assert [identity(d)[1] for _, d in qq.scan()] == list(range(100))


def test_verify_while_a_writer_appends_reports_no_damage(tmp_path):
    """The newest segment of a queue in use is checked only up to the tail
    its writers have published: a record being copied is not damage."""
    q = str(tmp_path / "q")
    build(q, 10)
    code = ("import logq, sys, time\nq = logq.open(sys.argv[1], segment_bytes=4096)\n"
            "print('ready', flush=True)\nwhile True:\n    q.put_many([b'w' * 300] * 7)\n")
    with children() as kids:
        kid = Child(code, str(tmp_path / "writer.log"), q)
        kids.append(kid)
        with deadline(30, "the writer to start"):
            while "ready" not in kid.output():
                time.sleep(0.01)
        for _ in range(5):
            rep = ok_json("verify", q)
            assert rep["in_use"] and rep["clean"] and rep["damage"] == [], rep
            assert rep["torn_tail"] is None
        r = logq_cmd("repair", q)
        assert r.returncode == 2 and str(kid.pid).encode() in r.stderr, r.stderr
        r = logq_cmd("group", q, "reset", "g", "--to", "earliest")
        assert r.returncode == 2 and b"open in another process" in r.stderr
    assert ok_json("verify", q)["clean"]


def test_verify_and_repair_errors(tmp_path):
    r = logq_cmd("verify", tmp_path / "none")
    assert r.returncode == 2 and b"no such queue directory" in r.stderr
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_bytes(b"")
    for cmd in ("verify", "repair", "stat", "tail"):
        r = logq_cmd(cmd, tmp_path / "foreign")
        assert r.returncode == 2 and b"not a logq queue" in r.stderr, (cmd, r.stderr)
        assert os.listdir(tmp_path / "foreign") == ["x"], f"{cmd} wrote into a foreign directory"


# -- dead letters and groups ------------------------------------------------------
def test_dlq_and_group(tmp_path):
    q = str(tmp_path / "q")
    with logq.open(q) as qq:
        qq.put_many([b"m%d" % i for i in range(10)])
        c = qq.consumer("g", max_attempts=1)
        for m in c.get_many(10, timeout=1):
            if m.offset in (2, 5, 7):
                c.nack(m, error=f"ValueError: bad {m.offset}")
            else:
                c.ack(m)
        c.close()
    rows = ok_json("dlq", q, "g", "list")
    assert [(r["offset"], r["text"], r["attempts"]) for r in rows] == [(2, "m2", 1), (5, "m5", 1), (7, "m7", 1)]
    assert "bad 5" in rows[1]["error"]
    assert ok_json("dlq", q, "g", "replay", "--offset", "5") == {"replayed": 1, "new_offsets": [10]}
    assert ok_json("dlq", q, "g", "purge", "--offset", "2") == {"purged": 1}
    assert [r["offset"] for r in ok_json("dlq", q, "g", "list")] == [7]
    r = logq_cmd("dlq", q, "nope", "list")
    assert r.returncode == 2 and b"no consumer group 'nope'" in r.stderr

    groups = ok_json("group", q, "list")
    assert groups["g"]["watermark"] == 10 and groups["g"]["backlog"] == 1 and groups["g"]["dead_letters"] == 1
    assert ok_json("group", q, "reset", "g", "--to", "4") == {"group": "g", "from": 10, "to": 4}
    with logq.open(q) as qq:
        c = qq.consumer("g")
        assert [m.offset for m in c.get_many(100, timeout=0.5)] == list(range(4, 11))
        c.close()
    assert ok_json("group", q, "reset", "g", "--to", "latest")["to"] == 11
    assert ok_json("group", q, "list")["g"]["backlog"] == 0
    for bad, msg in ((["--to", "99"], b"outside"), (["--to", "earliest"], None)):
        r = logq_cmd("group", q, "reset", "nope" if msg is None else "g", *bad)
        assert r.returncode == 2 and (msg or b"no consumer group") in r.stderr, r.stderr


def test_verify_shows_progress_on_a_terminal_and_writes_nothing(tmp_path):
    import pty
    q = str(tmp_path / "q")
    build(q, 200)
    before = {n: os.stat(os.path.join(q, n)).st_mtime_ns for n in os.listdir(q)}
    before_bytes = digest(q)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "logq", "verify", q], stdout=subprocess.PIPE,
                                stderr=slave, env=child_env())
        out, _ = proc.communicate(timeout=60)
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0 and out.decode().strip().endswith("clean")
    assert b"100.0%" in shown and b"[#####" in shown, shown
    assert digest(q) == before_bytes
    assert {n: os.stat(os.path.join(q, n)).st_mtime_ns for n in os.listdir(q)} == before


def test_repair_killed_at_random_moments_then_run_again_loses_no_intact_record(tmp_path):
    """SIGKILL repair in the middle, several times, then let one finish:
    the queue verifies clean, every intact record is served at its offset,
    every destroyed range is accounted for in the manifest, and every
    damaged byte is still somewhere in quarantine."""
    import random
    q = str(tmp_path / "q")
    n = 3000
    build(q, n)
    rm = record_map(q)
    rng = random.Random(7)
    destroyed: set[int] = set()
    originals = {}
    for off in sorted(rng.sample(range(1, n - 1), 60)):
        if {off - 1, off, off + 1} & destroyed:
            continue
        path, pos, end = rm[off]
        if rm[off - 1][0] != path or rm[off + 1][0] != path:
            continue            # keep it mid-segment: one range per damaged record
        with open(path, "rb") as f:
            f.seek(pos + 10)
            originals[off] = f.read(4)
        write_at(path, pos + 10, bytes(b ^ 0xFF for b in originals[off]))
        destroyed.add(off)
    assert len(destroyed) >= 30
    code = "import logq, sys; logq.repair(sys.argv[1])"
    manifest = os.path.join(q, F.QUARANTINE_DIR, F.QUARANTINE_MANIFEST)

    def recorded() -> int:
        try:
            with open(manifest, "rb") as f:
                return f.read().count(b"\n")
        except FileNotFoundError:
            return 0

    kills_mid_way = 0
    with children() as kids:
        for r in range(5):
            # Kill once this repair has recorded 1..6 more ranges: in the
            # middle of its work, between or inside the steps of one range.
            before, more = recorded(), rng.randint(1, 6)
            kid = Child(code, str(tmp_path / f"repair-{r}.log"), q)
            kids.append(kid)
            with deadline(30, "a repair to make progress"):
                while recorded() < before + more and kid.alive():
                    time.sleep(0.0002)
            kills_mid_way += kid.alive()
            kid.kill()
            kid.wait(30)
    assert kills_mid_way >= 3, "the repairs finished before they could be killed"
    final = ok_json("repair", q)
    assert final["after"]["clean"], final
    assert lost_offsets(final["after"], known=True) == destroyed
    with logq.open(q) as qq:
        got = dict(qq.scan())
    assert set(got) == set(range(n)) - destroyed
    assert all(identity(d) == (TAG, off) for off, d in got.items())
    # every damaged record's bytes are kept in quarantine (some perhaps twice)
    qdir = os.path.join(q, F.QUARANTINE_DIR)
    kept = b"".join(open(os.path.join(qdir, m), "rb").read() for m in os.listdir(qdir)
                    if m != F.QUARANTINE_MANIFEST)
    for off in destroyed:
        assert bytes(b ^ 0xFF for b in originals[off]) in kept, f"the damaged bytes of {off} were not kept"


# -- damage inside a durable batch; durable records missing at the end ------------------
@pytest.mark.parametrize("batched", [True, False])
def test_damage_inside_a_durable_batch_loses_only_the_damaged_records(tmp_path, batched):
    """Bytes overwritten across the end of one record and the start of the
    next, inside one put_many of a cleanly closed queue (every record
    durable, so the batch was written whole): verify names those two
    offsets and nothing else, repair gives up only their bytes, and every
    other record of the batch is served, at its offset, after it."""
    q = str(tmp_path / "q")
    items = [payload(TAG, i) for i in range(400)]
    with logq.open(q) as qq:
        if batched:
            qq.put_many(items)
        else:
            for it in items:
                qq.put(it)
    recs = record_map(q)
    path, pos, end = recs[199]
    write_at(path, end - 4, b"\xff" * 8)               # the end of 199, the CRC of 200
    rep = ok_json("verify", q, rc=1)
    assert [(d["kind"], d["first_offset"], d["end_offset"]) for d in rep["damage"]] == [("records", 199, 201)]
    assert rep["torn_tail"] is None and rep["next_offset"] == 400
    with open(path, "rb") as f:
        damaged = f.read()
    fixed = ok_json("repair", q)
    assert fixed["after"]["clean"], fixed
    with open(path, "rb") as f:
        repaired = f.read()
    for o, (p, a, b) in recs.items():
        if o not in (199, 200) and p == path:
            assert repaired[a:b] == damaged[a:b], f"repair changed the intact record {o}"
    with logq.open(q) as qq:
        assert [o for o, _ in qq.scan()] == [o for o in range(400) if o not in (199, 200)]
        assert all(identity(p) == (TAG, o) for o, p in qq.scan())
        assert qq.put(b"next") == 400
    assert ok_json("verify", q)["clean"]


def test_repair_moves_the_checkpoint_back_when_durable_records_are_gone(tmp_path):
    """The newest segment's last durable records zeroed: verify says so,
    repair accepts the loss (recorded in the manifest), verify is clean
    after it, and new puts follow the last intact record, reusing the
    offsets given up (and verify stays clean after them)."""
    q = str(tmp_path / "q")
    build(q, 120)
    recs = record_map(q)
    path = recs[119][0]
    first_gone = min(o for o, (p, _, _) in recs.items() if p == path) + 3
    start, end = recs[first_gone][1], recs[119][2]
    write_at(path, start, bytes(end - start))
    rep = ok_json("verify", q, rc=1)
    assert [(d["kind"], d["first_offset"], d["end_offset"]) for d in rep["damage"]] == \
        [("durable records missing", first_gone, 120)]
    fixed = ok_json("repair", q)
    assert fixed["after"]["clean"], fixed
    manifest = [json.loads(ln) for ln in open(os.path.join(q, F.QUARANTINE_DIR, F.QUARANTINE_MANIFEST))]
    assert [(m["first_offset"], m["end_offset"]) for m in manifest] == [(first_gone, 120)]
    with logq.open(q, segment_bytes=4096) as qq:
        assert qq.next_offset == first_gone
        assert qq.put(b"new") == first_gone
        assert qq.put_many([b"a", b"b"]) == range(first_gone + 1, first_gone + 3)
    assert ok_json("verify", q)["clean"]
    with logq.open(q, segment_bytes=4096) as qq:
        got = list(qq.scan())
        assert [o for o, _ in got] == list(range(first_gone + 3))
        assert [p for _, p in got[-3:]] == [b"new", b"a", b"b"]


def test_repair_of_a_newest_segment_cut_to_nothing_keeps_the_queue_s_segment_size(tmp_path):
    """Repair starts a newest segment too short for its header anew; it must
    not do so at the default size (64 MiB): a queue of 8 KiB segments then
    grew one that big, and a put at max_bytes found no room to free."""
    q = str(tmp_path / "q")
    with logq.open(q, segment_bytes=8192) as qq:
        qq.put_many([b"x" * 100] * 3)
    newest = max(n for n in os.listdir(q) if n.endswith(".log"))
    os.truncate(os.path.join(q, newest), 0)
    logq.repair(q)
    sizes = {n: os.path.getsize(os.path.join(q, n)) for n in os.listdir(q) if n.endswith(".log")}
    assert max(sizes.values()) <= 8192, sizes
    with logq.open(q, segment_bytes=8192) as qq:
        base = qq.stats()["disk_bytes"]
    with logq.open(q, segment_bytes=8192, max_bytes=base + 4 * 8192 + (4 << 20), on_full="drop_oldest",
                   put_timeout=2.0) as qq:
        for i in range(400):
            qq.put(b"y" * 200)       # rolls every 8 KiB; drop_oldest keeps it within the budget
        assert qq.stats()["disk_bytes"] <= qq.stats()["max_bytes"]
    assert ok_json("verify", q)["clean"]


def test_recovery_alone_does_not_trust_a_checkpoint_whose_records_are_gone(tmp_path):
    """Without repair: an open after the same loss ends the log at the last
    intact record, not at the checkpoint (a put there would land behind a
    hole)."""
    q = str(tmp_path / "q")
    build(q, 50)
    recs = record_map(q)
    path, start, _ = recs[45]
    write_at(path, start, bytes(recs[49][2] - start))
    with logq.open(q, segment_bytes=4096) as qq:
        assert qq.next_offset == 45
        assert qq.put(b"x") == 45
    assert ok_json("verify", q)["clean"]
