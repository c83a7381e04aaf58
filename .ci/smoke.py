"""Smoke test of an installed logq (run by .ci/package in a fresh venv, from
outside the source tree): put/get/ack through the installed package, on the
codec the install is expected to have, and the ``logq`` command.

    python smoke.py native|pure
"""

import os
import subprocess
import sys
import tempfile

import logq

expect = sys.argv[1]
here = os.path.dirname(os.path.abspath(logq.__file__))
# The package under test is the installed one, not the source tree.
assert "site-packages" in here, here
assert os.path.exists(os.path.join(here, "py.typed")), "py.typed is missing from the install"
assert logq.native_enabled() == (expect == "native"), (expect, logq.native_enabled())

with tempfile.TemporaryDirectory() as d:
    with logq.open(os.path.join(d, "q"), fsync="always") as q:
        first = q.put(b"hello")
        batch = q.put_many([b"a", b"b"])
        assert list(batch) == [first + 1, first + 2]
        assert q.read(first) == b"hello"
        c = q.consumer("smoke")
        got = []
        for _ in range(3):
            m = c.get(timeout=5)
            got.append(m.data)
            c.ack(m)
        c.commit()
        assert got == [b"hello", b"a", b"b"], got
        assert q.stats()["groups"]["smoke"]["backlog"] == 0
    # The acks were committed: a new consumer of the group gets nothing.
    with logq.open(os.path.join(d, "q")) as q:
        c = q.consumer("smoke")
        try:
            c.get(timeout=0.2)
        except logq.Empty:
            pass
        else:
            raise AssertionError("an acked message was delivered again")

import logq.tasks  # noqa: E402,F401 - the tasks layer imports from an install too

out = subprocess.run(["logq", "--help"], capture_output=True, text=True, check=True).stdout
assert "bench" in out and "verify" in out, out
print(f"smoke ok: {expect} codec, logq {here}")
