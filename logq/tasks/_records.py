"""The tasks layer's two record formats, and its serializers.  Pure: bytes
in, bytes out.

**The task record** is the queue message a submission puts (so submitting
costs one put and no index write; the log's own timestamp is the
submission time, its priority and deliver-at are the queue's)::

    offset  size  field
    0       2     magic b"T1"
    2       4     nonce (u32, little-endian): the id's second half
    6       1     n = length of the task name (1..255, UTF-8)
    7       1     s = length of the serializer's name
    8       1     o = length of the origin id (0, or a retry's original id)
    9       n+s+o name, serializer name, origin id
    9+n+s+o ...   the arguments, ``[args, kwargs]`` as the serializer encodes

A task's id is ``"<offset>-<nonce as 8 hex digits>"`` of its first record;
a record put by ``retry`` carries the original id as its origin, so the id
stays the same however often it is retried.  An id whose record is not at
its offset with its nonce (a torn tail cut by recovery, an offset reused)
names no task.

**The outcome record**, in the index database ``tasks.outcome`` under the
task id: the state the last settlement reached (``_state``), written in the
transaction that commits that settlement::

    0   1   state (index into _state.STATES)
    1   4   attempts made
    5   8   submitted ns     13  8  started ns (0: unknown)
    21  8   finished ns (0: not final)   29  8  expires ns (0: never)
    37  1   s = serializer name length     38  1  n = task name length
    39      the serializer's name, the task's name, then the payload: the encoded result (succeeded), or the error as
            JSON {"type", "message", "traceback"} (failed, retrying,
            cancelled)
"""

from __future__ import annotations

import json
import pickle
import struct
from random import getrandbits as _getrandbits
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from logq._errors import SerializationError
from logq.tasks._state import STATES

MAGIC = b"T1"
_HEAD = struct.Struct("<2sIBBB")
_OUT = struct.Struct("<BIQQQQBB")


# -- serializers ------------------------------------------------------------------
@dataclass(frozen=True)
class Serializer:
    """How arguments and results become bytes: ``dumps(obj) -> bytes`` and
    ``loads(bytes) -> obj``.  Registered on an App under ``name``, which
    is stored beside what it encoded."""
    name: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]


# One encoder and one decoder made once (json.dumps with options builds an
# encoder per call; json.loads of bytes detects their encoding each time):
# they showed in profiles of no-op tasks.  The encoder writes ASCII.
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_DECODE = json.JSONDecoder().decode


def _no_default(o: Any) -> Any:
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


def _c_codec() -> tuple[Any, Any]:
    """The C encoder and scanner that ``_ENCODE`` and ``_DECODE`` build
    around each call (JSONEncoder.encode makes its C encoder anew every
    time), made once; (None, None) where the C accelerator is missing or
    differs.  The encoder has no circular-reference markers (a dict kept
    between calls would keep what a failed call left in it): a circular
    value fails with RecursionError instead, a SerializationError all
    the same."""
    try:
        from json import encoder as je, scanner as js
        enc = je.c_make_encoder(None, _no_default, je.encode_basestring_ascii, None, ":", ",",  # type: ignore[attr-defined]
                                False, False, False)
        scan = js.c_make_scanner(json.JSONDecoder())  # type: ignore[attr-defined]
        probe = [1, "é", {"a": [None, True, 2.5]}]
        if "".join(enc(probe, 0)) != _ENCODE(probe) or scan(_ENCODE(probe), 0) != (probe, len(_ENCODE(probe))):
            return None, None
        return enc, scan
    except Exception:
        return None, None


_C_ENCODE, _C_SCAN = _c_codec()


def _json_dumps(obj: Any) -> bytes:
    if _C_ENCODE is not None and type(obj) is not str:
        return "".join(_C_ENCODE(obj, 0)).encode()
    return _ENCODE(obj).encode()


def _json_loads(b: Any) -> Any:
    s = str(b, "utf-8")
    if _C_SCAN is not None:
        # What JSONDecoder.decode does, without its two regex matches for
        # whitespace (this encoder writes none); anything else (leading or
        # trailing bytes, bad input) goes through decode, for its error.
        try:
            obj, end = _C_SCAN(s, 0)
        except StopIteration:
            return _DECODE(s)
        if end == len(s):
            return obj
    return _DECODE(s)


JSON = Serializer("json", _json_dumps, _json_loads)
PICKLE = Serializer("pickle", lambda o: pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL),
                    lambda b: pickle.loads(bytes(b)))


def dumps(ser: Serializer, obj: Any, what: str) -> bytes:
    """``ser.dumps(obj)``, its failure a SerializationError naming ``what``."""
    try:
        out = ser.dumps(obj)
    except Exception as e:
        raise SerializationError(f"{what} cannot be encoded with the {ser.name!r} serializer: "
                                 f"{type(e).__name__}: {e}") from e
    if not isinstance(out, (bytes, bytearray)):
        raise SerializationError(f"serializer {ser.name!r} returned {type(out).__name__}, not bytes")
    return bytes(out)


# -- task records ------------------------------------------------------------------
def new_nonce() -> int:
    # (random's generator, not os.urandom: a system call per submission
    # showed in profiles.  A nonce only tells a record from another put at
    # the same offset after a cut; random reseeds in a forked child.)
    return _getrandbits(32)


# (name, serializer, origin) -> their lengths and bytes, encoded once (a
# submission is a put and little else: encoding them showed in profiles).
_ENCODED: dict[tuple[str, str, str], tuple[int, int, int, bytes]] = {}


def encode_task(nonce: int, name: str, ser: str, args: bytes, origin: str = "") -> bytes:
    got = _ENCODED.get((name, ser, origin))
    if got is None:
        n, s, o = name.encode(), ser.encode(), origin.encode()
        if not 0 < len(n) < 256 or len(s) > 255 or len(o) > 255:
            raise ValueError(f"task name must be 1 to 255 bytes of UTF-8, not {name!r}")
        got = (len(n), len(s), len(o), n + s + o)
        if origin:
            return _HEAD.pack(MAGIC, nonce, *got[:3]) + got[3] + args     # (one per task: not kept)
        if len(_ENCODED) >= _HEADS_MAX:
            _ENCODED.clear()
        _ENCODED[(name, ser, origin)] = got
    return _HEAD.pack(MAGIC, nonce, got[0], got[1], got[2]) + got[3] + args


class TaskRecord(NamedTuple):
    nonce: int
    name: str
    serializer: str
    origin: str
    args: bytes         # encoded [args, kwargs]

    def task_id(self, offset: int) -> str:
        return self.origin or make_id(offset, self.nonce)


def decode_task(data: bytes) -> TaskRecord | None:
    """The task record in ``data``, or None if it is not one."""
    h = task_head(data)
    if h is None:
        return None
    return TaskRecord(h[0], h[1], h[2], h[3], bytes(data[h[6]:]))


# The decoded head (name, serializer, origin) of task records, by its raw
# bytes: a pool runs few task names, and decoding them per task showed in the
# workers' profiles.  The same str objects each time also let the pickle of
# a batch's outcomes refer to a name once.  Bounded (origins of retried
# tasks differ per task): cleared when full.
_HEADS: dict[bytes, tuple[str, str, str, bytes, bytes]] = {}
_HEADS_MAX = 4096


def task_head(data: Any) -> tuple[int, str, str, str, bytes, bytes, int] | None:
    """The fast part of ``decode_task``: ``(nonce, name, serializer,
    origin, name as bytes, serializer as bytes, where the arguments
    start)``, or None if ``data`` is not a task record."""
    if len(data) < _HEAD.size or data[:2] != MAGIC:
        return None
    _m, nonce, n, s, o = _HEAD.unpack_from(data)
    at = _HEAD.size
    end = at + n + s + o
    if end > len(data):
        return None
    raw = bytes(data[at:end])
    got = _HEADS.get(raw)
    if got is None:
        try:
            got = (raw[:n].decode(), raw[n:n + s].decode(), raw[n + s:].decode(), raw[:n], raw[n:n + s])
        except UnicodeDecodeError:
            return None
        if len(_HEADS) >= _HEADS_MAX:
            _HEADS.clear()
        _HEADS[raw] = got
    return (nonce, got[0], got[1], got[2], got[3], got[4], end)


def make_id(offset: int, nonce: int) -> str:
    return f"{offset}-{nonce:08x}"


def parse_id(task_id: Any) -> tuple[int, int] | None:
    """(offset, nonce) of a well-formed id, else None."""
    if not isinstance(task_id, str):
        return None
    off, sep, nonce = task_id.partition("-")
    if not sep or not off.isdigit() or len(nonce) != 8:
        return None
    try:
        return int(off), int(nonce, 16)
    except ValueError:
        return None


# -- outcome records ---------------------------------------------------------------
# A packed outcome's serializer and task name, decoded once (by their bytes).
_NAMES: dict[bytes, tuple[str, str]] = {}
_new_tuple = tuple.__new__


class Outcome(NamedTuple):
    # (A NamedTuple, not a frozen dataclass: one is made per task in the
    # pool and per result read, and a frozen dataclass's __init__ showed
    # in profiles.)
    state: str
    attempts: int
    submitted_ns: int
    started_ns: int
    finished_ns: int
    expires_ns: int
    serializer: str
    name: str
    payload: bytes

    def pack(self) -> bytes:
        s, n = self.serializer.encode(), self.name.encode()
        return _OUT.pack(STATES.index(self.state), self.attempts, self.submitted_ns, self.started_ns,
                         self.finished_ns, self.expires_ns, len(s), len(n)) + s + n + self.payload

    @classmethod
    def unpack(cls, raw: bytes) -> "Outcome":
        st, attempts, sub, start, fin, exp, s, n = _OUT.unpack_from(raw)
        at = _OUT.size
        names = bytes(raw[at:at + s + n])
        got = _NAMES.get(names)
        if got is None:
            got = (names[:s].decode(), names[s:].decode())
            if len(_NAMES) >= _HEADS_MAX:
                _NAMES.clear()
            _NAMES[names] = got
        # (tuple.__new__: the NamedTuple's own __new__ is a Python frame more)
        return _new_tuple(cls, (STATES[st], attempts, sub, start, fin, exp, got[0], got[1],
                                bytes(raw[at + s + n:])))

    def error(self) -> dict[str, str] | None:
        if self.state == "succeeded" or not self.payload:
            return None
        try:
            e = json.loads(self.payload)
            return {"type": str(e.get("type", "")), "message": str(e.get("message", "")),
                    "traceback": str(e.get("traceback", ""))}
        except ValueError:
            return {"type": "", "message": self.payload.decode(errors="replace"), "traceback": ""}


def pack_outcome(state: int, attempts: int, submitted_ns: int, started_ns: int, finished_ns: int,
                 expires_ns: int, serializer: bytes, name: bytes, payload: bytes) -> bytes:
    """``Outcome(...).pack()`` from its parts as the record holds them (the
    state's index in STATES, the names as UTF-8): what a worker sends back,
    so that the pool's process only stores it."""
    return _OUT.pack(state, attempts, submitted_ns, started_ns, finished_ns, expires_ns,
                     len(serializer), len(name)) + serializer + name + payload


#: Where a packed outcome's ``expires_ns`` is.
EXPIRES_AT = 29


def state_of(raw: bytes) -> str:
    """The state of a packed outcome, without unpacking the rest."""
    return STATES[raw[0]]


def error_json(type_name: str, message: str, tb: str) -> bytes:
    return json.dumps({"type": type_name, "message": message, "traceback": tb}).encode()
