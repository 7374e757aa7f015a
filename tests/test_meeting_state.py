"""The meeting's life cycle table: legal changes are logged once, illegal ones are bugs."""

from __future__ import annotations

import logging

import pytest

from bot.meeting.state import TRANSITIONS, MeetingState, StateMachine


def test_a_normal_life_is_logged_change_by_change(caplog: pytest.LogCaptureFixture) -> None:
    machine = StateMachine("guild 1: meeting")
    with caplog.at_level(logging.INFO, logger="bot.meeting.state"):
        assert machine.accepting_speakers
        machine.to(MeetingState.LIVE)
        machine.to(MeetingState.LIVE)  # no change, nothing logged
        machine.to(MeetingState.STOPPING, "stopped by alice")
        assert not machine.accepting_speakers
        machine.to(MeetingState.ENDED)
    assert [r.getMessage() for r in caplog.records] == [
        "guild 1: meeting starting -> live",
        "guild 1: meeting live -> stopping (stopped by alice)",
        "guild 1: meeting stopping -> ended",
    ]


def test_a_change_the_table_does_not_list_is_refused() -> None:
    machine = StateMachine("guild 1: meeting")
    machine.to(MeetingState.LIVE)
    with pytest.raises(AssertionError, match="illegal guild 1: meeting state change live -> ended"):
        machine.to(MeetingState.ENDED)  # a live meeting always stops through STOPPING
    assert machine.state is MeetingState.LIVE


def test_every_state_is_in_the_table_and_ended_is_final() -> None:
    assert set(TRANSITIONS) == set(MeetingState)
    assert TRANSITIONS[MeetingState.ENDED] == frozenset()
