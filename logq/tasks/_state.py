"""A task's life as a pure state machine: no I/O, no clock.  ``_store``
records what these functions decide, in the same index transaction as the
queue-level ack or nack that causes it; ``tests/test_tasks_state.py``
checks every (state, event) pair.

States (what ``TaskHandle.status().state`` says)::

    scheduled  its delay/eta has not come yet
    queued     waiting for a worker (also: claimed by a pool, not started)
    running    a worker is executing it
    retrying   an attempt failed; waiting for its backoff
    succeeded  final: its result is stored (until result_ttl)
    failed     final: out of attempts, or an error not in retry_on; the
               remote type, message and traceback are stored
    cancelled  final: cancel() was durable before it finished

Events::

    due        a scheduled task's time came          scheduled -> queued
    start      a worker began an attempt             queued -> running
    succeed    the attempt returned                  running -> succeeded
    fail       the attempt raised, will be retried   running -> retrying
    give_up    the attempt raised, no retry left     running -> failed
    lost       its worker or pool died mid-attempt   running -> queued
                                                     (the attempt counted)
    cancel     cancel() was called                   any non-final -> cancelled
    retry      `logq tasks retry` of a failed task   failed -> queued

Final states absorb what arrives late: a worker that finishes a task
cancelled while it ran records nothing (``succeed``/``fail``/``give_up``
in ``cancelled`` stay ``cancelled``), and ``cancel`` of a finished task
changes nothing.  Delivery is at least once, so a task may also run again
after it finished (its message delivered again when a pool died before its
ack was committed, or twice at once after a lease ran out): the first final
outcome stands, and a second attempt's ``succeed``/``fail``/``give_up``/
``lost`` in ``succeeded`` or ``failed`` is recorded as nothing.  Those pairs are *ignored*; every other pair not in the
table is *illegal* (:class:`InvalidTransition`): it would mean a bug.

Where each state comes from (``_store.derive``): the final states from the
outcome record; ``running`` from a live worker's marker; ``retrying`` and
``scheduled`` from the queue's schedule (with or without a recorded
failure); ``queued`` is what is left.  So a crash can leave no task
``running`` (the marker's process is dead) nor ``succeeded`` without its
result (both are one record, written with the ack).
"""

from __future__ import annotations

from logq._errors import TaskError

SCHEDULED, QUEUED, RUNNING, RETRYING = "scheduled", "queued", "running", "retrying"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
STATES = (SCHEDULED, QUEUED, RUNNING, RETRYING, SUCCEEDED, FAILED, CANCELLED)
FINAL = frozenset((SUCCEEDED, FAILED, CANCELLED))

DUE, START, SUCCEED, FAIL, GIVE_UP, LOST, CANCEL, RETRY = (
    "due", "start", "succeed", "fail", "give_up", "lost", "cancel", "retry")
EVENTS = (DUE, START, SUCCEED, FAIL, GIVE_UP, LOST, CANCEL, RETRY)

TRANSITIONS: dict[tuple[str, str], str] = {
    (SCHEDULED, DUE): QUEUED,
    (RETRYING, DUE): QUEUED,
    (QUEUED, START): RUNNING,
    (RETRYING, START): RUNNING,     # a retry due and claimed in one step
    (RUNNING, SUCCEED): SUCCEEDED,
    (RUNNING, FAIL): RETRYING,
    (RUNNING, GIVE_UP): FAILED,
    (RUNNING, LOST): QUEUED,
    (SCHEDULED, CANCEL): CANCELLED,
    (QUEUED, CANCEL): CANCELLED,
    (RUNNING, CANCEL): CANCELLED,
    (RETRYING, CANCEL): CANCELLED,
    (FAILED, RETRY): QUEUED,
}

# Late news about a finished task: recorded as nothing.
IGNORED = frozenset(
    [(CANCELLED, e) for e in (SUCCEED, FAIL, GIVE_UP, LOST, CANCEL)]
    + [(final, e) for final in (SUCCEEDED, FAILED) for e in (SUCCEED, FAIL, GIVE_UP, LOST, CANCEL)])


class InvalidTransition(TaskError):
    """An event that cannot happen in a state (a bug, not bad luck)."""

    def __init__(self, state: str, event: str) -> None:
        super().__init__(f"task event {event!r} is not possible in state {state!r}")
        self.state = state
        self.event = event


def next_state(state: str, event: str) -> str:
    """The state after ``event``; ``state`` itself for an ignored pair.
    Raises InvalidTransition for an illegal pair, ValueError for an
    unknown state or event."""
    if state not in STATES:
        raise ValueError(f"unknown task state {state!r}")
    if event not in EVENTS:
        raise ValueError(f"unknown task event {event!r}")
    new = TRANSITIONS.get((state, event))
    if new is not None:
        return new
    if (state, event) in IGNORED:
        return state
    raise InvalidTransition(state, event)


def changes(state: str, event: str) -> bool:
    """Whether ``event`` in ``state`` changes anything (not ignored).
    Raises as next_state does for illegal pairs."""
    return next_state(state, event) != state or (state, event) in TRANSITIONS


def settled_by(event: str) -> bool:
    """Whether the queue message of a task is settled (acked) when
    ``event`` happens: the final outcomes of an attempt."""
    return event in (SUCCEED, GIVE_UP)


def pending_state(*, due_later: bool, failed_before: bool) -> str:
    """The state of a task that is neither final nor running: waiting for
    a time (``due_later``) after a failure is ``retrying``, before any is
    ``scheduled``; otherwise ``queued``."""
    if due_later:
        return RETRYING if failed_before else SCHEDULED
    return QUEUED
