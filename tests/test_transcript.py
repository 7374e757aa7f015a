"""The transcript model: validation on construction and the per-speaker statistics."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest

from bot.errors import CantobotError
from bot.transcript.model import Minutes, Segment, TranscriptError, Word

T0 = datetime(2026, 3, 4, 9, 0, tzinfo=UTC)


def seg(speaker: str, start: float, end: float, text: str = "今日開會") -> Segment:
    return Segment(speaker=speaker, text=text, start=start, end=end)


@pytest.mark.parametrize(
    ("start", "end"),
    [(2.0, 1.0), (math.nan, 1.0), (0.0, math.inf), (-1.0, 0.0), (math.nan, math.nan)],
)
def test_a_segment_with_an_impossible_span_is_refused(start: float, end: float) -> None:
    with pytest.raises(TranscriptError):
        seg("alice", start, end)


def test_a_word_with_an_impossible_span_is_refused() -> None:
    with pytest.raises(TranscriptError):
        Word("今", 3.0, 2.0)


def test_transcript_errors_belong_to_the_cantobot_family_and_are_value_errors() -> None:
    with pytest.raises(CantobotError):
        seg("alice", 1.0, 0.5)
    with pytest.raises(ValueError):
        seg("alice", 1.0, 0.5)


def test_a_zero_length_segment_is_allowed() -> None:
    assert seg("alice", 1.0, 1.0).duration == 0.0


def test_words_given_as_a_list_are_frozen_into_a_tuple() -> None:
    s = Segment("alice", "今日", 0.0, 1.0, words=[Word("今", 0.0, 0.5)])  # type: ignore[arg-type]
    assert s.words == (Word("今", 0.0, 0.5),)
    hash(s)


def test_segments_are_immutable() -> None:
    s = seg("alice", 0.0, 1.0)
    with pytest.raises(AttributeError):
        s.text = "other"  # type: ignore[misc]


def test_minutes_refuse_naive_datetimes() -> None:
    with pytest.raises(TranscriptError):
        Minutes("m", datetime(2026, 1, 1), None, ())


def test_minutes_refuse_an_end_before_the_start() -> None:
    with pytest.raises(TranscriptError):
        Minutes("m", T0, T0 - timedelta(seconds=1), ())


def test_minutes_normalise_times_to_utc() -> None:
    hk = timezone(timedelta(hours=8))
    m = Minutes("m", datetime(2026, 1, 1, 17, 0, tzinfo=hk), None, ())
    assert m.started_at == datetime(2026, 1, 1, 9, 0, tzinfo=UTC)
    assert m.started_at.utcoffset() == timedelta(0)


def test_participants_are_listed_in_order_of_first_speech_not_of_commit() -> None:
    # bob's line was committed first but alice spoke first.
    m = Minutes("m", T0, None, (seg("bob", 5, 6), seg("alice", 1, 9), seg("bob", 10, 11)))
    assert m.participants == ("alice", "bob")


def test_lines_and_talk_time_are_counted_per_speaker_including_overlaps() -> None:
    m = Minutes(
        "m",
        T0,
        None,
        (seg("alice", 0, 4), seg("bob", 2, 3), seg("alice", 10, 11.5)),
    )
    assert m.lines_per_speaker == {"alice": 2, "bob": 1}
    assert m.talk_time_per_speaker == pytest.approx({"alice": 5.5, "bob": 1.0})
    assert list(m.talk_time_per_speaker) == ["alice", "bob"]


def test_duration_is_wall_clock_when_ended_and_the_last_word_otherwise() -> None:
    segments = (seg("alice", 0, 4), seg("bob", 50, 62.5))
    assert Minutes("m", T0, None, segments).duration == 62.5
    assert Minutes("m", T0, T0 + timedelta(minutes=5), segments).duration == 300.0
    # A line committed after the end (STT latency) never shortens the meeting.
    assert Minutes("m", T0, T0 + timedelta(seconds=60), segments).duration == 62.5
    assert Minutes("m", T0, None, ()).duration == 0.0


def test_sorted_orders_by_start_and_keeps_ties_in_their_order() -> None:
    a, b, c = seg("a", 5, 6), seg("b", 1, 2), seg("c", 5, 7)
    m = Minutes("m", T0, None, (a, b, c))
    assert m.sorted().segments == (b, a, c)
    assert m.segments == (a, b, c)  # the original is untouched
