"""cantonese.ai STT payloads: builders follow the reference; parsers never crash on bad input."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.errors import SttError
from bot.stt.protocol import (
    MAX_TEXT_CHARS,
    MAX_WORD_TIME_S,
    WORD_TIME_MARGIN_S,
    CommittedTranscript,
    PartialTranscript,
    ProtocolError,
    SessionStarted,
    TimestampedTranscript,
    WordTiming,
    audio_chunk,
    decode_audio_chunk,
    parse_session_closed,
    parse_session_error,
    parse_transcript_message,
    start_session,
)


def test_start_session_uses_the_documented_camel_case_key() -> None:
    assert start_session(16000) == {"sampleRate": 16000}


def test_audio_chunk_is_base64_pcm_with_its_rate() -> None:
    pcm = b"\x01\x00\xff\x7f"
    payload = audio_chunk(pcm, 16000)
    assert payload == {"audio_base_64": base64.b64encode(pcm).decode(), "sample_rate": 16000}
    assert json.loads(json.dumps(payload)) == payload  # plain JSON, as Socket.IO sends it


@given(st.binary().map(lambda b: b[: len(b) // 2 * 2]), st.integers(8000, 48000))
def test_audio_chunk_round_trips_through_the_server_side_decoder(pcm: bytes, rate: int) -> None:
    assert decode_audio_chunk(audio_chunk(pcm, rate)) == (pcm, rate)


def test_builders_refuse_what_the_api_cannot_take() -> None:
    with pytest.raises(ValueError):
        audio_chunk(b"\x00", 16000)  # half a sample
    with pytest.raises(ValueError):
        start_session(0)


@pytest.mark.parametrize(
    ("payload", "event"),
    [
        ({"message_type": "session_started", "session_id": "abc"}, SessionStarted("abc")),
        ({"message_type": "partial_transcript", "text": "今日"}, PartialTranscript("今日")),
        (
            {"message_type": "committed_transcript", "text": "今日開會"},
            CommittedTranscript("今日開會"),
        ),
    ],
)
def test_each_documented_message_type_parses(payload: dict[str, object], event: object) -> None:
    assert parse_transcript_message(payload) == event


def test_timestamped_transcript_keeps_words_and_drops_spacing() -> None:
    payload = {
        "message_type": "committed_transcript_with_timestamps",
        "text": "hello world",
        "words": [
            {"text": "hello", "start": 0.5, "end": 0.9, "type": "word"},
            {"text": " ", "start": 0.9, "end": 1.0, "type": "spacing"},
            {"text": "world", "start": 1, "end": 1.4},
        ],
    }
    assert parse_transcript_message(payload) == TimestampedTranscript(
        "hello world", (WordTiming("hello", 0.5, 0.9), WordTiming("world", 1.0, 1.4))
    )


def _stamped(*words: tuple[str, float, float]) -> dict[str, object]:
    return {
        "message_type": "committed_transcript_with_timestamps",
        "text": " ".join(w for w, _, _ in words),
        "words": [{"text": w, "start": a, "end": b, "type": "word"} for w, a, b in words],
    }


def test_word_times_past_the_audio_sent_are_dropped_or_clamped() -> None:
    """Issue 12 item 5: a finite but absurd time (1e306) never leaves the protocol edge."""
    payload = _stamped(("ok", 1.0, 1.5), ("long", 2.0, 1e306), ("late", 1e306, 1e306))
    bound = 10.0 + WORD_TIME_MARGIN_S
    assert parse_transcript_message(payload, audio_seconds=10.0) == TimestampedTranscript(
        "ok long late", (WordTiming("ok", 1.0, 1.5), WordTiming("long", 2.0, bound))
    )
    # A caller that cannot say how much audio it sent still gets the day-long hard bound.
    event = parse_transcript_message(payload)
    assert isinstance(event, TimestampedTranscript)
    assert [w.text for w in event.words] == ["ok", "long"]
    assert event.words[1].end == MAX_WORD_TIME_S


@given(st.floats(0, 1e308), st.floats(0, 1e308), st.none() | st.floats(0, 1e6))
def test_no_parsed_word_time_exceeds_the_bound(a: float, b: float, sent: float | None) -> None:
    start, end = min(a, b), max(a, b)
    event = parse_transcript_message(_stamped(("w", start, end)), audio_seconds=sent)
    assert isinstance(event, TimestampedTranscript)
    bound = MAX_WORD_TIME_S if sent is None else min(MAX_WORD_TIME_S, sent + WORD_TIME_MARGIN_S)
    assert all(0 <= w.start <= w.end <= bound for w in event.words)
    assert len(event.words) == (1 if start <= bound else 0)


def test_unknown_message_types_are_ignored_not_errors() -> None:
    assert parse_transcript_message({"message_type": "audio_event", "text": "x"}) is None


@pytest.mark.parametrize(
    "payload",
    [
        None,
        "committed_transcript",
        {"text": "no type"},
        {"message_type": "committed_transcript"},
        {"message_type": "partial_transcript", "text": 5},
        {"message_type": "committed_transcript", "text": "x" * (MAX_TEXT_CHARS + 1)},
        {"message_type": "committed_transcript_with_timestamps", "text": "a"},
        {"message_type": "committed_transcript_with_timestamps", "text": "a", "words": [1]},
        {
            "message_type": "committed_transcript_with_timestamps",
            "text": "a",
            "words": [{"text": "a", "start": 2.0, "end": 1.0}],
        },
        {
            "message_type": "committed_transcript_with_timestamps",
            "text": "a",
            "words": [{"text": "a", "start": float("nan"), "end": 1.0}],
        },
    ],
)
def test_malformed_known_messages_raise_protocol_error(payload: object) -> None:
    with pytest.raises(ProtocolError):
        parse_transcript_message(payload)


def test_protocol_error_belongs_to_the_stt_family() -> None:
    assert issubclass(ProtocolError, SttError)
    assert not ProtocolError("x").permanent


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
message_like = st.fixed_dictionaries(
    {
        "message_type": st.sampled_from(
            [
                "session_started",
                "partial_transcript",
                "committed_transcript",
                "committed_transcript_with_timestamps",
                "other",
            ]
        )
        | json_values,
    },
    optional={
        "text": st.text() | json_values,
        "session_id": st.text() | json_values,
        "words": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "text": st.text() | json_values,
                    "start": st.floats() | json_values,
                    "end": st.floats() | json_values,
                    "type": st.sampled_from(["word", "spacing", "other"]) | json_values,
                },
            )
            | json_values,
            max_size=5,
        )
        | json_values,
    },
)


@given(message_like | json_values)
def test_any_payload_parses_to_an_event_or_none_or_a_protocol_error(payload: object) -> None:
    try:
        event = parse_transcript_message(payload)
    except ProtocolError:
        return
    assert event is None or isinstance(
        event, SessionStarted | PartialTranscript | CommittedTranscript | TimestampedTranscript
    )
    if isinstance(event, TimestampedTranscript):
        assert all(0 <= w.start <= w.end for w in event.words)


@given(json_values)
def test_session_closed_and_error_payloads_never_raise(payload: object) -> None:
    code, reason = parse_session_closed(payload)
    assert isinstance(code, int) and isinstance(reason, str)
    assert isinstance(parse_session_error(payload), str)


def test_session_closed_reads_code_and_reason_and_defaults_a_missing_code() -> None:
    assert parse_session_closed({"code": 1011, "reason": "upstream failed"}) == (
        1011,
        "upstream failed",
    )
    assert parse_session_closed({"reason": "?"}) == (1005, "?")


def test_session_error_reads_the_error_field() -> None:
    assert parse_session_error({"error": "quota exceeded"}) == "quota exceeded"
    assert parse_session_error({}) == "unspecified session error"


def test_the_audio_chunk_frame_text_written_directly_is_what_socketio_would_send() -> None:
    import json

    from bot.stt.protocol import AUDIO_CHUNK, audio_chunk, audio_chunk_event_json

    pcm = bytes(range(256)) * 4
    assert json.loads(audio_chunk_event_json(pcm, 16000)) == [AUDIO_CHUNK,
                                                             audio_chunk(pcm, 16000)]
    with pytest.raises(ValueError):
        audio_chunk_event_json(b"\x00", 16000)
