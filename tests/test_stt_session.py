"""SttSession against the loopback cantonese.ai fake: lines, times, reconnects, stop, bounds."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from bot.errors import SttAuthError, SttSessionError, SttUnavailable
from bot.sim.stt_server import FakeSttServer
from bot.sim.tonecode import speech_track, utterance_duration
from bot.stt.events import SttAudioLost
from bot.stt.session import (
    PartialText,
    SegmentCommitted,
    SegmentTimestamped,
    StateChanged,
    SttEvent,
    SttSession,
    SttState,
)

RATE = 16000
CHUNK = RATE // 10 * 2  # 100 ms of int16 mono, the bot's default chunk
KEY = "test-key"
FIRST, SECOND, THIRD = "今日開會", "大家好", "預算OK"


def timeline(*texts: str, gap: float = 0.6) -> list[tuple[float, str]]:
    """Utterances one after another with ``gap`` seconds of silence before each."""
    lines, t = [], gap
    for text in texts:
        lines.append((t, text))
        t += utterance_duration(text) + gap
    return lines


def pcm_of(lines: list[tuple[float, str]], duration: float | None = None) -> bytes:
    track = speech_track(lines, RATE, duration)
    return np.round(track * 32767).astype("<i2").tobytes()


def chunks(pcm: bytes) -> Iterator[bytes]:
    for i in range(0, len(pcm), CHUNK):
        yield pcm[i : i + CHUNK]


class Recorder:
    def __init__(self) -> None:
        self.events: list[SttEvent] = []

    def __call__(self, event: SttEvent) -> None:
        self.events.append(event)

    @property
    def lines(self) -> list[str]:
        return [e.segment.text for e in self.events if isinstance(e, SegmentCommitted)]

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def states(self) -> list[SttState]:
        return [e.state for e in self.events if isinstance(e, StateChanged)]


async def until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    """Wait for a condition (``limit`` guards against hangs; it is no speed assertion)."""
    async with asyncio.timeout(limit):
        # Conditions span the fake server and the session; neither has an event for each.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def make_session(url: str, recorder: Recorder, **kwargs: object) -> SttSession:
    options: dict[str, object] = dict(
        url=url,
        api_key=KEY,
        sample_rate=RATE,
        speaker="alice",
        on_event=recorder,
        speaker_id=42,
        connect_timeout=5.0,
        start_timeout=5.0,
        stop_timeout=10.0,
        reconnect_initial_delay=0.01,
        reconnect_max_delay=0.05,
        rng=random.Random(1),
    )
    options.update(kwargs)
    return SttSession(**options)  # type: ignore[arg-type]


@pytest.fixture
async def server() -> FakeSttServer:
    async with FakeSttServer(KEY) as fake:
        yield fake


async def test_a_normal_session_commits_each_sentence_once_with_meeting_times(
    server: FakeSttServer,
) -> None:
    rec = Recorder()
    lines = timeline(FIRST, SECOND)
    session = make_session(server.url, rec, stream_offset=100.0)
    await session.start()
    assert session.state is SttState.STREAMING
    for chunk in chunks(pcm_of(lines)):
        session.send_audio(chunk)
    await session.stop()

    assert rec.lines == [FIRST, SECOND]
    timed = [e.segment for e in rec.of(SegmentTimestamped)]
    assert [s.text for s in timed] == [FIRST, SECOND]
    for seg, (start, text) in zip(timed, lines, strict=True):
        assert seg.speaker == "alice" and seg.speaker_id == 42
        # Words sit inside the utterance: after its 240 ms preamble, before its end.
        assert 100.0 + start < seg.start < 100.0 + start + 0.5
        assert seg.end <= 100.0 + start + utterance_duration(text) + 0.05
        assert "".join(w.text for w in seg.words) == text
    assert rec.states == [
        SttState.CONNECTING,
        SttState.STARTING,
        SttState.STREAMING,
        SttState.STOPPING,
        SttState.CLOSED,
    ]
    (record,) = server.records.values()
    assert record.sample_rates == [RATE] and record.chunk_rates == {RATE}
    assert record.audio_bytes == len(pcm_of(lines)) == session.stats.bytes_sent
    assert (record.session_starts, record.session_stops) == (1, 1)
    assert session.stats.commits == 2 and session.stats.reconnects == 0
    # Every chunk took the direct websocket write (python-engineio's internals as pinned), and
    # the server decoded the same audio-chunk events from those frames (lines, bytes above).
    assert session.stats.chunks_direct == session.stats.chunks_sent > 0


async def test_partials_come_before_the_commit_of_their_sentence(server: FakeSttServer) -> None:
    rec = Recorder()
    session = make_session(server.url, rec)
    await session.start()
    for chunk in chunks(pcm_of(timeline(FIRST))):
        session.send_audio(chunk)
    await session.stop()
    kinds = [type(e) for e in rec.events if isinstance(e, PartialText | SegmentCommitted)]
    assert kinds[0] is PartialText and kinds[-1] is SegmentCommitted
    partials = [e.text for e in rec.of(PartialText)]
    assert partials and all(FIRST.startswith(t) for t in partials)


async def test_the_timestamped_twin_improves_the_line_instead_of_adding_one(
    server: FakeSttServer,
) -> None:
    rec = Recorder()
    session = make_session(server.url, rec)
    await session.start()
    for chunk in chunks(pcm_of(timeline(FIRST))):
        session.send_audio(chunk)
    await session.stop()
    (committed,) = rec.of(SegmentCommitted)
    (timestamped,) = rec.of(SegmentTimestamped)
    assert committed.segment.words == ()
    assert timestamped.segment.text == committed.segment.text == FIRST
    assert [w.text for w in timestamped.segment.words] == list(FIRST)


async def test_a_timestamped_form_arriving_first_is_the_line_and_the_plain_twin_is_swallowed(
    server: FakeSttServer,
) -> None:
    server.timestamps_first = True
    rec = Recorder()
    session = make_session(server.url, rec)
    await session.start()
    for chunk in chunks(pcm_of(timeline(FIRST, SECOND))):
        session.send_audio(chunk)
    await session.stop()
    assert rec.lines == [FIRST, SECOND]
    assert rec.of(SegmentTimestamped) == []
    assert all(e.segment.words for e in rec.of(SegmentCommitted))


async def test_plain_commits_only_get_times_estimated_from_the_audio_position(
    server: FakeSttServer,
) -> None:
    server.send_timestamps = False
    rec = Recorder()
    session = make_session(server.url, rec)
    await session.start()
    for chunk in chunks(pcm_of(timeline(FIRST))):
        session.send_audio(chunk)
    await session.stop()
    (line,) = rec.of(SegmentCommitted)
    assert line.segment.text == FIRST and line.segment.words == ()
    # Placed on the speech (after the 0.6 s of silence before it), not "since the last commit".
    (start, text), = timeline(FIRST)
    assert line.segment.start == pytest.approx(start, abs=0.05)
    assert line.segment.end == pytest.approx(start + utterance_duration(text), abs=0.05)


async def test_plain_commit_times_stay_on_the_speech_with_silence_skipped(
    server: FakeSttServer,
) -> None:
    """The estimate across skipped silence and sentences (issue 12 item 12)."""
    server.send_timestamps = False
    rec = Recorder()
    session = make_session(server.url, rec, stream_offset=50.0, silence_tail_s=0.8)
    await session.start()
    lines = timeline(FIRST, SECOND, THIRD, gap=4.0)
    for chunk in chunks(pcm_of(lines, duration=lines[-1][0] + 6.0)):
        session.send_audio(chunk)
    await session.stop()
    got = [e.segment for e in rec.of(SegmentCommitted)]
    assert [s.text for s in got] == [FIRST, SECOND, THIRD]
    for seg, (start, text) in zip(got, lines, strict=True):
        assert seg.start == pytest.approx(50.0 + start, abs=0.05)
        assert seg.end == pytest.approx(50.0 + start + utterance_duration(text), abs=0.05)
    assert session.stats.seconds_sent < sum(utterance_duration(t) for t in
                                            (FIRST, SECOND, THIRD)) * 1.6


@pytest.mark.parametrize("fault", ["session-error", "close-1011", "server-drop"])
async def test_a_broken_session_reconnects_and_no_sentence_is_lost_or_doubled(
    server: FakeSttServer, fault: str
) -> None:
    lines = timeline(FIRST, SECOND, THIRD)
    # Break it in the middle of the second sentence (chunks are 100 ms).
    mid_second = int((lines[1][0] + 1.0) * 10)
    if fault == "session-error":
        server.error_after_chunks = mid_second
    elif fault == "close-1011":
        server.close_after_chunks = mid_second
    else:
        server.drop_after_chunks = mid_second
    rec = Recorder()
    session = make_session(server.url, rec)
    await session.start()
    for chunk in chunks(pcm_of(lines)):
        session.send_audio(chunk)
    await until(lambda: session.state is SttState.STREAMING and session.stats.reconnects == 1)
    await session.stop()

    assert rec.lines == [FIRST, SECOND, THIRD]
    assert [e.segment.text for e in rec.of(SegmentTimestamped)] == [FIRST, SECOND, THIRD]
    assert SttState.RECONNECTING in rec.states
    # A fresh connection and upstream session, which heard the unconfirmed audio again.
    first_conn, second_conn = server.records.values()
    assert first_conn.committed == [FIRST]
    assert second_conn.committed == [SECOND, THIRD]
    # Times stay on the meeting clock across the new upstream session.
    third = rec.of(SegmentTimestamped)[-1].segment
    assert lines[2][0] < third.start < lines[2][0] + 0.5


async def test_a_server_restart_on_the_same_port_loses_and_doubles_nothing(
    server: FakeSttServer,
) -> None:
    lines = timeline(FIRST, SECOND, THIRD)
    pcm = pcm_of(lines)
    split = int((lines[1][0] + 1.5) * RATE) * 2  # in the middle of the second sentence
    rec = Recorder()
    session = make_session(server.url, rec)
    await session.start()
    for chunk in chunks(pcm[:split]):
        session.send_audio(chunk)
    await until(lambda: server.total_audio_bytes >= split and FIRST in rec.lines)
    port = server.port
    await server.restart()
    assert server.port == port
    for chunk in chunks(pcm[split:]):
        session.send_audio(chunk)
    await until(lambda: session.stats.reconnects == 1 and session.state is SttState.STREAMING)
    await session.stop()
    assert rec.lines == [FIRST, SECOND, THIRD]


async def test_a_rejected_key_fails_fast_with_one_attempt_and_no_retries(
    server: FakeSttServer,
) -> None:
    rec = Recorder()
    session = make_session(server.url, rec, api_key="wrong")
    with pytest.raises(SttAuthError, match="rejected the API key"):
        await session.start()
    assert session.state is SttState.FAILED
    assert rec.of(StateChanged)[-1].error is not None
    assert isinstance(rec.of(StateChanged)[-1].error, SttAuthError)
    await asyncio.sleep(0.1)  # a retry storm would show up as more attempts
    assert (server.connection_attempts, server.rejected_attempts) == (1, 1)
    with pytest.raises(SttAuthError):
        await session.start()  # the owner may try again: exactly one more attempt
    assert server.connection_attempts == 2
    await session.stop()
    assert session.state is SttState.CLOSED


async def test_start_times_out_when_the_server_never_starts_the_session(
    server: FakeSttServer,
) -> None:
    server.ignore_start_session = True
    rec = Recorder()
    session = make_session(server.url, rec, start_timeout=0.2)
    with pytest.raises(SttSessionError, match="did not start a session"):
        await session.start()
    assert session.state is SttState.FAILED
    await session.aclose()


async def test_a_session_error_at_start_is_reported_not_retried(server: FakeSttServer) -> None:
    server.start_session_error = "quota exceeded"
    session = make_session(server.url, Recorder())
    with pytest.raises(SttSessionError, match="quota exceeded"):
        await session.start()
    assert server.connection_attempts == 1
    await session.aclose()


async def test_an_unreachable_server_is_unavailable() -> None:
    fake = FakeSttServer(KEY)
    await fake.start()
    url = fake.url
    await fake.stop()  # nothing listens on that port now
    session = make_session(url, Recorder())
    with pytest.raises(SttUnavailable):
        await session.start()
    await session.aclose()


async def test_stop_flushes_the_last_sentence_still_pending_on_the_server(
    server: FakeSttServer,
) -> None:
    lines = timeline(FIRST)
    end = lines[0][0] + utterance_duration(FIRST)
    rec = Recorder()
    session = make_session(server.url, rec)
    await session.start()
    for chunk in chunks(pcm_of(lines, duration=end)):  # no pause after it: no commit yet
        session.send_audio(chunk)
    await until(lambda: session.stats.bytes_sent >= int(end * RATE) * 2)
    assert rec.lines == []
    await session.stop()
    assert rec.lines == [FIRST]


async def test_the_unconfirmed_buffer_drops_the_oldest_audio_past_its_bound(
    server: FakeSttServer,
) -> None:
    lines = timeline(FIRST, SECOND)
    pcm = pcm_of(lines)
    total = len(pcm) / 2 / RATE
    keep = total - lines[1][0] + 0.1  # room for the second sentence only
    rec = Recorder()
    session = make_session(server.url, rec, max_buffer_seconds=keep)
    for chunk in chunks(pcm):  # buffered before start: nothing confirms it
        session.send_audio(chunk)
    assert session.stats.dropped_seconds == pytest.approx(total - keep, abs=0.01)
    await session.start()
    await session.stop()
    assert rec.lines == [SECOND]
    assert server.total_audio_bytes == pytest.approx(keep * RATE * 2, abs=CHUNK)
    # The kept sentence is placed where it was spoken, not at the start of what was sent.
    (timed,) = rec.of(SegmentTimestamped)
    assert lines[1][0] < timed.segment.start < lines[1][0] + 0.5


async def test_stop_and_aclose_are_idempotent_and_leave_closed(server: FakeSttServer) -> None:
    session = make_session(server.url, Recorder())
    await session.start()
    await session.stop()
    await session.stop()
    await session.aclose()
    assert session.state is SttState.CLOSED
    session.send_audio(b"\x00\x00")  # after stop: ignored
    assert len(server.records) == 1
    await until(lambda: all(r.disconnected for r in server.records.values()))


async def test_the_api_key_never_appears_in_logs(
    server: FakeSttServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bot")
    server.drop_after_chunks = 5
    session = make_session(server.url, Recorder())
    await session.start()
    for chunk in chunks(pcm_of(timeline(SECOND))):
        session.send_audio(chunk)
    await until(lambda: session.stats.reconnects == 1)
    await session.stop()
    assert "streaming -> reconnecting" in caplog.text
    assert KEY not in caplog.text


async def test_malformed_server_messages_are_counted_and_the_session_goes_on(
    server: FakeSttServer,
) -> None:
    rec = Recorder()
    session = make_session(server.url, rec)
    await session.start()
    await server.emit_raw("transcript-message", {"message_type": "committed_transcript"})
    await server.emit_raw("transcript-message", "not an object")
    await server.emit_raw("transcript-message", {"message_type": "some_future_type"})
    await until(lambda: session.stats.protocol_errors == 2)
    for chunk in chunks(pcm_of(timeline(SECOND))):
        session.send_audio(chunk)
    await session.stop()
    assert rec.lines == [SECOND]


async def test_stop_while_the_server_stays_away_gives_up_within_its_timeout(
    server: FakeSttServer, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    session = make_session(server.url, rec, stop_timeout=0.3)
    await session.start()
    session.send_audio(pcm_of(timeline(SECOND))[:CHUNK])
    await until(lambda: server.total_audio_bytes > 0)
    await server.stop()  # gone for good: every reconnect attempt is refused
    await until(lambda: session.state is SttState.RECONNECTING)
    await session.stop()
    # A loss is never reported as a clean close: FAILED, with whose and how many seconds.
    assert session.state is SttState.FAILED
    assert rec.states[-2:] == [SttState.RECONNECTING, SttState.FAILED]
    loss = rec.of(StateChanged)[-1].error
    assert isinstance(loss, SttAudioLost) and loss.speaker == "alice"
    assert loss.seconds == pytest.approx(0.1)
    assert "gave up: 0.1 s of alice's speech could not be transcribed" in caplog.text
    assert session.stats.reconnects == 0 and session.stats.lost_seconds == pytest.approx(0.1)
