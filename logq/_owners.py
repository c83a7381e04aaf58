"""Owners: how one process tells whether the holder of a lease is alive.

Every process that consumes from a queue directory holds an exclusive
``flock`` on one file of its own, ``owners/<id>`` (a random 63-bit id in 16
hex digits); each claim in the lease table names its owner's id.  Another
process asks whether an owner lives by trying the same lock: the kernel
drops it when the holder dies, however it dies, so a dead holder's claims
are reaped at once instead of at their expiry.

Promises of the registry below:

* **one owner per process and directory**: every consumer group a process
  has open on one queue directory shares one id (and one descriptor);
* **the directory's identity, not its path**: the registry is keyed by the
  directory's ``st_dev``/``st_ino`` and the queue id in ``logq.meta``.  A
  directory deleted and made again at the same path is another queue: a
  process that uses it takes a new id there, with its file in that
  directory (the old one went with the old directory, and another process
  that found no file would take this live process's claims for a dead
  one's);
* **nothing left behind**: ``acquire`` and ``release`` are counted; when
  the last user in this process releases, the file is removed and the
  descriptor closed.  Thread-safe;
* **fork**: a child does not inherit its parent's identity.  It closes its
  copies of the descriptors (the parent keeps its locks: a flock belongs to
  the open file description, released only when every descriptor on it is
  closed) and takes ids of its own.  The descriptors are ``O_CLOEXEC``, so
  spawned and forkserver children never see them.
"""

from __future__ import annotations

import fcntl
import os
import threading

from logq import _format as F


class Owner:
    """This process's owner on one queue directory: ``id`` (claims carry
    it), the flocked descriptor ``fd`` on ``path``, and how many users hold
    it (``refs``)."""

    __slots__ = ("key", "id", "fd", "path", "refs", "pid")

    def __init__(self, key: tuple[int, int, str], owner_id: int, fd: int, path: str) -> None:
        self.key = key
        self.id = owner_id
        self.fd = fd
        self.path = path
        self.refs = 0
        self.pid = os.getpid()

    def __repr__(self) -> str:
        return f"<Owner {self.id:016x} refs={self.refs} {self.path}>"


_registry: dict[tuple[int, int, str], Owner] = {}   # (st_dev, st_ino, queue id) -> owner
_lock = threading.Lock()


def _identity(qdir: str, queue_id: str) -> tuple[int, int, str]:
    st = os.stat(qdir)
    return st.st_dev, st.st_ino, queue_id


def _new_file(d: str) -> tuple[int, int, str]:
    """A new owner file in ``d``, created and locked: (id, fd, path)."""
    os.makedirs(d, exist_ok=True)
    # Locked under a temporary name (not hex: clear_dead skips it), then
    # linked into place: a file under an owner's name is never unlocked
    # while its owner lives, or another process would reap it as dead.
    tmp = os.path.join(d, f".new-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        while True:
            owner_id = int.from_bytes(os.urandom(8), "little") >> 1 or 1
            path = os.path.join(d, f"{owner_id:016x}")
            try:
                os.link(tmp, path)
            except FileExistsError:
                continue
            return owner_id, fd, path
    except BaseException:
        os.close(fd)
        raise
    finally:
        os.unlink(tmp)


def _file_is_ours(o: Owner) -> bool:
    try:
        st = os.stat(o.path)
    except FileNotFoundError:
        return False
    fs = os.fstat(o.fd)
    return (st.st_dev, st.st_ino) == (fs.st_dev, fs.st_ino)


def acquire(qdir: str, queue_id: str) -> Owner:
    """This process's owner on the queue directory ``qdir`` (whose
    ``logq.meta`` says ``queue_id``), with one more user: call
    :func:`release` once for each call."""
    key = _identity(qdir, queue_id)
    with _lock:
        o = _registry.get(key)
        if o is not None and o.pid == os.getpid():
            if not _file_is_ours(o):
                # Someone removed our file by hand: the id must stay (claims
                # carry it), so lock a new file under the same name.
                d = os.path.dirname(o.path)
                os.makedirs(d, exist_ok=True)
                fd = os.open(d + f"/.new-{os.getpid()}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.replace(d + f"/.new-{os.getpid()}", o.path)
                os.close(o.fd)
                o.fd = fd
        else:
            owner_id, fd, path = _new_file(os.path.join(qdir, F.OWNERS_DIR))
            o = _registry[key] = Owner(key, owner_id, fd, path)
        o.refs += 1
        return o


def release(o: Owner) -> None:
    """One user of ``o`` is done; the last one removes the owner file and
    closes its descriptor.  (No claim of this process on the directory is
    left by then: the groups gave theirs back when they closed.)  A second
    release of a spent owner, or one in a forked child, does nothing."""
    with _lock:
        if o.refs <= 0 or o.pid != os.getpid():
            return
        o.refs -= 1
        if o.refs:
            return
        if _registry.get(o.key) is o:
            del _registry[o.key]
        # Unlink while still locked: another process sees a locked file
        # or none, never an unlocked one it would reap.
        if _file_is_ours(o):
            try:
                os.unlink(o.path)
            except FileNotFoundError:
                pass
        os.close(o.fd)
        o.fd = -1


def held() -> list[Owner]:
    """The owners this process holds now (for tests and diagnostics)."""
    with _lock:
        return [o for o in _registry.values() if o.pid == os.getpid()]


def alive(qdir: str, owner_id: int) -> bool:
    """Whether the process with ``owner_id`` on ``qdir`` is alive (holds its
    file locked).  A dead owner's file is removed on the way."""
    path = os.path.join(qdir, F.OWNERS_DIR, f"{owner_id:016x}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    try:
        os.unlink(path)     # its holder is gone: nobody will ask again
    except FileNotFoundError:
        pass
    return False


def clear_dead(qdir: str) -> None:
    """Remove the owner files of dead processes (any that is not locked)."""
    d = os.path.join(qdir, F.OWNERS_DIR)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return
    for name in names:
        try:
            alive(qdir, int(name, 16))
        except ValueError:
            pass


def _after_fork_in_child() -> None:
    # The child shares the parent's locked file descriptions: drop its copies
    # (the parent's locks stay) so that the child takes ids of its own.  The
    # lock is made anew: another thread of the parent may have held it.
    global _lock
    _lock = threading.Lock()
    for o in _registry.values():
        try:
            os.close(o.fd)
        except OSError:
            pass
        o.refs = 0
    _registry.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
