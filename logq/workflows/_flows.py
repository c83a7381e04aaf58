"""The durable workflows' records on one App's queue (``Flows``), the
states, errors and step records that ``_durable`` runs workflows with.

**Records** (index database ``wf.flow``)::

    F<wid>            the workflow: JSON {name, state, current, waiting, until, ser,
                      created, finished, parent, error}
    A<wid>            its arguments, [args, kwargs] as its serializer encodes
    R<wid>            its result, encoded
    T<run task id>    -> wid, while that run is current
    S<wid>\\0<u32 k>   step k: u32 header length, JSON header {name, ok, until,
                      done, child}, then the encoded result (or error JSON)
    E<wid>\\0<name>\\0<u64>  an event not yet taken, encoded
    X<run task id>    a first run that gave up waiting for its start (see
                      ``Workflow._await_start``): that start fails
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from logq._errors import TaskError, TaskNotFound
from logq.tasks import _state as S
from logq.tasks._records import dumps, encode_task, make_id, new_nonce
from logq.workflows._joins import _prefix_items, release
from logq.workflows._journal import Journal

if TYPE_CHECKING:
    from logq.workflows._durable import Workflow

_U32 = struct.Struct(">I")
_HDR = struct.Struct("<I")
RUNNING, SLEEPING, WAITING = "running", "sleeping", "waiting"
SUCCEEDED, FAILED, CANCELLED = S.SUCCEEDED, S.FAILED, S.CANCELLED
FINAL = frozenset((SUCCEEDED, FAILED, CANCELLED))
_FIRST_GIVE_UP = 30.0   # a first run before its start's transaction is retried until the start is this old (s),
                        # then gives up, and that start fails if it comes (``Workflow._await_start``)


class WorkflowError(TaskError):
    """Base of the durable workflows' errors."""


class NonDeterminismError(WorkflowError):
    """A replay reached a step other than the one recorded at its position:
    the workflow's code changed, or it branches on something not recorded
    (time, randomness, I/O outside steps).  The workflow fails."""


class StepFailed(WorkflowError):
    """A step raised: ``type`` and ``message`` of the remote error (the same
    on the first run and on replays)."""

    def __init__(self, step: str, type_name: str, message: str) -> None:
        super().__init__(f"step {step} failed: {type_name}: {message}")
        self.step, self.type, self.message = step, type_name, message


class WorkflowFailed(WorkflowError):
    """``result()`` of a workflow that failed: ``type``, ``message``."""

    def __init__(self, wid: str, type_name: str, message: str) -> None:
        super().__init__(f"workflow {wid} failed: {type_name}: {message}")
        self.id, self.type, self.message = wid, type_name, message


class WorkflowCancelled(WorkflowError):
    """``result()`` of a cancelled workflow."""


class _Park(Exception):
    def __init__(self, resume: str, event: str | None, until: int) -> None:
        self.resume, self.event, self.until = resume, event, until


class _NotCurrent(Exception):
    """This run is not (or no longer) the workflow's current run."""


def _fk(kind: bytes, wid: str) -> bytes:
    return kind + wid.encode()


def _sk(wid: str, k: int) -> bytes:
    return b"S" + wid.encode() + b"\0" + _U32.pack(k)


_OK_HEADERS: dict[str, bytes] = {}     # a returned step's packed header, by name (bounded)


def _pack_step(header: dict[str, Any], payload: bytes) -> bytes:
    if len(header) == 2 and header.get("ok") is True:
        h = _OK_HEADERS.get(header["name"])
        if h is None:
            j = json.dumps(header).encode()
            h = _HDR.pack(len(j)) + j
            if len(_OK_HEADERS) < 4096:
                _OK_HEADERS[header["name"]] = h
        return h + payload
    h = json.dumps(header).encode()
    return _HDR.pack(len(h)) + h + payload


def _unpack_step(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = _HDR.unpack_from(raw)[0]
    return json.loads(raw[4:4 + n]), bytes(raw[4 + n:])


def _err(e: BaseException) -> dict[str, str]:
    t = type(e)
    name = t.__qualname__ if t.__module__ in ("builtins", None) else f"{t.__module__}.{t.__qualname__}"
    return {"type": name, "message": str(e)}


@dataclass(frozen=True)
class WorkflowStatus:
    """A workflow now: ``state`` is running, sleeping (until ``until``,
    epoch s), waiting (for the event ``waiting``, at most until
    ``until``), succeeded, failed (``error``) or cancelled; ``steps`` is
    the number of step records."""
    id: str
    name: str
    state: str
    steps: int
    created: float | None
    finished: float | None = None
    waiting: str | None = None
    until: float | None = None
    error: dict[str, str] | None = None
    current: str | None = None


class Flows:
    """The durable workflows' records on one App's queue."""

    def __init__(self, app: Any, txn: Any = None) -> None:
        from logq.workflows._plugin import open_db
        self.app = app
        self.store = app._store()
        self.idx = self.store.idx
        self.db = open_db(self.idx, b"wf.flow", txn)
        # The task names of the app's workflows (registered by ``workflow``,
        # also later: the same set).
        self.runs: set[str] = app.__dict__.setdefault("_wf_names", set())
        # Steps checkpointed per run (checkpoint="run") wait in this
        # process's journal (``_journal``) and travel in the run's outcome.
        self.journal = Journal(self.store.q.path, self._any_current)
        if txn is None:
            self.journal.sweep()    # (files of dead workers whose runs all settled)

    # -- reads ------------------------------------------------------------------------
    def flow(self, wid: str, txn: Any = None) -> dict[str, Any] | None:
        raw = (txn.get(_fk(b"F", wid), db=self.db) if txn is not None
               else self.idx.get(_fk(b"F", wid), self.db))
        return None if raw is None else json.loads(raw)

    def steps(self, wid: str) -> dict[int, tuple[dict[str, Any], bytes]]:
        """Step records in the index (with checkpoint="run", those of a run
        in progress are not there yet)."""
        prefix = b"S" + wid.encode() + b"\0"

        def fn(txn: Any) -> dict[int, tuple[dict[str, Any], bytes]]:
            return {_U32.unpack(k[-4:])[0]: _unpack_step(v) for k, v in _prefix_items(txn, self.db, prefix)}
        return self.idx.read(fn)

    def _any_current(self, runs: set[tuple[str, str]]) -> bool:
        def fn(txn: Any) -> bool:
            for wid, run in runs:
                f = self.flow(wid, txn)
                if f is not None and f["current"] == run and f["state"] == RUNNING:
                    return True
            return False
        return self.idx.read(fn)

    def status(self, wid: str) -> WorkflowStatus:
        f = self.flow(wid)
        if f is None:
            raise TaskNotFound(f"no workflow {wid!r} in {self.app.path}")
        state = f["state"]
        if state == RUNNING and f.get("parked"):
            state = WAITING if f.get("waiting") else SLEEPING
        until = f.get("until") or 0
        return WorkflowStatus(wid, f["name"], state, len(self.steps(wid)), f.get("created"),
                              f.get("finished"), f.get("waiting") if state == WAITING else None,
                              until / 1e9 if until and state in (SLEEPING, WAITING) else None,
                              f.get("error"), f.get("current"))

    def ids(self) -> list[str]:
        def fn(txn: Any) -> list[str]:
            return [k[1:].decode() for k, _v in _prefix_items(txn, self.db, b"F")]
        return self.idx.read(fn)

    # -- writes -------------------------------------------------------------------------
    def _write(self, fn: Callable[[Any], Any]) -> Any:
        out = self.idx.write(fn)
        q = self.store.q
        q._poke()
        q._bump_written()
        return out

    def start(self, wf: "Workflow", wid: str, args: tuple[Any, ...], kwargs: dict[str, Any],
              parent: tuple[str, str] | None = None) -> bool:
        """Create workflow ``wid`` and release its first run, unless it
        exists: whether it was created."""
        return self.start_many(wf, [(wid, args, kwargs)], parent)[0]

    def start_many(self, wf: "Workflow", items: list[tuple[str, tuple[Any, ...], dict[str, Any]]],
                   parent: tuple[str, str] | None = None) -> list[bool]:
        """``start`` of each (id, args, kwargs), in one index transaction,
        after one ``put_many`` of their first runs, due at once and flushed
        (on disk before the index names them, whatever the fsync policy).
        A first run that comes before its workflow's transaction waits for
        it (``Workflow._run``)."""
        ser = self.app._serializer(wf.serializer)
        now = time.time_ns()
        there = self.idx.read(lambda txn: [txn.get(_fk(b"F", w), db=self.db) is not None
                                           for w, _a, _k in items])
        todo: list[tuple[str, bytes, str] | None] = []
        runs: list[tuple[int, bytes]] = []
        for (wid, args, kwargs), known in zip(items, there):
            if known:
                todo.append(None)
                continue
            body = dumps(ser, [list(args), dict(kwargs)], f"the arguments of workflow {wf.name}")
            nonce = new_nonce()
            runs.append((nonce, encode_task(nonce, wf.name, ser.name, dumps(ser, [[wid, now], {}], "a run"))))
            todo.append((wid, body, ""))
        if runs:
            q = self.app.queue
            offs = iter(zip(q.put_many([r for _n, r in runs]), (n for n, _r in runs)))
            q.flush()
            todo = [t if t is None else (t[0], t[1], make_id(*next(offs))) for t in todo]
        base = {"name": wf.name, "state": RUNNING, "waiting": None, "until": 0, "ser": ser.name,
                "created": now / 1e9, "finished": None, "parent": parent, "error": None,
                "parked": False, "ck": wf.checkpoint}

        def fn(txn: Any) -> list[bool]:
            out = []
            for t in todo:
                if t is None:
                    out.append(False)
                    continue
                wid, body, tid = t
                # (A run whose workflow exists meanwhile runs as not current: a no-op.)
                if txn.get(_fk(b"F", wid), db=self.db) is not None:
                    out.append(False)
                    continue
                if txn.get(_fk(b"X", tid), db=self.db) is not None:
                    # Its first run waited _FIRST_GIVE_UP for this transaction
                    # and gave up: naming it now would accept a workflow with
                    # no run to make progress.  Nothing of this call commits.
                    raise WorkflowError(f"workflow {wid}: its start took longer than {_FIRST_GIVE_UP:g}s "
                                        "between putting its first run and committing; not started "
                                        "(start it again)")
                txn.put(_fk(b"F", wid), json.dumps(dict(base, current=tid)).encode(), db=self.db)
                txn.put(_fk(b"A", wid), body, db=self.db)
                txn.put(_fk(b"T", tid), wid.encode(), db=self.db)
                out.append(True)
            return out
        if all(t is None for t in todo):
            return [False] * len(todo)
        return self._write(fn)

    def load(self, wid: str, run: str, attempt: int = 1) -> tuple[dict[str, Any] | None, bytes | None,
                                                                  dict[int, Any], dict[int, bytes]]:
        """What a run needs, in one index read: the workflow record, its
        arguments, its step records; with checkpoint="run", on an attempt
        after the first (an earlier one was killed, or its outcome did not
        commit), the records it left in a journal too.  (flow, args, steps,
        the journal's packed records not in the index)."""
        prefix = b"S" + wid.encode() + b"\0"

        def fn(txn: Any) -> tuple[Any, Any, dict[int, Any]]:
            raw = txn.get(_fk(b"F", wid), db=self.db)
            if raw is None:
                return None, None, {}
            return (json.loads(raw), txn.get(_fk(b"A", wid), db=self.db),
                    {_U32.unpack(k[-4:])[0]: _unpack_step(v) for k, v in _prefix_items(txn, self.db, prefix)})
        f, args, steps = self.idx.read(fn)
        pending: dict[int, bytes] = {}
        if attempt > 1 and f is not None and f.get("ck") == "run" and f["current"] == run:
            pending = {k: p for k, p in self.journal.find(wid, run).items() if k not in steps}
            for k, packed in pending.items():
                steps[k] = _unpack_step(packed)
        return f, args, steps, pending

    def record(self, wid: str, run: str, k: int, header: dict[str, Any],
               payload: bytes) -> tuple[dict[str, Any], bytes]:
        """Record step ``k`` in the index (one fsynced transaction), if
        ``run`` is still current; the record that stands (one written
        meanwhile wins).  Raises _NotCurrent."""
        key = _sk(wid, k)

        def fn(txn: Any) -> tuple[dict[str, Any], bytes]:
            f = self.flow(wid, txn)
            if f is None or f["current"] != run or f["state"] != RUNNING:
                raise _NotCurrent(wid)
            raw = txn.get(key, db=self.db)
            if raw is not None:
                return _unpack_step(bytes(raw))
            txn.put(key, _pack_step(header, payload), db=self.db)
            return header, payload
        return self.idx.write(fn)

    def take_event(self, wid: str, run: str, k: int, header: dict[str, Any], name: str,
                   timed_out: bool) -> tuple[dict[str, Any], bytes] | None:
        """Step ``k`` waits for event ``name``: take the oldest one (or, once
        ``timed_out``, record that none came) and record the step done, in
        one transaction; None if there is none yet."""
        prefix = b"E" + wid.encode() + b"\0" + name.encode() + b"\0"

        def fn(txn: Any) -> tuple[dict[str, Any], bytes] | None:
            f = self.flow(wid, txn)
            if f is None or f["current"] != run or f["state"] != RUNNING:
                raise _NotCurrent(wid)
            for k2, v in _prefix_items(txn, self.db, prefix):
                txn.delete(k2, db=self.db)
                h = dict(header, done=True)
                txn.put(_sk(wid, k), _pack_step(h, v), db=self.db)
                return h, v
            if not timed_out:
                return None
            h = dict(header, done=True, timeout=True)
            txn.put(_sk(wid, k), _pack_step(h, b""), db=self.db)
            return h, b""
        return self.idx.write(fn)

    def send_event(self, wid: str, name: str, value: Any) -> bool:
        """Store event ``name`` for workflow ``wid``, durably; a run parked
        waiting for it is released in the same transaction.  False if the
        workflow has finished (nothing stored).  Raises TaskNotFound."""
        f = self.flow(wid)
        if f is None:
            raise TaskNotFound(f"no workflow {wid!r} in {self.app.path}")
        payload = dumps(self.app._serializer(f["ser"]), value, f"event {name!r}")
        return self._write(lambda txn: self._event_in(txn, wid, name, payload))

    def _event_in(self, txn: Any, wid: str, name: str, payload: bytes) -> bool:
        f = self.flow(wid, txn)
        if f is None or f["state"] in FINAL:
            return False
        txn.put(b"E" + wid.encode() + b"\0" + name.encode() + b"\0" + time.time_ns().to_bytes(8, "big"),
                payload, db=self.db)
        if f.get("parked") and f.get("waiting") == name:
            release(txn, self.idx, f["current"])
            f["waiting"] = None
            txn.put(_fk(b"F", wid), json.dumps(f).encode(), db=self.db)
        return True

    def cancel(self, wid: str) -> bool:
        """Cancel the workflow: it records no more steps and its parked run
        drains unrun.  False if it had finished."""
        def fn(txn: Any) -> bool:
            f = self.flow(wid, txn)
            if f is None:
                raise TaskNotFound(f"no workflow {wid!r} in {self.app.path}")
            if f["state"] in FINAL:
                return False
            if f.get("parked"):
                release(txn, self.idx, f["current"])     # it drains: the workflow is final
            self._end(txn, wid, f, CANCELLED, None, {"type": "WorkflowCancelled", "message": "cancelled"})
            return True
        return self._write(fn)

    # -- the settle hook (the pool's process) -------------------------------------------
    def on_settle(self, txn: Any, task_id: str, event: str, out: Any) -> None:
        if out.state not in S.FINAL or out.name not in self.runs:
            return      # (not a run of a workflow: no index read)
        raw = txn.get(_fk(b"T", task_id), db=self.db)
        if raw is None:
            return      # not a current run
        wid = bytes(raw).decode()
        txn.delete(_fk(b"T", task_id), db=self.db)
        f = self.flow(wid, txn)
        if f is None or f["current"] != task_id or f["state"] in FINAL:
            return
        info = self.app._serializer(out.serializer).loads(out.payload) if out.state == S.SUCCEEDED else {}
        if f.get("ck") == "run":
            # The run's steps, durable with its ack: carried back in its
            # outcome, packed.  (A run that failed outside the function, its
            # worker lost for good, carries none: its workflow fails.)
            for k, packed in info.get("steps") or ():
                txn.put(_sk(wid, k), packed.encode("latin-1"), db=self.db, overwrite=False)
        if out.state != S.SUCCEEDED:
            e = out.error() or {}
            self._end(txn, wid, f, FAILED, None, {"type": e.get("type", ""), "message": e.get("message", "")})
            return
        if "park" in info:
            # The next run was put parked: it becomes due here, once it is
            # current (at the wake-up time; at once if the event it waits
            # for came meanwhile; a wait without a deadline stays parked
            # until send_event releases it).
            park, w, until = info["park"], info.get("wait"), info.get("until", 0)
            f.update(current=park, waiting=w, until=until, parked=True)
            txn.put(_fk(b"T", park), wid.encode(), db=self.db)
            came = w is not None and any(True for _ in _prefix_items(
                txn, self.db, b"E" + wid.encode() + b"\0" + w.encode() + b"\0"))
            if came:
                release(txn, self.idx, park)
                f["waiting"] = None
            elif until:
                release(txn, self.idx, park, until + 1_000_000)     # (a ms late: not before it)
            txn.put(_fk(b"F", wid), json.dumps(f).encode(), db=self.db)
        elif "done" in info:
            ser = self.app._serializer(f["ser"])
            self._end(txn, wid, f, SUCCEEDED, ser.dumps(info["done"][0]), None)
        elif "fail" in info:
            self._end(txn, wid, f, FAILED, None, info["fail"])

    def _end(self, txn: Any, wid: str, f: dict[str, Any], state: str, result: bytes | None,
             error: dict[str, str] | None) -> None:
        f.update(state=state, finished=time.time(), error=error, parked=False, waiting=None)
        txn.put(_fk(b"F", wid), json.dumps(f).encode(), db=self.db)
        if result is not None:
            txn.put(_fk(b"R", wid), result, db=self.db)
        if f.get("parent"):
            pwid, name = f["parent"]
            pf = self.flow(pwid, txn)
            if pf is not None:
                body = {"state": state, "error": error}
                if result is not None:
                    body["result"] = self.app._serializer(f["ser"]).loads(result)
                self._event_in(txn, pwid, name, dumps(self.app._serializer(pf["ser"]), body,
                                                      f"the result of child workflow {wid}"))

    def result(self, wid: str) -> tuple[str, Any]:
        def fn(txn: Any) -> tuple[Any, Any]:
            return txn.get(_fk(b"F", wid), db=self.db), txn.get(_fk(b"R", wid), db=self.db)
        raw_f, raw = self.idx.read(fn)
        if raw_f is None:
            raise TaskNotFound(f"no workflow {wid!r} in {self.app.path}")
        f = json.loads(raw_f)
        if f["state"] != SUCCEEDED:
            return f["state"], f.get("error")
        return f["state"], self.app._serializer(f["ser"]).loads(raw)
