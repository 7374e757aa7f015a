"""The pure pieces SttCore and SttSession are made of, each on its own (issue 13): the speech
gate, the unconfirmed-audio buffer, the upstream clock, twin pairing, line making and the
upstream-error policy. No sockets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.stt import protocol as p
from bot.stt.buffer import PcmBuffer
from bot.stt.clock import UpstreamClock
from bot.stt.events import LineRef
from bot.stt.gate import PRE_ROLL_S, SpeechGate, voiced_span, voiced_span_in
from bot.stt.lines import LineMaker
from bot.stt.stats import SessionStats
from bot.stt.twins import MAX_UNMATCHED, Twins
from bot.stt.upstream import (
    INACTIVITY,
    PERMANENT_ERRORS,
    SESSION_LIMIT,
    Action,
    ErrorPolicy,
    parse_error,
)

RATE = 16000


def quiet(seconds: float) -> bytes:
    return np.zeros(round(seconds * RATE), dtype="<i2").tobytes()


def tone(seconds: float) -> bytes:
    t = np.arange(round(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()


def samples(pcm: bytes) -> int:
    return len(pcm) // 2


# -- the speech gate ---------------------------------------------------------------------------


def test_without_a_tail_the_gate_keeps_every_sample() -> None:
    gate = SpeechGate(RATE, None, SessionStats())
    assert gate.feed(0, quiet(1.0)) == [(0, quiet(1.0))]


def test_the_gate_skips_silence_and_keeps_the_pre_roll_speech_and_tail() -> None:
    stats = SessionStats()
    gate = SpeechGate(RATE, 0.3, stats)
    assert gate.feed(0, quiet(2.0)) == []  # held, not kept: only the pre-roll may follow
    assert stats.skipped_seconds == pytest.approx(2.0 - PRE_ROLL_S)
    (start, pcm), = gate.feed(2 * RATE, tone(0.5) + quiet(1.0))
    assert start == round((2.0 - PRE_ROLL_S) * RATE)  # the pre-roll before the speech
    assert samples(pcm) == round((PRE_ROLL_S + 0.5 + 0.3) * RATE)  # ... speech, tail
    assert stats.speech_seconds == pytest.approx(0.5)
    assert gate.last_voiced_end == round(2.5 * RATE)


def test_a_ragged_last_piece_is_judged_on_its_own_samples() -> None:
    """The end of a track is rarely whole 20 ms frames: its last few ms count as speech when
    they are loud, and are held as silence when they are quiet."""
    stats = SessionStats()
    gate = SpeechGate(RATE, 0.0, stats)
    assert gate.feed(0, quiet(0.02) + quiet(0.007)) == []  # 27 ms of silence: held
    loud_end = quiet(0.02) + tone(0.007)
    (start, pcm), = gate.feed(samples(loud_end), loud_end)
    assert start + samples(pcm) == 2 * samples(loud_end)  # kept up to its last sample
    assert gate.last_voiced_end == 2 * samples(loud_end)  # the loud 7 ms ended the speech
    assert stats.speech_seconds == pytest.approx(0.007)


def test_a_commit_cuts_the_rest_of_the_tail_only_once_all_speech_went_out() -> None:
    gate = SpeechGate(RATE, 1.0, SessionStats())
    gate.feed(0, tone(0.5) + quiet(0.2))
    assert not gate.commit_heard(send_pos=round(0.4 * RATE))  # speech still on its way
    assert gate.commit_heard(send_pos=round(0.6 * RATE))
    assert not gate.commit_heard(send_pos=round(0.6 * RATE))  # once


def test_a_resend_starts_at_the_pre_roll_before_the_first_speech() -> None:
    gate = SpeechGate(RATE, 0.5, SessionStats())
    pieces = [(0, quiet(1.0) + tone(0.5))]
    assert gate.resend_from(pieces, 0) == round((1.0 - PRE_ROLL_S) * RATE)
    assert gate.resend_from([(0, quiet(0.5))], 0) == round(0.5 * RATE)  # no speech: none
    assert gate.speech_samples(pieces, 0, appended=0) == 0  # nothing voiced was fed


FRAME = RATE // 50


def frames_audio(voiced: list[bool]) -> np.ndarray:
    """One 20 ms frame per flag: a loud tone (RMS ~5600) or digital silence."""
    loud = np.frombuffer(tone(0.02), dtype="<i2")
    return np.concatenate([loud if v else np.zeros(FRAME, dtype="<i2") for v in voiced]
                          + [np.zeros(0, dtype="<i2")])


def first_sentence_frame_by_frame(voiced: list[bool]) -> tuple[int, int] | None:
    """The rule read one frame at a time: voiced frames at most 25 frames (0.5 s) apart form a
    sentence; the first sentence of at least 12 frames (0.25 s, rounded to even) counts."""
    i, n = 0, len(voiced)
    while i < n:
        if not voiced[i]:
            i += 1
            continue
        begin = end = j = i
        while j < n and j - end <= 25:
            if voiced[j]:
                end = j
            j += 1
        if end - begin + 1 >= 12:
            return begin * FRAME, (end + 1) * FRAME
        i = end + 1
    return None


def runs_of_frames() -> st.SearchStrategy[list[bool]]:
    """Voiced and silent runs of lengths around the rule's thresholds (12 and 25 frames)."""
    run = st.tuples(st.booleans(), st.integers(1, 30))
    return st.lists(run, max_size=12).map(
        lambda runs: [flag for flag, length in runs for _ in range(length)])


@settings(max_examples=200, deadline=None)
@given(runs_of_frames())
def test_a_commit_is_placed_at_the_first_sentence_as_a_frame_by_frame_reading_would(
        voiced: list[bool]) -> None:
    assert voiced_span(frames_audio(voiced), RATE) == first_sentence_frame_by_frame(voiced)


@settings(max_examples=150, deadline=None)
@given(runs_of_frames(), st.lists(st.tuples(st.integers(1, 40), st.integers(0, 60)),
                                  min_size=1, max_size=12))
def test_placing_a_commit_across_pieces_and_skipped_silence_maps_back_to_stream_samples(
        voiced: list[bool], cuts: list[tuple[int, int]]) -> None:
    # The audio cut into pieces at frame boundaries, with silence skipped between them: the
    # span is found as in the joined audio (a skip reads as a pause of at most 27 frames, a
    # sentence gap and a little) and given back in stream samples.
    audio = frames_audio(voiced).tobytes()
    pieces: list[tuple[int, bytes]] = []
    flags: list[bool] = []
    at_stream: list[int | None] = []  # per frame of the joined audio: its stream sample
    stream, pos = 1000 * FRAME, 0
    for cut, skipped in cuts:
        if pos >= len(voiced):
            break
        if pieces:
            stream += skipped * FRAME
            flags += [False] * min(skipped, 27)
            at_stream += [None] * min(skipped, 27)
        part = voiced[pos:pos + cut]
        pieces.append((stream, audio[pos * FRAME * 2:(pos + len(part)) * FRAME * 2]))
        flags += part
        at_stream += [stream + i * FRAME for i in range(len(part))]
        stream += len(part) * FRAME
        pos += len(part)
    expected = first_sentence_frame_by_frame(flags)
    found = voiced_span_in(pieces, 0, stream, RATE)
    if expected is None:
        assert found is None
    else:
        first, last = at_stream[expected[0] // FRAME], at_stream[expected[1] // FRAME - 1]
        assert first is not None and last is not None  # a sentence starts and ends voiced
        assert found == (first, last + FRAME)


# -- the buffer and the upstream clock -------------------------------------------------------


def test_the_buffer_keeps_pieces_with_gaps_and_trims_from_both_ends() -> None:
    buf = PcmBuffer()
    buf.push(0, quiet(0.1))  # samples 0..1600
    buf.push(3200, quiet(0.1))  # a gap, then 3200..4800
    buf.push(9999, b"")  # nothing
    assert buf.samples == 3200
    assert buf.unsent(1000) == 600 + 1600
    assert buf.piece_at(2000) == (3200, quiet(0.1))  # in the gap: the next piece
    assert buf.piece_at(4800) is None
    buf.trim_to(800)
    assert buf.pieces[0][0] == 800 and buf.samples == 2400
    assert buf.cut_after(4000) == [800]
    assert buf.drop_oldest(1000) == [(800, 800), (3200, 200)]
    assert buf.samples == 600


def test_the_upstream_clock_maps_back_across_skipped_silence() -> None:
    clock = UpstreamClock(RATE)
    clock.reset(origin=1000)
    assert clock.to_stream(0.0) == 1000 and not clock.started
    clock.sent(1000, 1600)
    clock.sent(2600, 1600)  # contiguous: the same run
    clock.sent(10000, 1600)  # after a gap: a new run
    assert clock.seconds() == pytest.approx(0.3)
    assert clock.to_stream(0.1) == pytest.approx(2600)
    assert clock.to_stream(0.25) == pytest.approx(10000 + 800)


# -- twins and lines ----------------------------------------------------------------------------


def test_twins_pair_by_text_in_either_order_and_only_once() -> None:
    twins = Twins()
    ref = LineRef("alice", 1)
    twins.plain_made("好", ref)
    assert twins.plain_of("唔好") is None
    assert twins.plain_of("好") == ref
    assert twins.plain_of("好") is None
    twins.timestamped_made("得")
    assert twins.plain_is_twin("得") and not twins.plain_is_twin("得")
    for i in range(MAX_UNMATCHED + 1):
        twins.plain_made(f"s{i}", LineRef("alice", i))
    assert twins.plain_of("s0") is None  # bounded: the oldest went
    twins.clear()
    assert twins.plain_of("s1") is None


def test_lines_are_timed_in_meeting_time_and_numbered_from_a_shared_counter() -> None:
    stats = SessionStats()
    numbers = itertools.count(7)
    lines = LineMaker(speaker="alice", key="alice", speaker_id=None, stream_offset=10.0,
                      sample_rate=RATE, line_numbers=numbers, stats=stats)
    assert lines.seconds(RATE) == 11.0
    assert lines.new_ref() == LineRef("alice", 7) and stats.commits == 1
    event = p.TimestampedTranscript("好", (p.WordTiming("好", 0.5, 1.0),))
    timed = lines.timed(event, lambda s: s * RATE + RATE)  # the clock starts at stream 1 s
    assert timed is not None
    segment, boundary = timed
    assert (segment.start, segment.end, boundary) == (11.5, 12.0, 2 * RATE)
    assert lines.timed(p.TimestampedTranscript("好", ()), lambda s: s) is None
    segment, boundary = lines.estimated("好", [(RATE, quiet(0.5) + tone(0.5) + quiet(0.5))],
                                        RATE, round(2.5 * RATE))
    assert segment.start == pytest.approx(11.5, abs=0.021) and boundary == 2 * RATE


# -- the upstream-error policy ---------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(PERMANENT_ERRORS))
def test_codes_no_retry_can_fix_fail(code: str) -> None:
    assert ErrorPolicy().decide(code, commits=0) is Action.FAIL


def test_a_session_limit_renews_at_once_but_backs_off_when_nothing_was_committed_since() -> None:
    policy = ErrorPolicy()
    assert policy.decide(SESSION_LIMIT, commits=3) is Action.RENEW
    assert policy.decide(SESSION_LIMIT, commits=3) is Action.RECONNECT
    assert policy.decide(SESSION_LIMIT, commits=4) is Action.RENEW


def test_inactivity_waits_for_speech_and_anything_else_reconnects() -> None:
    policy = ErrorPolicy()
    assert policy.decide(INACTIVITY, commits=0) is Action.RENEW_ON_SPEECH
    assert policy.decide("rate_limited", commits=0) is Action.RECONNECT
    assert policy.names_chunks("input_error") and not policy.names_chunks(INACTIVITY)


def test_an_error_message_is_read_with_bounds() -> None:
    assert parse_error({"message_type": "error"}).code == "unknown"
    error = parse_error({"error": "x" * 100, "message": "m" * 10_000})
    assert len(error.code) == 64 and len(error.message) == p.MAX_REASON_CHARS
    assert parse_error({"error": "input_error"}).detail == "input_error"
    assert parse_error({"error": "a", "message": "b"}).detail == "a: b"
