"""A full disk is a clean DiskFullError, not a SIGBUS: segments are
preallocated before anything is written through their mapping.  The failing
write is real: the child process runs under RLIMIT_FSIZE, so the kernel
refuses to grow a file past the limit (EFBIG), as it would refuse a full
filesystem (ENOSPC)."""

from __future__ import annotations

from helpers import run_child

import logq

CHILD = r"""
import resource, signal, sys
import logq
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # get EFBIG, not the signal
qdir = sys.argv[1]
with logq.open(qdir, fsync="always", segment_bytes=1 << 16):
    pass                                            # index and a 64 KiB segment exist
# No file may grow past 512 KiB now, and the next segment wants 1 MiB.
resource.setrlimit(resource.RLIMIT_FSIZE, (512 << 10, resource.RLIM_INFINITY))
q = logq.open(qdir, fsync="batch", segment_bytes=1 << 20)
stored = []
try:
    for i in range(10_000):
        stored.append(q.put(b"m%d-" % i + bytes(200)))
except logq.DiskFullError as e:
    assert isinstance(e, logq.QueueFullError) and isinstance(e, OSError), type(e)
    print("full after", len(stored), "puts:", e, flush=True)
else:
    raise SystemExit("the disk never filled")
# The queue is intact and usable: everything stored reads back, a batch that
# needs a new segment fails whole, and a small put still fits.
assert all(q.read(o) == b"m%d-" % i + bytes(200) for i, o in enumerate(stored))
before = q.next_offset
try:
    q.put_many([bytes(100 << 10)])
except logq.DiskFullError:
    pass
assert q.next_offset == before
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
assert q.put(b"after") == before                     # space again: works again
q.close()
print("ok", len(stored), flush=True)
"""


def test_full_disk_is_a_clean_error(tmp_path):
    qdir = str(tmp_path / "q")
    rc, out = run_child(CHILD, str(tmp_path / "out"), qdir, timeout=120)
    assert rc == 0, out
    assert "ok" in out
    stored = int(out.split("ok ")[1].split()[0])
    with logq.open(qdir) as q:
        assert len(q) == stored + 1
        assert q.read(stored) == b"after"
        assert q.read(0) == b"m0-" + bytes(200)
