"""SttCore, the STT session without its socket: bytes and server messages in, events out."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bot.stt.core import MAX_CHUNK_BYTES, SttCore, voiced_span
from bot.stt.events import LineRef, PartialText, SegmentCommitted, SegmentTimestamped

RATE = 16000


def core(**kw: object) -> SttCore:
    args: dict[str, object] = {"sample_rate": RATE, "speaker": "alice", "key": 42,
                               "speaker_id": 42}
    args.update(kw)
    return SttCore(**args)  # type: ignore[arg-type]


def pcm(seconds: float, amp: int = 0) -> bytes:
    n = round(seconds * RATE)
    if amp == 0:
        return np.zeros(n, dtype="<i2").tobytes()
    t = np.arange(n) / RATE
    return (amp * np.sin(2 * np.pi * 220 * t)).astype("<i2").tobytes()


def plain(text: str) -> dict[str, object]:
    return {"message_type": "committed_transcript", "text": text}


def timed(text: str, start: float, end: float) -> dict[str, object]:
    return {"message_type": "committed_transcript_with_timestamps", "text": text,
            "words": [{"text": text, "start": start, "end": end, "type": "word"}]}


def send_all(c: SttCore) -> int:
    """Emit every unsent chunk as the sender would; returns how many bytes went."""
    total = 0
    while (chunk := c.next_chunk()) is not None:
        start, data = chunk
        assert c.sent(start, len(data))
        total += len(data)
    return total


def test_the_cursor_sends_each_sample_once_in_chunks_of_at_most_the_limit() -> None:
    c = core()
    c.append(pcm(5.0))
    sizes = []
    while (chunk := c.next_chunk()) is not None:
        start, data = chunk
        assert start == c.send_pos
        sizes.append(len(data))
        c.sent(start, len(data))
    assert sum(sizes) == 5 * RATE * 2 and max(sizes) <= MAX_CHUNK_BYTES
    assert c.unsent_samples == 0 and c.unconfirmed_samples == 5 * RATE


def test_a_commit_confirms_its_audio_and_a_restart_resends_only_the_rest() -> None:
    c = core()
    c.append(pcm(2.0))
    send_all(c)
    events, _ = c.receive(timed("一", 0.1, 1.5))
    assert isinstance(events[0], SegmentCommitted)
    assert c.buf_start == round(1.5 * RATE)
    c.restart()  # a new upstream session
    assert c.origin == c.send_pos == round(1.5 * RATE)
    assert send_all(c) == round(0.5 * RATE) * 2


def test_the_plain_and_timestamped_forms_share_one_ref_and_refs_never_repeat() -> None:
    numbers = itertools.count(1)
    c = core(line_numbers=numbers)
    c.append(pcm(3.0, amp=3000))
    send_all(c)
    (first,), _ = c.receive(plain("早晨"))
    (twin,), _ = c.receive(timed("早晨", 0.2, 1.0))
    assert isinstance(first, SegmentCommitted) and isinstance(twin, SegmentTimestamped)
    assert first.ref == twin.ref == LineRef(42, 1)
    assert twin.segment.words and twin.segment.start == pytest.approx(0.2)
    # Same text again is a new line with a new number; a second session of the same speaker
    # sharing the counter goes on counting.
    (again,), _ = c.receive(plain("早晨"))
    assert isinstance(again, SegmentCommitted) and again.ref == LineRef(42, 2)
    other = core(line_numbers=numbers)
    other.append(pcm(1.0, amp=3000))
    send_all(other)
    (later,), _ = other.receive(plain("你好"))
    assert isinstance(later, SegmentCommitted) and later.ref == LineRef(42, 3)


def test_a_timestamped_form_first_is_the_line_and_its_plain_twin_is_swallowed() -> None:
    c = core()
    c.append(pcm(2.0, amp=3000))
    send_all(c)
    (line,), _ = c.receive(timed("收到", 0.0, 1.0))
    assert isinstance(line, SegmentCommitted) and line.segment.words
    assert c.receive(plain("收到")) == ([], None)
    assert c.stats.commits == 1


def test_partials_carry_the_speaker_key_not_just_a_display_name() -> None:
    events, _ = core(key=7, speaker="Alice (she/her)").receive(
        {"message_type": "partial_transcript", "text": "早"})
    assert events == [PartialText("Alice (she/her)", "早", 7)]


def test_a_malformed_message_is_counted_and_ignored() -> None:
    c = core()
    assert c.receive({"message_type": "committed_transcript"}) == ([], None)
    assert c.stats.protocol_errors == 1


def test_a_commit_without_timestamps_is_placed_on_the_voiced_audio() -> None:
    c = core(stream_offset=10.0)
    c.append(pcm(1.0) + pcm(1.0, amp=3000) + pcm(1.0))
    send_all(c)
    (line,), _ = c.receive(plain("嗰句"))
    assert isinstance(line, SegmentCommitted)
    assert line.segment.start == pytest.approx(11.0, abs=0.03)
    assert line.segment.end == pytest.approx(12.0, abs=0.03)


def test_the_buffer_bound_drops_the_oldest_and_moves_the_origin_of_unsent_audio() -> None:
    c = core(max_buffer_seconds=1.0)
    c.append(pcm(3.0))  # nothing sent: 2 s never reach the upstream
    assert c.unconfirmed_samples == RATE
    assert c.stats.dropped_seconds == pytest.approx(2.0)
    assert c.send_pos == c.buf_start == 2 * RATE and c.origin == 2 * RATE


def test_voiced_span_ignores_clicks_and_joins_short_pauses() -> None:
    frame = RATE // 50
    audio = np.zeros(RATE * 3, dtype=np.int16)
    audio[frame * 5: frame * 6] = 5000  # a 20 ms click, then 0.7 s of silence
    audio[frame * 40: frame * 60] = 5000
    audio[frame * 70: frame * 80] = 5000  # after a 200 ms pause: the same sentence
    assert voiced_span(audio, RATE) == (frame * 40, frame * 80)
    assert voiced_span(np.zeros(RATE, dtype=np.int16), RATE) is None
