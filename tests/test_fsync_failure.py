"""A failing fdatasync (EIO) is not papered over: the put that waited for it
raises, every later put and flush raises until the queue is reopened (after
a failed fsync the kernel may have dropped the dirty pages, so nothing newer
can be vouched for), and everything that was acknowledged before is intact
after reopening.  The failure is real: a small LD_PRELOAD library makes the
C library's fdatasync fail after a number of calls."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import logq
from helpers import child_env

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
static int calls;
int fdatasync(int fd)
{
    static int (*real)(int);
    const char *after = getenv("FAIL_FDATASYNC_AFTER");
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (after && ++calls > atoi(after)) {
        errno = EIO;
        return -1;
    }
    return real(fd);
}
"""

CHILD = r"""
import sys
import logq
q = logq.open(sys.argv[1], fsync="always", segment_bytes=1 << 16)
acked = 0
try:
    for i in range(100_000):
        off = q.put(b"m%d" % i)
        assert off == i
        acked += 1
except logq.LogqError as e:
    print("failed after", acked, "acks:", e, flush=True)
else:
    raise SystemExit("fdatasync never failed")
for call in (lambda: q.put(b"more"), q.flush, lambda: q.put_many([b"a", b"b"])):
    try:
        call()
    except logq.LogqError as e:
        assert "reopen" in str(e), e
    else:
        raise SystemExit("the queue went on after a failed fsync")
print("acked", acked, flush=True)
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    assert cc, "a C compiler is needed to build the fdatasync fault injector"
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.c").write_text(SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "shim.so"), str(d / "shim.c"), "-ldl"],
                   check=True)
    return str(d / "shim.so")


def test_failed_fdatasync_stops_the_queue_and_keeps_what_was_acknowledged(tmp_path, shim):
    qdir = str(tmp_path / "q")
    env = child_env(LD_PRELOAD=shim, FAIL_FDATASYNC_AFTER="40")
    proc = subprocess.run([sys.executable, "-c", CHILD, qdir], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    acked = int(proc.stdout.split("acked ")[1].split()[0])
    assert acked > 0
    with logq.open(qdir) as q:            # reopened without the fault: recovery
        assert q.next_offset >= acked
        assert [q.read(i) for i in range(acked)] == [b"m%d" % i for i in range(acked)]
        n = q.next_offset
        assert q.put(b"after") == n
