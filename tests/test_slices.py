"""``_slices.cut`` returns exactly what slicing one record at a time does,
whatever the layout: hunted with generated layouts (runs of one stride
broken by records with a meta, lengths that differ, tiny and huge runs),
and on the payload positions a real scan of a real queue reports."""

import mmap
import os

from hypothesis import given, settings, strategies as st

import logq
from logq import _slices
from logq import _format as F


def _reference(buf, pos, lens):
    return [buf[p:p + n] for p, n in zip(pos, lens)]


@st.composite
def layouts(draw):
    """A buffer and the payload positions/lengths of records laid end to
    end, each with a header and sometimes a meta before its payload."""
    k = draw(st.integers(1, 300))
    same = draw(st.booleans())
    n0 = draw(st.integers(0, 64))
    hdr = draw(st.sampled_from([0, 1, 8, 24]))
    meta_every = draw(st.sampled_from([0, 1, 2, 7, 50, 1000]))
    pos, lens, at = [], [], draw(st.integers(0, 40))
    for i in range(k):
        n = n0 if same else draw(st.integers(0, 64))
        meta = draw(st.integers(1, 20)) if meta_every and i % meta_every == 0 else 0
        at += hdr + meta
        pos.append(at)
        lens.append(n)
        at += n
    buf = bytes(draw(st.binary(min_size=at, max_size=at))) if at < 2000 else os.urandom(at)
    return buf, pos, lens


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_cut_is_slicing(layout):
    buf, pos, lens = layout
    assert _slices.cut(buf, pos, lens) == _reference(buf, pos, lens)


@settings(max_examples=60, deadline=None)
@given(layouts(), st.data())
def test_cut_refuses_positions_off_their_stride(layout, data):
    """A position moved by a byte (or more) anywhere still gives that
    position's bytes: the fast path's guess is checked in full."""
    buf, pos, lens = layout
    if len(pos) < 3:
        return
    i = data.draw(st.integers(1, len(pos) - 2))
    room = pos[i + 1] - pos[i] - lens[i]
    if room <= 0:
        return
    pos = list(pos)
    pos[i] += data.draw(st.integers(1, room))
    assert _slices.cut(buf, pos, lens) == _reference(buf, pos, lens)


def test_cut_on_a_real_scan(tmp_path):
    """Payload positions from a real scan of put() and put_many() records
    (batch heads carry a meta: the stride breaks there), in a mapping."""
    q = logq.open(str(tmp_path / "q"), fsync="never")
    try:
        q.put_many([b"a%05d" % i for i in range(500)])
        for i in range(300):
            q.put(b"b%05d" % i)
        q.put_many([os.urandom(100) for _ in range(700)])
        q.put_many([b"c" * (i % 50) for i in range(400)])
        q.flush()
    finally:
        q.close()
    seg = sorted(f for f in os.listdir(tmp_path / "q") if f.endswith(".log"))[0]
    with open(tmp_path / "q" / seg, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    from logq import _codec as codec
    h = codec.handle(mm)
    count, _stop, _status, fields = codec.scan(h, F.SEGMENT_HEADER_SIZE, len(h), 0, 1 << 20, True)
    codec.release(h)
    assert count == 1900
    pos, lens = fields[1::F.SCAN_FIELDS], fields[2::F.SCAN_FIELDS]
    _slices._formats.clear()
    for a, b in ((0, 1900), (0, 1000), (450, 1550), (499, 800), (1500, 1900), (10, 40)):
        assert _slices.cut(mm, pos[a:b], lens[a:b]) == _reference(mm, pos[a:b], lens[a:b])
    # the runs of one length went the fast way (a format each), the others slice by slice
    assert len(_slices._formats) == 2       # (499, 800) and (10, 40): one length each
    mm.close()
