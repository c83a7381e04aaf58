"""One rule for closed handles, checked on every public method by
introspection (a method added later is covered, or this test fails asking
for its arguments): after ``close()``, every public method and property of
a Queue, and of a Consumer (closed itself, or through its Queue), raises
QueueClosedError, whatever its arguments; ``close()`` and ``__exit__`` do
nothing the second time; ``repr`` works; plain attributes stay readable.
"""

from __future__ import annotations

import inspect

import pytest

import logq
from logq._consumer import Consumer
from logq._queue import Queue

DUNDERS = ("__len__", "__iter__", "__enter__", "__exit__")
NOOPS = ("close", "__exit__")


def _args(name: str, m):
    """Arguments for each public call (a delivered message where one is
    needed); a new method must be added here."""
    table = {
        # Queue
        "put": ((b"x",), {}), "put_many": (([b"x"],), {}), "flush": ((), {}),
        "consumer": (("h",), {}), "wait": ((0, 0.0), {}), "read": ((0,), {}),
        "read_many": ((0,), {}), "scan": ((), {}), "stats": ((), {}),
        "__len__": ((), {}), "__enter__": ((), {}), "__exit__": ((None, None, None), {}),
        "close": ((), {}),
        # Consumer
        "get": ((), {"timeout": 0}), "get_many": ((1,), {"timeout": 0}), "__iter__": ((), {}),
        "take": ((1,), {"timeout": 0}),
        "ack": ((m,), {}), "ack_many": (([m],), {}), "nack": ((m,), {"delay": 0}),
        "give_back": (([m],), {}), "extend": ((m, 1.0), {}), "commit": ((), {}),
        "dead_letters": ((), {}), "replay": ((), {}), "purge": ((), {}),
    }
    assert name in table, f"a new public method {name!r}: add its arguments to tests/test_closed.py"
    return table[name]


def _public(cls):
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") and name not in DUNDERS:
            continue
        if isinstance(member, property) or callable(member):
            yield name, member


def _check(obj, cls, m):
    for name, member in _public(cls):
        if isinstance(member, property):
            with pytest.raises(logq.QueueClosedError):
                getattr(obj, name)
            continue
        args, kw = _args(name, m)
        call = getattr(obj, name)
        if name in NOOPS:
            assert call(*args, **kw) is None, name
            assert call(*args, **kw) is None, name
            continue
        with pytest.raises(logq.QueueClosedError):
            r = call(*args, **kw)
            if inspect.isgenerator(r):
                next(r)
            pytest.fail(f"{cls.__name__}.{name} returned {r!r} on a closed handle")
        if name in ("nack", "ack", "extend", "give_back", "ack_many"):
            for bad in (None, object()):     # the rule comes before argument checks
                with pytest.raises(logq.QueueClosedError):
                    call(*([[bad]] if name in ("give_back", "ack_many") else [bad]) + list(args[1:]))
    repr(obj)


def _open(tmp_path):
    q = logq.open(str(tmp_path / "q"))
    q.put_many([b"a", b"b"])
    c = q.consumer("g")
    return q, c, c.get(timeout=5)


def test_every_method_of_a_closed_queue_and_its_consumers(tmp_path):
    q, c, m = _open(tmp_path)
    q.close()
    _check(q, Queue, m)
    _check(c, Consumer, m)      # closed through its queue
    assert q.path and q.options and c.group == "g" and c.queue is q


def test_every_method_of_a_closed_consumer_on_an_open_queue(tmp_path):
    q, c, m = _open(tmp_path)
    other = q.consumer("g")     # the group stays open in this process
    c.close()
    _check(c, Consumer, m)
    other.ack(m)                # ... and the message is still out to it
    other.close()
    q.close()


def test_the_last_consumer_closed_then_its_queue(tmp_path):
    q, c, m = _open(tmp_path)
    c.close()
    _check(c, Consumer, m)
    q.close()
    _check(c, Consumer, m)
    _check(q, Queue, m)


def test_the_rule_is_documented_on_each_class():
    assert "QueueClosedError" in Consumer.__doc__ and "QueueClosedError" in Queue.close.__doc__


def test_a_batch_on_a_closed_consumer(tmp_path):
    """take() and settling a Batch follow the same rule: QueueClosedError
    once the consumer (or its queue) is closed, whatever the arguments."""
    q = logq.open(str(tmp_path / "q"))
    q.put_many([b"a", b"b", b"c"])
    c = q.consumer("g")
    b = c.take(3, timeout=5)
    assert len(b) == 3
    c.close()
    for call in (lambda: c.ack(b), lambda: c.ack(b, [0]), lambda: c.nack(b, indices=[1]),
                 lambda: c.give_back(b, [2]), lambda: c.extend(b, 1.0), lambda: b.ack(0),
                 lambda: c.take(0), lambda: c.take(1, timeout=0)):
        with pytest.raises(logq.QueueClosedError):
            call()
    assert b.payloads == [b"a", b"b", b"c"]       # copies: still readable
    q.close()
