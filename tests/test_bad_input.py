"""Every bad input gets a clear exception of the documented type, and leaves
the queue (or the directory) as it was and usable."""

from __future__ import annotations

import os
from array import array

import pytest

import logq
from helpers import payload


@pytest.fixture
def q(tmp_path):
    q = logq.open(tmp_path / "q", fsync="never", segment_bytes=4096, max_message_bytes=1000)
    q.put_many([b"one", b"two", b"three"])
    yield q
    q.close()


def assert_intact(q: logq.Queue, extra: list[bytes] = ()) -> None:
    """The three records of the fixture (plus ``extra``) are there, and the
    queue still takes a put at the next offset."""
    want = [b"one", b"two", b"three", *extra]
    assert q.next_offset == len(want)
    assert [p for _, p in q.scan()] == want
    off = q.put(b"after")
    assert off == len(want)
    assert q.read(off) == b"after"


def dir_listing(path) -> dict[str, bytes]:
    out = {}
    for dp, _, files in os.walk(path):
        for f in files:
            full = os.path.join(dp, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


# -- payloads ---------------------------------------------------------------
@pytest.mark.parametrize("bad", ["text", None, 12, 1.5, [b"a"], (b"a",), {b"a": 1}, object()],
                         ids=["str", "None", "int", "float", "list", "tuple", "dict", "object"])
def test_put_rejects_non_bytes(q, bad):
    with pytest.raises(TypeError) as ei:
        q.put(bad)
    assert type(bad).__name__ in str(ei.value)
    assert_intact(q)


@pytest.mark.parametrize("good", [b"bytes", bytearray(b"bytearray"), memoryview(b"memoryview"),
                                  memoryview(b"a-b-c-d")[::2], memoryview(array("H", [1, 2, 3]))],
                         ids=["bytes", "bytearray", "memoryview", "strided-memoryview", "array-view"])
def test_put_accepts_buffers(q, good):
    want = bytes(good)
    off = q.put(good)
    assert q.read(off) == want
    r = q.put_many([good, good])
    assert [q.read(o) for o in r] == [want, want]


def test_put_accepts_bytes_subclass(q):
    class Blob(bytes):
        pass
    off = q.put(Blob(b"subclass"))
    assert q.read(off) == b"subclass"
    r = q.put_many([Blob(b"x"), b"y"])
    assert [q.read(o) for o in r] == [b"x", b"y"]


def test_zero_length_payload_round_trips(tmp_path):
    path = tmp_path / "q"
    with logq.open(path, fsync="always", segment_bytes=4096) as q:
        a = q.put(b"")
        b = q.put_many([b"", b"x", b""])
        assert q.read(a) == b""
        assert [q.read(o) for o in b] == [b"", b"x", b""]
    with logq.open(path) as q:
        assert list(q.scan()) == [(0, b""), (1, b""), (2, b"x"), (3, b"")]
        assert q.stats()["lost_records"] == 0


def test_message_too_large(q):
    assert q.read(q.put(b"m" * 1000)) == b"m" * 1000      # exactly the limit is fine
    before = q.next_offset
    with pytest.raises(logq.MessageTooLargeError) as ei:
        q.put(b"m" * 1001)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, logq.LogqError)
    assert "1001" in str(ei.value) and "1000" in str(ei.value)
    assert q.next_offset == before
    assert q.put(b"small") == before


def test_put_many_with_one_non_bytes_item_stores_nothing(q):
    before = q.next_offset
    with pytest.raises(TypeError) as ei:
        q.put_many([b"good1", b"good2", "bad", b"good3"])
    assert "2" in str(ei.value)          # names the bad item
    assert q.next_offset == before
    with pytest.raises(TypeError):
        q.put_many(x for x in [b"gen", None])
    assert q.next_offset == before
    assert_intact(q)


def test_put_many_with_oversized_item_stores_nothing(q):
    before = q.next_offset
    with pytest.raises(logq.MessageTooLargeError):
        q.put_many([b"ok", b"z" * 1001, b"ok"])
    assert q.next_offset == before
    assert_intact(q)


def test_put_many_rejects_non_iterable(q):
    with pytest.raises(TypeError):
        q.put_many(5)
    with pytest.raises(TypeError):
        q.put_many(None)
    assert_intact(q)


def test_empty_put_many(q):
    before = q.next_offset
    r = q.put_many([])
    assert isinstance(r, range) and len(r) == 0 and r.start == before
    r = q.put_many(iter(()))
    assert len(r) == 0
    assert q.next_offset == before
    assert_intact(q)


# -- reads ------------------------------------------------------------------------
@pytest.mark.parametrize("off", [-1, -(1 << 70), 3, 4, 1 << 63, 1 << 70])
def test_read_outside_the_queue(q, off):
    with pytest.raises(logq.OffsetError) as ei:
        q.read(off)
    assert isinstance(ei.value, IndexError)
    assert_intact(q)


@pytest.mark.parametrize("off", ["0", 1.0, None, True, b"\x00", [0]])
def test_read_non_int_offset(q, off):
    with pytest.raises(TypeError):
        q.read(off)
    with pytest.raises(TypeError):
        q.read_many(off, 1)
    assert_intact(q)


def test_read_many_at_the_ends(q):
    assert q.read_many(3, 10) == (3, [])
    assert q.read_many(0, 10) == (0, [b"one", b"two", b"three"])
    with pytest.raises(logq.OffsetError):
        q.read_many(-1, 1)


# -- paths ----------------------------------------------------------------------------
def test_path_is_a_regular_file(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"not a queue")
    with pytest.raises(logq.NotAQueueError) as ei:
        logq.open(f)
    assert str(f) in str(ei.value)
    assert f.read_bytes() == b"not a queue"


def test_non_empty_directory_that_is_not_a_queue(tmp_path):
    d = tmp_path / "stuff"
    d.mkdir()
    (d / "notes.txt").write_bytes(b"mine")
    (d / "sub").mkdir()
    before = dir_listing(d)
    with pytest.raises(logq.NotAQueueError) as ei:
        logq.open(d)
    assert str(d) in str(ei.value)
    assert dir_listing(d) == before and sorted(os.listdir(d)) == ["notes.txt", "sub"]


def test_directory_with_a_foreign_meta_file(tmp_path):
    d = tmp_path / "q"
    d.mkdir()
    (d / "logq.meta").write_bytes(b"something else\n")
    with pytest.raises(logq.NotAQueueError):
        logq.open(d)
    assert sorted(os.listdir(d)) == ["logq.meta"]


@pytest.mark.parametrize("where", ["under-file", "under-file-nested", "proc", "proc-self"])
def test_path_that_cannot_be_created(tmp_path, where):
    f = tmp_path / "file"
    f.write_bytes(b"x")
    path = {"under-file": str(f / "q"),
            "under-file-nested": str(f / "a" / "b"),
            "proc": f"/proc/logq-test-{os.getpid()}",
            "proc-self": "/proc/self/fdinfo/q"}[where]
    with pytest.raises((OSError, logq.LogqError)) as ei:
        logq.open(path)
    assert path in str(ei.value), f"the error does not name {path}: {ei.value}"
    assert f.read_bytes() == b"x"


def test_existing_empty_directory_becomes_a_queue(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with logq.open(str(d)) as q:
        assert q.put(b"x") == 0
    with logq.open(d) as q:
        assert q.read(0) == b"x"


# -- options --------------------------------------------------------------------------
@pytest.mark.parametrize("opts,exc", [
    ({"fsync": "sometimes"}, ValueError),
    ({"fsync": "ALWAYS"}, ValueError),
    ({"fsync": None}, ValueError),
    ({"fsync": True}, ValueError),
    ({"segment_bytes": 0}, ValueError),
    ({"segment_bytes": -4096}, ValueError),
    ({"segment_bytes": 100}, ValueError),
    ({"segment_bytes": 4096.0}, TypeError),
    ({"segment_bytes": "4096"}, TypeError),
    ({"segment_bytes": True}, TypeError),
    ({"segment_bytes": None}, TypeError),
    ({"fsync_interval": 0}, ValueError),
    ({"fsync_interval": -1}, ValueError),
    ({"fsync_interval": float("nan")}, ValueError),
    ({"fsync_interval": float("inf")}, ValueError),
    ({"fsync_interval": "0.2"}, TypeError),
    ({"fsync_interval": True}, TypeError),
    ({"fsync_bytes": 0}, ValueError),
    ({"fsync_bytes": 1.5}, TypeError),
    ({"max_message_bytes": 0}, ValueError),
    ({"max_message_bytes": -1}, ValueError),
    ({"max_message_bytes": (1 << 30) + 1}, ValueError),
    ({"max_message_bytes": 10.0}, TypeError),
    ({"no_such_option": 1}, TypeError),
])
def test_bad_options(tmp_path, opts, exc):
    path = tmp_path / "q"
    with pytest.raises(exc) as ei:
        logq.open(path, **opts)
    name = next(iter(opts))
    if name != "no_such_option":
        assert name in str(ei.value)
    assert not path.exists(), "a rejected open created the queue directory"
    # an existing queue is untouched by a rejected open
    with logq.open(path, segment_bytes=4096) as q:
        q.put(b"kept")
    with pytest.raises(exc):
        logq.open(path, **opts)
    with logq.open(path) as q:
        assert list(q.scan()) == [(0, b"kept")]


def test_bad_option_leaves_an_open_queue_usable(q):
    with pytest.raises(ValueError):
        logq.open(q.path, fsync="bogus")
    assert_intact(q)


# -- after close ----------------------------------------------------------------------
def test_every_call_after_close_raises_queue_closed(tmp_path):
    path = tmp_path / "q"
    q = logq.open(path, fsync="batch", segment_bytes=4096)
    q.put(b"x")
    q.close()
    calls = {
        "put": lambda: q.put(b"y"),
        "put_many": lambda: q.put_many([b"y"]),
        "put_many-empty": lambda: q.put_many([]),
        "read": lambda: q.read(0),
        "read_many": lambda: q.read_many(0, 1),
        "scan": lambda: list(q.scan()),
        "flush": q.flush,
        "len": lambda: len(q),
        "stats": q.stats,
        "first_offset": lambda: q.first_offset,
        "next_offset": lambda: q.next_offset,
    }
    for name, call in calls.items():
        with pytest.raises(logq.QueueClosedError) as ei:
            call()
        assert isinstance(ei.value, ValueError), name
        assert "closed" in str(ei.value), name
    q.close()       # twice is fine
    q.close()
    with logq.open(path) as q2:
        assert list(q2.scan()) == [(0, b"x")]
        assert q2.stats()["last_shutdown_clean"] is True


def test_context_manager_closes(tmp_path):
    with logq.open(tmp_path / "q") as q:
        q.put(b"x")
    with pytest.raises(logq.QueueClosedError):
        q.put(b"y")


def test_errors_do_not_break_a_busy_queue(tmp_path):
    """A mix of good and bad calls: the good ones land at dense offsets."""
    path = tmp_path / "q"
    good = []
    with logq.open(path, fsync="never", segment_bytes=4096, max_message_bytes=400) as q:
        for i in range(120):
            for bad in ("s", b"x" * 401, [b"ok", 3]):
                with pytest.raises((TypeError, logq.MessageTooLargeError)):
                    if isinstance(bad, list):
                        q.put_many(bad)
                    else:
                        q.put(bad)
            p = payload("g", i)[:400]
            assert q.put(p) == len(good)
            good.append(p)
    with logq.open(path) as q:
        assert [p for _, p in q.scan()] == good
        assert q.stats()["segments"] > 1
