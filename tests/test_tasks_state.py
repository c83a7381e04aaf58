"""The task state machine (logq/tasks/_state.py), exhaustively: every
state against every event, against the table written out here by hand."""

from __future__ import annotations

import itertools

import pytest

from logq.tasks import _state as S

# The whole machine, restated: (state, event) -> new state; "ignored" keeps
# the state; anything missing is illegal.
EXPECTED = {
    ("scheduled", "due"): "queued",
    ("retrying", "due"): "queued",
    ("queued", "start"): "running",
    ("retrying", "start"): "running",
    ("running", "succeed"): "succeeded",
    ("running", "fail"): "retrying",
    ("running", "give_up"): "failed",
    ("running", "lost"): "queued",
    ("scheduled", "cancel"): "cancelled",
    ("queued", "cancel"): "cancelled",
    ("running", "cancel"): "cancelled",
    ("retrying", "cancel"): "cancelled",
    ("failed", "retry"): "queued",
}
# Late news about a finished task (a cancel, or another attempt of an
# at-least-once delivery): the first final outcome stands.
IGNORED = {(final, e) for final in ("cancelled", "succeeded", "failed")
           for e in ("succeed", "fail", "give_up", "lost", "cancel")}


@pytest.mark.parametrize("state,event", list(itertools.product(S.STATES, S.EVENTS)))
def test_every_pair(state: str, event: str) -> None:
    if (state, event) in EXPECTED:
        assert S.next_state(state, event) == EXPECTED[state, event]
        assert S.changes(state, event)
    elif (state, event) in IGNORED:
        assert S.next_state(state, event) == state
        assert not S.changes(state, event)
    else:
        with pytest.raises(S.InvalidTransition) as e:
            S.next_state(state, event)
        assert e.value.state == state and e.value.event == event
        assert state in str(e.value) and event in str(e.value)


def test_finals_are_absorbing_except_retry() -> None:
    for state in S.FINAL:
        for event in S.EVENTS:
            try:
                new = S.next_state(state, event)
            except S.InvalidTransition:
                continue
            assert new == state or (state, event) == ("failed", "retry")


def test_every_state_reachable_and_every_non_final_can_finish() -> None:
    reach = {"scheduled", "queued"}
    while True:
        more = {S.next_state(s, e) for s in reach for e in S.EVENTS
                if (s, e) in S.TRANSITIONS} - reach
        if not more:
            break
        reach |= more
    assert reach == set(S.STATES)
    for s in set(S.STATES) - S.FINAL:
        assert S.next_state(s, "cancel") == "cancelled"


def test_unknown_names() -> None:
    with pytest.raises(ValueError):
        S.next_state("nope", "start")
    with pytest.raises(ValueError):
        S.next_state("queued", "nope")


def test_settled_and_pending() -> None:
    assert [e for e in S.EVENTS if S.settled_by(e)] == ["succeed", "give_up"]
    assert S.pending_state(due_later=True, failed_before=True) == "retrying"
    assert S.pending_state(due_later=True, failed_before=False) == "scheduled"
    assert S.pending_state(due_later=False, failed_before=True) == "queued"
    assert S.pending_state(due_later=False, failed_before=False) == "queued"
