"""The step journal of ``checkpoint="run"``: where a running workflow's
step records wait, in the worker that ran them, until its run's settlement
writes them to the index (they travel there in the run's outcome).

Each process appends to a file of its own under ``<queue>/wf-journal/``
(one ``write`` per step, no fsync: the page cache keeps it when the process
dies, not when the machine does).  A run delivered again (attempt > 1: the
worker or the pool running it died before its outcome committed) reads
every journal for the records of its own run id and replays those steps
instead of running them again: so a kill re-runs only the step it
interrupted.  Records carry a CRC32: a torn tail (a process killed inside
its write, a power cut) ends a file's scan, nothing torn is returned.

A process starts a new file after ``ROTATE`` bytes.  A record is needed
until its run's outcome commits, which may come later than any number of
bytes (a long run, a pool slow to commit): so a file is deleted only once
none of the runs it holds is current any more (``any_current``, from the
index: their outcomes committed, or their workflows moved on or ended).  A
process looks at its older files when it starts a new one, keeping the
newest two regardless; a dead process's files go the same way
(``sweep``).
"""

from __future__ import annotations

import os
import struct
import time
import zlib

from typing import Callable, Iterator

from logq._status import pid_alive

DIR = "wf-journal"
ROTATE = 4 << 20        # bytes per file before the next
_HEAD = struct.Struct("<II")    # body length, CRC32 of the body
_K = struct.Struct(">I")


class Journal:
    """This process's step journal for one queue directory."""

    def __init__(self, qdir: str, any_current: Callable[[set[tuple[str, str]]], bool]) -> None:
        """``any_current((wid, run) pairs)``: whether any of those runs is
        still current (read from the index)."""
        self.dir = os.path.join(qdir, DIR)
        self.any_current = any_current
        self.fd = -1
        self.pid = 0
        self.size = 0
        self.files: list[str] = []

    def _next_file(self) -> None:
        if self.fd >= 0 and self.pid == os.getpid():
            os.close(self.fd)
        else:
            self.files = []     # (a forked child starts files of its own)
        os.makedirs(self.dir, exist_ok=True)
        name = os.path.join(self.dir, f"{os.getpid()}-{time.time_ns()}.log")
        self.fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.pid, self.size = os.getpid(), 0
        self.files.append(name)
        older, self.files = self.files[:-2], self.files[-2:]
        for path in reversed(older):
            runs = self._runs(path)
            if runs and self.any_current(runs):
                self.files.insert(0, path)      # a run in it has not settled: kept
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def append(self, wid: str, run: str, k: int, packed: bytes) -> None:
        """Record step ``k`` of run ``run`` of workflow ``wid`` (its packed
        record): one write, in the page cache when it returns."""
        if self.pid != os.getpid() or self.size >= ROTATE:
            self._next_file()
        body = b"".join((wid.encode(), b"\0", run.encode(), b"\0", _K.pack(k), packed))
        rec = _HEAD.pack(len(body), zlib.crc32(body)) + body
        os.write(self.fd, rec)
        self.size += len(rec)

    def _files(self) -> Iterator[tuple[str, bool]]:
        """(path, written by a dead process) of every journal file."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        for name in names:
            pid = name.partition("-")[0]
            dead = pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))
            yield os.path.join(self.dir, name), dead

    @staticmethod
    def _records(path: str) -> Iterator[bytes]:
        """The bodies of a file's intact records, up to a torn one."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        pos = 0
        while pos + _HEAD.size <= len(data):
            size, crc = _HEAD.unpack_from(data, pos)
            body = data[pos + _HEAD.size:pos + _HEAD.size + size]
            if len(body) != size or zlib.crc32(body) != crc:
                return      # a torn tail
            pos += _HEAD.size + size
            yield body

    def find(self, wid: str, run: str) -> dict[int, bytes]:
        """The packed records of run ``run`` of ``wid`` in every journal
        (the first found of each step)."""
        prefix = b"".join((wid.encode(), b"\0", run.encode(), b"\0"))
        n = len(prefix)
        out: dict[int, bytes] = {}
        for path, _dead in self._files():
            for body in self._records(path):
                if body.startswith(prefix) and len(body) >= n + 4:
                    out.setdefault(_K.unpack_from(body, n)[0], body[n + 4:])
        return out

    def _runs(self, path: str) -> set[tuple[str, str]]:
        """The (wid, run) pairs with records in a file."""
        runs = set()
        for body in self._records(path):
            a = body.find(b"\0")
            b = body.find(b"\0", a + 1)
            if a > 0 and b > a:
                runs.add((body[:a].decode(errors="replace"), body[a + 1:b].decode(errors="replace")))
        return runs

    def sweep(self) -> None:
        """Delete the files of dead processes none of whose runs is current."""
        for path, dead in self._files():
            if not dead:
                continue
            runs = self._runs(path)
            if not runs or not self.any_current(runs):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
