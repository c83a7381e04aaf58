"""The native codec (logq._native via _codec_native) is a twin of the
pure-Python reference (_codec_py): identical bytes written, identical scan and
find_next results on valid, truncated, damaged, garbage and hostile input.

The differential tests skip when the native module is not built;
LOGQ_EXPECT_NATIVE=1 (set by .ci/run) makes that an error instead, and
LOGQ_TEST_SCALE=N to run N times as many random examples.
"""

from __future__ import annotations

import mmap
import os
import random
import re
import struct
import sys
import time

import crcmod.predefined
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logq import _codec_py as P
from logq import _format as F

try:
    from logq import _codec_native as N
    from logq._native import ffi, lib
except ImportError:
    if os.environ.get("LOGQ_EXPECT_NATIVE") == "1":
        raise
    N = ffi = lib = None

native = pytest.mark.skipif(N is None, reason="logq._native is not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "native", "logq_native.h")

# LOGQ_TEST_SCALE=20 runs twenty times as many examples (a deeper soak).
SCALE = float(os.environ.get("LOGQ_TEST_SCALE", "1"))
SETTINGS = settings(max_examples=int(120 * SCALE), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=int(40 * SCALE), deadline=None,
               suppress_health_check=[HealthCheck.too_slow])

crcmod_fn = crcmod.predefined.mkCrcFun("crc-32c")
HDR = F.RECORD_HEADER_SIZE
U64 = (1 << 64) - 1
TS = 1_700_000_000_000_000_000

# The worked examples in _format's docstring: one record, and a batch of two.
EXAMPLE = bytes.fromhex(
    "86535d07" "02000000" "0500000000000000"
    "00002a36fe9c9717" "0000" "00" "80" "6869")
BATCH_EXAMPLE = bytes.fromhex(
    "91f6ba09" "01000000" "0700000000000000"
    "00002a36fe9c9717" "0400" "00" "88" "02000000" "61"
    "3cd1dc7f" "01000000" "0800000000000000"
    "00002a36fe9c9717" "0000" "00" "84" "62")


# --- helpers -------------------------------------------------------------

def build(records, base=0, pos=0, size=None):
    """Encode records (payload, priority, deliver_at, key, ts) with the
    reference codec; the bytearray and the record positions."""
    size = size if size is not None else pos + sum(
        HDR + len(p) + (8 if d is not None else 0) + len(k or b"")
        for p, _, d, k, _ in records)
    buf = bytearray(size)
    positions = []
    for i, (payload, prio, deliver_at, key, ts) in enumerate(records):
        flags, meta = F.encode_meta(deliver_at, key)
        if prio % 3 == 1:
            flags |= F.FLAG_CONT    # some records sit inside a batch
        positions.append(pos)
        pos = P.encode(buf, pos, size, base + i, ts, payload, prio, flags, meta)
        assert pos > 0
    positions.append(pos)
    return buf, positions


def raw_record(length, offset, ts, mlen, prio, flags, body, crc=None):
    """A record with arbitrary header fields; crc None means a valid CRC over
    what follows the crc field (whatever the fields claim)."""
    rest = F.RECORD_BODY.pack(length, offset, ts, mlen, prio, flags) + body
    if crc is None:
        crc = F.mask_crc(crcmod_fn(rest))
    return struct.pack("<I", crc) + rest


def nscan(buf, start, end, expected, maxr, fields):
    h = N.handle(buf)
    try:
        return N.scan(h, start, end, expected, maxr, fields)
    finally:
        N.release(h)


def nfind(buf, start, end, lo, hi, batch_ok=False):
    h = N.handle(buf)
    try:
        return N.find_next(h, start, end, lo, hi, batch_ok)
    finally:
        N.release(h)


def same_scan(buf, start, end, expected, maxr=1 << 20):
    """Scan with both codecs, with and without fields; the pure result."""
    data = bytes(buf)
    for fields in (False, True):
        want = P.scan(data, start, end, expected, maxr, fields)
        got = nscan(buf, start, end, expected, maxr, fields)
        assert got == want, (start, end, expected, maxr, fields)
    return want


def same_find(buf, start, end, lo, hi):
    """Both codecs agree, with and without batch_ok; the pure result without."""
    hi = min(hi, U64)
    for batch_ok in (True, False):
        want = P.find_next(bytes(buf), start, end, lo, hi, batch_ok)
        got = nfind(buf, start, end, lo, hi, batch_ok)
        assert got == want, (start, end, lo, hi, batch_ok)
    return want


def check_stream(buf, positions, base):
    """Scans and searches of a (possibly damaged) stream agree."""
    n = len(buf)
    same_scan(buf, 0, n, base)
    for maxr in (0, 1, 2):
        same_scan(buf, 0, n, base, maxr)
    for i, p in enumerate(positions):
        if p <= n:
            same_scan(buf, p, n, base + i)
    count = len(positions) - 1
    for start in {0, 1, *positions[:3]}:
        if start <= n:
            same_find(buf, start, n, base, base + count)
            same_find(buf, start, n, base + 1, base + max(count - 1, 1))
            same_find(buf, start, n, base + count // 2, base + count // 2)
    same_find(buf, 0, n, base + 1, base)
    for i, p in enumerate(positions[:3]):
        if p <= n:
            for target in range(base + i, base + count + 2):
                same_seek(buf, p, n, base + i, target)


def same_seek(buf, start, end, at, target):
    """Both codecs agree on seek; a position returned holds an intact record
    carrying ``target`` (a damaged one is never found, whatever was skipped)."""
    data = bytes(buf)
    want = P.seek(data, start, end, at, target)
    if N is not None:
        h = N.handle(buf)
        try:
            assert N.seek(h, start, end, at, target) == want, (start, end, at, target)
        finally:
            N.release(h)
    if want >= 0:
        assert P.scan(data, want, end, target, 1)[0] == 1, (start, at, target, want)
    else:
        assert -want in F.SCAN_REASONS and -want != F.SCAN_OK
    return want


records = st.lists(
    st.tuples(
        st.binary(max_size=40),                       # payload
        st.integers(0, 255),                          # priority
        st.none() | st.integers(0, U64),              # deliver_at
        st.none() | st.binary(min_size=1, max_size=12),  # key
        st.integers(0, U64),                          # timestamp
    ),
    max_size=6)

# Offsets around the places where the high bytes the reference's find_next
# searches for change, and near the end of the u64 range.
bases = st.one_of(
    st.integers(0, 100),
    st.integers((1 << 24) - 8, (1 << 24) + 2),
    st.integers((1 << 32) - 8, (1 << 32) + 2),
    st.integers(U64 - 12, U64 - 6),
    st.integers(0, U64 - 6),
)

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("zero"), st.integers(0, 10**6), st.integers(1, 40)),
    st.tuples(st.just("garbage"), st.integers(0, 10**6), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("append"), st.just(0), st.binary(min_size=1, max_size=60)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
)


def mutate(buf, ops):
    buf = bytearray(buf)
    for kind, at, arg in ops:
        if kind == "append":
            buf += arg
            continue
        if not buf:
            continue
        at %= len(buf)
        if kind == "flip":
            buf[at] ^= arg
        elif kind == "zero":
            buf[at:at + arg] = bytes(len(buf[at:at + arg]))
        elif kind == "garbage":
            chunk = arg[:len(buf) - at]
            buf[at:at + len(chunk)] = chunk
        elif kind == "cut":
            del buf[at:]
    return buf


# --- constants -----------------------------------------------------------

REQUIRED = [
    "FORMAT_VERSION", "SEGMENT_HEADER_SIZE", "RECORD_HEADER_SIZE", "RECORD_MARK",
    "FLAG_DELIVER_AT", "FLAG_KEY", "FLAG_CONT", "FLAG_BATCH", "FLAGS_KNOWN", "DELIVER_AT_SIZE",
    "BATCH_COUNT_SIZE", "MAX_BATCH", "MAX_PAYLOAD",
    "MAX_META", "CRC_MASK_DELTA", "SCAN_OK", "SCAN_END", "SCAN_TRUNCATED",
    "SCAN_BAD_HEADER", "SCAN_BAD_CRC", "SCAN_BAD_OFFSET", "SCAN_FIELDS",
    "CTL_TAIL_BASE", "CTL_TAIL_POS", "CTL_TAIL_NEXT", "CTL_WANT", "CTL_HOLDER",
    "CTL_GENERATION", "CTL_WAITERS", "CTL_BOOT_ID", "CONTROL_SIZE", "SPARSE_STRIDE",
]


def header_defines():
    with open(HEADER) as f:
        text = f.read()
    return {m.group(1): int(m.group(2), 0) for m in re.finditer(
        r"^#define\s+LOGQ_(\w+)\s+(-?(?:0[xX][0-9a-fA-F]+|\d+))\b", text, re.M)}


def test_header_constants_match_format():
    defines = header_defines()
    missing = [name for name in REQUIRED if name not in defines]
    assert not missing, f"not in logq_native.h: {missing}"
    for name, value in defines.items():
        if hasattr(F, name):
            assert value == getattr(F, name), name
    for name in REQUIRED:
        assert defines[name] == getattr(F, name), name


@native
def test_compiled_constants_match_format():
    for name, value in header_defines().items():
        assert getattr(lib, "LOGQ_" + name) == value, name


# --- the worked example --------------------------------------------------

@pytest.mark.parametrize("codec", ["pure", pytest.param("native", marks=native)])
def test_worked_example(codec):
    M = P if codec == "pure" else N
    buf = bytearray(40)
    h = M.handle(buf)
    assert M.encode(h, 0, 40, 5, TS, b"hi") == 30
    assert M.scan(h, 0, 40, 5, 10, True) == (
        1, 30, F.SCAN_END, [0, HDR, 2, TS, F.RECORD_MARK << 24])
    M.release(h)
    assert bytes(buf[:30]) == EXAMPLE
    assert bytes(buf[30:]) == bytes(10)


@pytest.mark.parametrize("codec", ["pure", pytest.param("native", marks=native)])
def test_worked_batch_example(codec):
    """Format 2: the head of a batch of two carries BATCH and the count 2,
    its CONT record follows; one record alone carries no count."""
    M = P if codec == "pure" else N
    buf = bytearray(70)
    h = M.handle(buf)
    assert M.encode_batch(h, 0, 70, 7, TS, b"ab", [1, 1]) == 62
    n, stop, status, fields = M.scan(h, 0, 70, 7, 10, True)
    assert (n, stop, status) == (2, 62, F.SCAN_END)
    assert fields[4] == (F.RECORD_MARK | F.FLAG_BATCH) << 24 | F.BATCH_COUNT_SIZE
    assert F.batch_count_at(buf, 0, fields[4]) == 2
    assert F.decode_meta(fields[4] >> 24, bytes(buf[28:32])) == (None, None)
    M.release(h)
    assert bytes(buf[:62]) == BATCH_EXAMPLE
    one = bytearray(40)
    h = M.handle(one)
    assert M.encode_batch(h, 0, 40, 5, TS, b"hi", [2]) == 30
    M.release(h)
    assert bytes(one[:30]) == EXAMPLE        # a batch of one is a plain record
    # the size the queue reserves is what the codecs write
    assert F.batch_size(2, 2) == 62 and F.batch_size(1, 2) == 30


def test_meta_rules_of_a_batch_count():
    assert F.meta_valid(F.RECORD_MARK | F.FLAG_BATCH, 4)
    assert not F.meta_valid(F.RECORD_MARK | F.FLAG_BATCH, 0)
    assert F.meta_valid(F.RECORD_MARK | F.FLAG_BATCH | F.FLAG_DELIVER_AT, 12)
    assert F.meta_valid(F.RECORD_MARK | F.FLAG_BATCH | F.FLAG_KEY, 5)
    assert not F.meta_valid(F.RECORD_MARK | F.FLAG_BATCH | F.FLAG_KEY, 4)
    meta = struct.pack("<QI", 99, 3) + b"key"
    flags = F.RECORD_MARK | F.FLAG_BATCH | F.FLAG_DELIVER_AT | F.FLAG_KEY
    assert F.decode_meta(flags, meta) == (99, b"key")
    assert F.batch_count_at(b"\0" * HDR + meta, 0, flags << 24) == 3


# --- crc32c --------------------------------------------------------------

@native
def test_crc_check_value():
    assert N.crc32c(b"123456789") == 0xE3069283
    assert lib.logq_crc32c_sw(0, b"123456789", 9) == 0xE3069283
    assert N.crc32c(b"") == 0 == P.crc32c(b"")
    assert isinstance(N.hardware_crc(), bool)
    if os.uname().machine in ("x86_64", "AMD64"):
        with open("/proc/cpuinfo") as f:
            if "sse4_2" in f.read():
                assert N.hardware_crc()


@native
@SETTINGS
@given(st.binary(max_size=300), st.integers(0, 0xFFFFFFFF), st.integers(0, 7))
def test_crc_matches_crcmod(data, crc, skew):
    data = bytes(skew) + data
    view = memoryview(data)[skew:]          # unaligned starts
    want = crcmod_fn(bytes(view), crc)
    assert N.crc32c(bytes(view), crc) == want
    assert N.crc32c(view, crc) == want
    assert N.crc32c(bytearray(view), crc) == want
    assert P.crc32c(view, crc) == want
    cview = ffi.from_buffer("uint8_t[]", view)
    assert lib.logq_crc32c(crc, cview, len(view)) == want
    assert lib.logq_crc32c_sw(crc, cview, len(view)) == want


@native
@SETTINGS
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=8))
def test_crc_continues_in_chunks(data, cuts):
    cuts = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    crc = sw = 0
    for a, b in zip(cuts, cuts[1:]):
        crc = N.crc32c(data[a:b], crc)
        sw = lib.logq_crc32c_sw(sw, data[a:b], b - a)
    assert crc == sw == crcmod_fn(data)


@native
def test_crc_hw_and_tables_agree_on_long_buffers():
    rnd = random.Random(7)
    data = rnd.randbytes(70_000)
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 4095, 4096, 65_537, len(data)):
        for skew in (0, 3):
            chunk = data[skew:skew + n]
            crc = rnd.getrandbits(32)
            assert (lib.logq_crc32c(crc, chunk, len(chunk))
                    == lib.logq_crc32c_sw(crc, chunk, len(chunk))
                    == crcmod_fn(chunk, crc))


# --- encoding ------------------------------------------------------------

def pure_and_native_buffers(size, fill):
    return bytearray([fill]) * size, bytearray([fill]) * size


@native
@SETTINGS
@given(payload=st.binary(max_size=60), offset=st.integers(0, U64), ts=st.integers(0, U64),
       priority=st.integers(0, 255), flags=st.integers(0, 255),
       meta=st.binary(max_size=20), pos=st.integers(0, 140), room=st.integers(0, 140),
       fill=st.sampled_from([0, 0xA5]))
def test_encode_identical(payload, offset, ts, priority, flags, meta, pos, room, fill):
    size = 300
    end = min(size, pos + room)
    bp, bn = pure_and_native_buffers(size, fill)
    rp = P.encode(bp, pos, end, offset, ts, payload, priority, flags, meta)
    h = N.handle(bn)
    rn = N.encode(h, pos, end, offset, ts, payload, priority, flags, meta)
    N.release(h)
    assert rn == rp
    assert bn == bp
    if rp < 0:
        assert bp == bytearray([fill]) * size


@native
def test_encode_takes_any_buffer_and_rejects_out_of_range_fields():
    for payload in (b"abc", bytearray(b"abc"), memoryview(b"xabc")[1:]):
        bp, bn = bytearray(64), bytearray(64)
        P.encode(bp, 3, 64, 1, 2, payload, meta=memoryview(b""))
        h = N.handle(bn)
        N.encode(h, 3, 64, 1, 2, payload, meta=memoryview(b""))
        N.release(h)
        assert bn == bp
    bad = [dict(priority=256), dict(flags=256), dict(meta=bytes(0x10000))]
    for kw in bad:
        bp, bn = bytearray(0x10100), bytearray(0x10100)
        with pytest.raises(struct.error):
            P.encode(bp, 0, len(bp), 0, 0, b"x", **kw)
        h = N.handle(bn)
        with pytest.raises(struct.error):
            N.encode(h, 0, len(bn), 0, 0, b"x", **kw)
        # a record that does not fit is refused before its fields are looked at
        assert N.encode(h, 0, 10, 0, 0, b"x", **kw) == -1 == P.encode(bp, 0, 10, 0, 0, b"x", **kw)
        N.release(h)
        # (the reference may have written part of the header before raising)
        assert bn == bytearray(0x10100)
    h = N.handle(bytearray(10))
    with pytest.raises(ValueError):
        N.encode(h, 0, 11, 0, 0, b"")
    N.release(h)


@native
@SETTINGS
@given(lengths=st.lists(st.integers(0, 30), max_size=8), extra=st.integers(-20, 10),
       first=st.integers(0, U64 - 8), ts=st.integers(0, U64), priority=st.integers(0, 255),
       pos=st.integers(0, 50), room=st.integers(0, 500), as_array=st.booleans())
def test_encode_batch_identical(lengths, extra, first, ts, priority, pos, room, as_array):
    from array import array
    total = sum(lengths)
    # extra != 0: joined is longer or shorter than the lengths add up to
    joined = bytes(random.Random(total).randbytes(max(0, total + extra)))
    size = 600
    end = min(size, pos + room)
    bp, bn = bytearray(size), bytearray(size)
    rp = P.encode_batch(bp, pos, end, first, ts, joined, lengths, priority)
    h = N.handle(bn)
    arg = array("I", lengths) if as_array else lengths
    rn = N.encode_batch(h, pos, end, first, ts, joined, arg, priority)
    N.release(h)
    assert rn == rp
    assert bn == bp
    if rp >= 0:
        assert rp - pos <= F.batch_size(len(lengths), len(joined))
    if extra == 0 and rp >= 0:
        assert rp - pos == F.batch_size(len(lengths), total)
        n, stop, status, fields = same_scan(bp, pos, rp, first)
        assert (n, stop, status) == (len(lengths), rp, F.SCAN_END)
        fields = P.scan(bytes(bp), pos, rp, first, 1 << 20, True)[3]
        attrs = fields[4::F.SCAN_FIELDS]
        if len(lengths) > 1:
            # the head counts the batch; the others continue it
            assert attrs[0] >> 24 == F.RECORD_MARK | F.FLAG_BATCH
            assert F.batch_count_at(bp, pos, attrs[0]) == len(lengths)
            assert all(a >> 24 == F.RECORD_MARK | F.FLAG_CONT for a in attrs[1:])
        elif lengths:
            assert attrs[0] >> 24 == F.RECORD_MARK


@native
def test_encode_batch_edges():
    bn = bytearray(100)
    h = N.handle(bn)
    assert N.encode_batch(h, 7, 100, 0, 0, b"", []) == 7 == P.encode_batch(bytearray(100), 7, 100, 0, 0, b"", [])
    assert N.encode_batch(h, 8, 7, 0, 0, b"", []) == -1 == P.encode_batch(bytearray(100), 8, 7, 0, 0, b"", [])
    assert N.encode_batch(h, 0, 100, 0, 0, b"", [], priority=300) == 0
    with pytest.raises(struct.error):
        N.encode_batch(h, 0, 100, 0, 0, b"ab", [1, 1], priority=300)
    with pytest.raises(struct.error):
        P.encode_batch(bytearray(100), 0, 100, 0, 0, b"ab", [1, 1], priority=300)
    with pytest.raises(ValueError):
        N.encode_batch(h, 0, 101, 0, 0, b"ab", [1, 1])
    N.release(h)
    assert bn == bytearray(100)


def decode_ok(buf, pos, end, offset, payload, t0, t1):
    n, stop, status, f = P.scan(bytes(buf), pos, end, offset, 1, True)
    assert (n, stop) == (1, end)
    assert f[:3] == [pos, pos + HDR, len(payload)]
    assert t0 <= f[3] <= t1
    assert f[4] == F.RECORD_MARK << 24
    assert bytes(buf[pos + HDR:end]) == payload


def _writer(mod, buf, pos, end, offset, ctl=None):
    w = mod.Writer()
    h = mod.handle(buf)
    ch = None if ctl is None else mod.handle(ctl)
    w.attach(h, ch)
    with w:
        w.pos, w.end, w.next = pos, end, offset
    return w, [h] + ([ch] if ch is not None else [])


def _done(mod, w, handles):
    w.attach(None, None)
    for h in handles:
        mod.release(h)


@native
@SETTINGS
@given(payload=st.binary(max_size=80), offset=st.integers(0, (1 << 63) - 2),
       pos=st.integers(0, 50), room=st.integers(0, 150))
def test_writer_put_identical_but_for_time(payload, offset, pos, room):
    size = 200
    end = min(size, pos + room)
    bp, bn = bytearray(size), bytearray(size)
    wp, hp = _writer(P, bp, pos, end, offset)
    wn, hn = _writer(N, bn, pos, end, offset)
    t0 = time.time_ns()
    rp = P.put(wp.handle, payload, len(payload))
    rn = N.put(wn.handle, payload, len(payload))
    t1 = time.time_ns()
    assert rn == rp
    assert (wn.pos, wn.end, wn.next) == (wp.pos, wp.end, wp.next)
    _done(P, wp, hp)
    _done(N, wn, hn)
    if rp < 0:
        assert rp == -1
        assert bn == bp == bytearray(size)
        assert wp.pos == pos and wp.next == offset
        return
    assert rp == offset and wp.next == offset + 1
    for b in (bp, bn):
        decode_ok(b, pos, wp.pos, offset, payload, t0, t1)
    # everything but the crc and the timestamp is the same
    mask = lambda b: b[:pos] + b[pos + 4:pos + 16] + b[pos + 24:]  # noqa: E731
    assert mask(bn) == mask(bp)


@native
def test_writer_put_control_block():
    size = 4096
    for kind in ("mmap", "bytearray"):
        ctl_p = mmap.mmap(-1, F.CONTROL_SIZE) if kind == "mmap" else bytearray(F.CONTROL_SIZE)
        ctl_n = mmap.mmap(-1, F.CONTROL_SIZE) if kind == "mmap" else bytearray(F.CONTROL_SIZE)
        bp, bn = bytearray(size), bytearray(size)
        wp, hp = _writer(P, bp, 0, size, 9, ctl_p)
        wn, hn = _writer(N, bn, 0, size, 9, ctl_n)
        for c in (ctl_p, ctl_n):
            struct.pack_into("<Q", c, F.CTL_WANT, 1)
        assert P.put(wp.handle, b"abc", 3) == -2
        assert N.put(wn.handle, b"abc", 3) == -2
        assert bn == bp == bytearray(size)
        assert bytes(ctl_n) == bytes(ctl_p)
        for c in (ctl_p, ctl_n):
            struct.pack_into("<Q", c, F.CTL_WANT, 0)
            struct.pack_into("<Q", c, F.CTL_TAIL_POS, 12345)
        for w in (wp, wn):
            with w:
                w.end = 20
        assert P.put(wp.handle, b"abc", 3) == -1
        assert N.put(wn.handle, b"abc", 3) == -1
        assert bytes(ctl_n) == bytes(ctl_p)
        for w in (wp, wn):
            with w:
                w.end = size
        t0 = time.time_ns()
        assert P.put(wp.handle, b"abc", 3) == 9
        assert N.put(wn.handle, b"abc", 3) == 9
        assert N.put(wn.handle, b"de", 2) == 10
        assert P.put(wp.handle, b"de", 2) == 10
        t1 = time.time_ns()
        for c in (ctl_p, ctl_n):
            assert struct.unpack_from("<QQ", c, F.CTL_TAIL_POS) == (2 * HDR + 5, 11)
        assert bytes(ctl_n) == bytes(ctl_p)
        for b in (bp, bn):
            decode_ok(b, 0, HDR + 3, 9, b"abc", t0, t1)
            decode_ok(b, HDR + 3, 2 * HDR + 5, 10, b"de", t0, t1)
        _done(P, wp, hp)
        _done(N, wn, hn)


@native
def test_writer_put_is_thread_safe():
    # Threads racing on one writer: every record lands whole, offsets dense.
    import threading
    for mod in (P, N):
        buf = bytearray(1 << 20)
        w, hs = _writer(mod, buf, 0, len(buf), 0)
        got: list[int] = []

        def run(tag: int) -> None:
            for i in range(500):
                got.append(mod.put(w.handle, b"%d-%d" % (tag, i), len(b"%d-%d" % (tag, i))))

        threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got) == list(range(2000))
        n, stop, status, fields = P.scan(buf, 0, len(buf), 0, 5000, True)
        assert n == 2000 and status == F.SCAN_END and stop == w.pos
        _done(mod, w, hs)


# --- scanning ------------------------------------------------------------

@SETTINGS
@given(recs=records.filter(bool), base=bases)
def test_seek_finds_every_record_of_a_valid_stream(recs, base):
    buf, positions = build(recs, base)
    buf += bytes(HDR)
    for i, p in enumerate(positions[:-1]):
        for j in range(i, len(recs)):
            assert same_seek(buf, p, len(buf), base + i, base + j) == positions[j]
        assert same_seek(buf, p, len(buf), base + i, base + len(recs)) == -F.SCAN_END
    assert same_seek(buf, 0, len(buf), base + 1, base) == -F.SCAN_BAD_OFFSET


@native
@SETTINGS
@given(recs=records, base=bases, tail=st.integers(0, 40))
def test_scan_valid_streams(recs, base, tail):
    buf, positions = build(recs, base)
    buf += bytes(tail)
    n, stop, status, fields = same_scan(buf, 0, len(buf), base)
    assert (n, stop, status) == (len(recs), positions[-1], F.SCAN_END)
    for maxr in range(len(recs) + 1):
        n, stop, status, _ = same_scan(buf, 0, len(buf), base, maxr)
        assert (n, stop) == (maxr, positions[maxr])
    for i, p in enumerate(positions):
        same_scan(buf, p, len(buf), base + i)
        same_scan(buf, p, len(buf), base + i + 1)   # wrong offset
    check_stream(buf, positions, base)


@native
def test_scan_every_prefix_and_every_start():
    recs = [(b"", 0, None, None, 1), (b"payload", 3, TS, None, 2),
            (b"p" * 33, 255, None, b"key", U64), (b"x", 1, 0, b"k" * 9, 0),
            (b"\x00" * 5, 0, None, None, 5)]
    for base in (0, (1 << 24) - 2, U64 - 4):
        buf, positions = build(recs, base)
        buf += bytes(HDR + 3)
        for end in range(len(buf) + 1):
            same_scan(buf, 0, end, base)
            same_scan(buf, positions[1], end, base + 1)
        for start in range(len(buf) + 1):
            same_scan(buf, start, len(buf), base + 2)
            same_find(buf, start, len(buf), base, base + len(recs))
            same_find(buf, start, len(buf), base + 3, base + 3)
        for end in range(0, len(buf) + 1, 7):
            same_find(buf, 0, end, base, base + len(recs))


@native
@SETTINGS
@given(recs=records, base=bases, ops=st.lists(mutation, min_size=1, max_size=4))
def test_damaged_streams(recs, base, ops):
    buf, positions = build(recs, base)
    check_stream(mutate(buf, ops), positions, base)


@native
@SETTINGS
@given(garbage=st.binary(max_size=300), base=bases, start=st.integers(0, 300))
def test_random_garbage(garbage, base, start):
    start = min(start, len(garbage))
    same_scan(garbage, start, len(garbage), base)
    same_scan(garbage, 0, len(garbage), base, 3)
    same_find(garbage, start, len(garbage), base, base + 5)
    same_find(garbage, 0, len(garbage), 0, 1 << 25)


@native
@FEW
@given(recs=records.filter(bool), base=bases, seed=st.integers(0, 2**32))
def test_garbage_around_intact_records(recs, base, seed):
    rnd = random.Random(seed)
    buf, positions = build(recs, base)
    noise = bytearray(rnd.randbytes(rnd.randrange(0, 50)))
    for i in range(len(noise)):       # plenty of bytes that look like flags
        if rnd.random() < 0.3:
            noise[i] = rnd.choice([0x80, 0x81, 0x82, 0x83])
    data = noise + buf + bytes(rnd.randrange(0, 30))
    k = len(noise)
    check_stream(data, [p + k for p in positions], base)
    same_find(data, 0, len(data), base, base)     # both codecs agree
    assert P.find_next(data, 0, len(data), base, base, True) in range(0, k + 1)


lengths = st.one_of(st.integers(0, 64), st.sampled_from(
    [F.MAX_PAYLOAD - 1, F.MAX_PAYLOAD, F.MAX_PAYLOAD + 1, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF))
mlens = st.one_of(st.integers(0, 20), st.sampled_from([0xFFFF, 0xFFFE]), st.integers(0, 0xFFFF))
flag_values = st.one_of(st.sampled_from([0x80, 0x81, 0x82, 0x83, 0, 1, 2, 3, 0x84, 0xC0, 0xFF,
                                         0x88, 0x89, 0x8A, 0x8B, 0x8C, 0x8F, 0x90]),
                        st.integers(0, 255))


@native
@SETTINGS
@given(length=lengths, mlen=mlens, flags=flag_values, prio=st.integers(0, 255),
       off_delta=st.sampled_from([0, 0, 1, -1, 1 << 40]), body=st.binary(max_size=80),
       good_crc=st.booleans(), lead=st.integers(0, 3), base=bases, tail=st.binary(max_size=40))
def test_hostile_headers(length, mlen, flags, prio, off_delta, body, good_crc, lead, base, tail):
    offset = (base + off_delta) % (1 << 64)
    rec = raw_record(length, offset, TS, mlen, prio, flags, body,
                     None if good_crc else random.Random(length).getrandbits(32))
    buf, positions = build([(b"ok", 0, None, None, 1)], base)
    data = bytes(lead) + buf + rec + tail
    start = lead + positions[1]
    n = len(data)
    same_scan(data, start, n, base + 1)
    same_scan(data, lead, n, base)
    same_scan(data, start, min(n, start + HDR + mlen + length), base + 1)
    same_find(data, 0, n, base, base + 2)
    same_find(data, start, n, base + 1, base + 1)
    same_find(data, start, n, offset, offset)


@native
def test_every_flags_and_meta_len_combination():
    statuses = set()
    for flags in range(256):
        for mlen in range(0, 19):
            rec = raw_record(3, 7, TS, mlen, 0, flags, bytes(mlen) + b"abc")
            for data in (rec, rec + b"\x00", rec[:-1]):
                want = same_scan(data, 0, len(data), 7)
                statuses.add(want[2])
                same_find(data, 0, len(data), 0, 10)
    assert statuses == {F.SCAN_END, F.SCAN_BAD_HEADER, F.SCAN_TRUNCATED}


@native
def test_zero_and_short_tails():
    for n in range(0, HDR + 2):
        same_scan(bytes(n), 0, n, 0)
        for i in range(n):
            b = bytearray(n)
            b[i] = 1
            same_scan(b, 0, n, 0)
    # a header that is zero but for the crc field is not the end of the data
    b = bytearray(40)
    b[0] = 1
    assert same_scan(b, 0, 40, 0)[2] == F.SCAN_BAD_HEADER


@native
def test_scan_statuses_and_offset_wrap():
    recs = [(b"a", 0, None, None, 1), (b"b", 0, None, None, 2)]
    buf, pos = build(recs, U64 - 1)
    assert same_scan(buf, 0, len(buf), U64 - 1)[:3] == (2, pos[2], F.SCAN_END)
    # past 2**64 - 1 the reference expects an offset no record carries
    buf, pos = build(recs[:1], U64)
    b2, _ = build(recs[1:], 0)
    data = buf[:pos[1]] + b2
    assert same_scan(data, 0, len(data), U64)[:3] == (1, pos[1], F.SCAN_BAD_OFFSET)
    buf, pos = build(recs, 5)
    assert same_scan(buf, 0, len(buf), 6)[:3] == (0, 0, F.SCAN_BAD_OFFSET)
    bad = bytearray(buf)
    bad[pos[1] + HDR] ^= 1
    assert same_scan(bad, 0, len(bad), 5)[:3] == (1, pos[1], F.SCAN_BAD_CRC)
    assert same_scan(buf, 0, len(buf) - 1, 5)[:3] == (1, pos[1], F.SCAN_TRUNCATED)
    assert same_scan(buf, 0, len(buf), 5, 1)[:3] == (1, pos[1], F.SCAN_OK)
    assert same_scan(buf, len(buf), len(buf), 7)[:3] == (0, len(buf), F.SCAN_END)
    assert same_scan(buf, len(buf) + 5, len(buf), 7)[:3] == (0, len(buf) + 5, F.SCAN_END)
    assert same_scan(buf, 0, len(buf), 5, 0)[:3] == (0, 0, F.SCAN_OK)
    assert nscan(buf, 0, len(buf), 5, -1, True) == P.scan(buf, 0, len(buf), 5, -1, True)
    assert nscan(buf, 0, len(buf), 5, 1 << 70, False) == P.scan(buf, 0, len(buf), 5, 1 << 70)
    for data in (buf, bad, buf[:-1], b"", bytes(40)):
        for expected in (U64 + 1, 1 << 70):
            same_scan(data, 0, len(data), expected)
            same_scan(data, 0, len(data), expected, 0)


@native
def test_read_only_buffers_and_bounds():
    buf, pos = build([(b"abc", 0, None, None, 1), (b"de", 0, None, None, 2)], 3)
    with mmap.mmap(-1, len(buf)) as m:
        m[:] = buf
        m.flush()
        fd = os.memfd_create("logq-test") if hasattr(os, "memfd_create") else None
        if fd is not None:
            os.write(fd, bytes(buf))
            ro = mmap.mmap(fd, len(buf), prot=mmap.PROT_READ)
            for b in (ro, bytes(buf), m):
                h = N.handle(b)
                assert N.scan(h, 0, len(buf), 3, 10, True) == P.scan(b, 0, len(buf), 3, 10, True)
                assert N.find_next(h, 1, len(buf), 3, 4) == P.find_next(b, 1, len(buf), 3, 4)
                with pytest.raises(ValueError):
                    N.scan(h, 0, len(buf) + 1, 3, 10)
                with pytest.raises(ValueError):
                    N.find_next(h, 0, len(buf) + 1, 3, 4)
                N.release(h)
            ro.close()
            os.close(fd)


@native
@SETTINGS
@given(recs=records, base=bases, ops=st.lists(mutation, max_size=3),
       lo=st.integers(-5, 1 << 66), width=st.sampled_from([0, 1, 1 << 24, 1 << 30, 1 << 64, 1 << 66]))
def test_find_next_any_range(recs, base, ops, lo, width):
    buf, positions = build(recs, base)
    data = mutate(b"\x83" * 30 + buf, ops)
    for a, b in ((lo, lo + width), (base - lo % 7, base + width), (0, (1 << 64) - 1), (-3, -1)):
        for batch_ok in (False, True):
            want = P.find_next(data, 0, len(data), a, b, batch_ok)
            assert nfind(data, 0, len(data), a, b, batch_ok) == want
            if a > b:
                assert want == -1


@native
def test_find_next_over_zeros_and_noise_is_quick():
    """A zero-filled tail or binary noise costs no Python step per byte."""
    size = 2 << 20
    rnd = random.Random(3)
    for fill in (bytes(size), rnd.randbytes(size), b"\x80\x00" * (size // 2)):
        buf, _ = build([(b"found", 0, None, None, 1)], 7)
        data = fill + buf
        t = time.perf_counter()
        assert P.find_next(data, 0, len(data), 7, 7 + (1 << 20)) == size
        assert P.find_next(data, 0, len(data), 0, 1 << 26) == size
        assert nfind(data, 0, len(data), 0, U64) == size
        assert time.perf_counter() - t < 2


# --- the selector --------------------------------------------------------

def test_codec_selector():
    from logq import _codec
    assert _codec.native_enabled() == (_codec.impl.NAME == "native")
    for name in ("crc32c", "handle", "release", "encode", "encode_batch", "Writer", "put",
                 "prefault", "wait", "wake", "scan", "find_next", "seek"):
        assert getattr(_codec, name) is getattr(_codec.impl, name)
    if N is not None and os.environ.get("LOGQ_PURE") != "1":
        assert _codec.native_enabled()


@native
def test_prefault_maps_pages_and_changes_nothing(tmp_path):
    path = tmp_path / "seg"
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 64)           # 16 KiB of known bytes
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        h = N.handle(mm)
        assert N.prefault(h, 100, 10000) in (0, -1)   # -1: the kernel lacks MADV_POPULATE_WRITE
        assert P.prefault(mm, 100, 10000) == -1
        N.release(h)
        assert mm[:] == bytes(range(256)) * 64
        mm.close()


@native
def test_wait_reads_the_tail_word_like_the_reference():
    for mod in (P, N):
        ctl = mmap.mmap(-1, F.CONTROL_SIZE)
        h = mod.handle(ctl)
        struct.pack_into("=Q", ctl, F.CTL_TAIL_NEXT, 10)   # native-endian word
        assert mod.wait(h, 9, 0) == 1                       # offset 9 is there
        assert mod.wait(h, 10, 0) == 0                      # offset 10 is not
        assert mod.wait(h, 10, 1_000_000) == 0              # nor after 1 ms
        assert struct.unpack_from("=I", ctl, F.CTL_WAITERS)[0] == 0   # left as found
        mod.wake(h)
        mod.release(h)
        ctl.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="futexes are Linux's")
@pytest.mark.parametrize("waiter,waker,word", [("wait", "wake", F.CTL_TAIL_NEXT),
                                               ("wait_synced", "wake_synced", F.CTL_SYNCED_NEXT)])
def test_pure_waits_sleep_on_a_futex_that_the_writer_wakes(tmp_path, waiter, waker, word):
    """The pure codec's waits are futexes (through ctypes), not naps: a
    waiter whose sleep may last 20 s is back as soon as another thread
    stores the word and wakes it (the polling version napped, and its
    wake was a no-op)."""
    import threading
    assert P._FUTEX is not None
    ctl = mmap.mmap(-1, F.CONTROL_SIZE)
    words = memoryview(ctl).cast("B").cast("Q")

    def store_and_wake() -> None:
        time.sleep(0.2)
        words[word >> 3] = 11
        getattr(P, waker)(ctl)

    t = threading.Thread(target=store_and_wake)
    began = time.monotonic()
    t.start()
    got = getattr(P, waiter)(ctl, 10, 20_000_000_000) if waiter != "wait" else \
        P._wait_word(ctl, word, (10).__lt__, 20_000_000_000, 20_000_000_000, F.CTL_WAITERS, 5_000_000)
    t.join()
    assert got == 1 and time.monotonic() - began < 10
    words.release()
    ctl.close()
