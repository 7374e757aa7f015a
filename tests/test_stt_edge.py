"""The STT session at the edges: upstream error codes, session limits, silence not streamed.

Issue 12 item 16 (every upstream ``{"message_type": "error"}`` handled by what it means; a loss
is never silent) and issue 15 item 5 (audio is streamed only around speech, and every line
keeps its meeting time). Pure core tests first, then the session against the loopback fake.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile

from bot.audio.files import TrackSource, open_track
from bot.config import Config, Secret, SttConfig
from bot.errors import SttAuthError, SttSessionError
from bot.replay import replay
from bot.sim.stt_server import FakeSttServer
from bot.sim.tonecode import speech_track, utterance_duration
from bot.stt.core import PERMANENT_ERRORS, PRE_ROLL_S, SttCore
from bot.stt.events import SegmentCommitted, StateChanged, SttAudioLost, SttEvent, SttState
from bot.stt.session import SttSession

RATE = 16000
CHUNK = RATE // 10 * 2
KEY = "edge-key"


def tone(seconds: float, amp: int = 3000) -> bytes:
    t = np.arange(round(seconds * RATE)) / RATE
    return (amp * np.sin(2 * np.pi * 220 * t)).astype("<i2").tobytes()


def quiet(seconds: float) -> bytes:
    return np.zeros(round(seconds * RATE), dtype="<i2").tobytes()


def gated(tail: float = 0.5, **kw: object) -> SttCore:
    return SttCore(sample_rate=RATE, speaker="alice", key=1, silence_tail_s=tail,
                   **kw)  # type: ignore[arg-type]


def feed(c: SttCore, pcm: bytes) -> None:
    for i in range(0, len(pcm), CHUNK):
        c.append(pcm[i:i + CHUNK])


def send_all(c: SttCore) -> int:
    total = 0
    while (chunk := c.next_chunk()) is not None:
        start, data = chunk
        assert c.sent(start, len(data))
        total += len(data)
    return total


def timed(text: str, start: float, end: float) -> dict[str, object]:
    return {"message_type": "committed_transcript_with_timestamps", "text": text,
            "words": [{"text": text, "start": start, "end": end, "type": "word"}]}


# -- pure: gating and time mapping -------------------------------------------------------------


def test_only_speech_its_pre_roll_and_its_tail_are_sent() -> None:
    c = gated(tail=0.5)
    feed(c, quiet(1.0) + tone(1.0) + quiet(5.0) + tone(1.0) + quiet(3.0))
    sent = send_all(c) / 2 / RATE
    assert sent == pytest.approx(2 * (PRE_ROLL_S + 1.0 + 0.5), abs=0.05)
    assert c.stats.speech_seconds == pytest.approx(2.0, abs=0.03)
    assert c.stats.seconds_sent == pytest.approx(sent)


def test_upstream_times_map_back_across_the_skipped_silence() -> None:
    c = gated(tail=0.5, stream_offset=100.0)
    feed(c, quiet(1.0) + tone(1.0) + quiet(5.0) + tone(1.0) + quiet(3.0))
    send_all(c)
    # The upstream heard 0.2 pre-roll + 1.0 speech + 0.5 tail, then 0.2 pre-roll: the second
    # sentence starts at 1.9 s on its clock, 7.0 s in the stream.
    (line,), _ = c.receive(timed("二", 1.9, 2.9))
    assert isinstance(line, SegmentCommitted)
    assert line.segment.start == pytest.approx(107.0, abs=0.02)
    assert line.segment.end == pytest.approx(108.0, abs=0.02)


def test_a_restart_does_not_resend_the_silence_before_the_unconfirmed_speech() -> None:
    c = gated(tail=0.5)
    feed(c, quiet(1.0) + tone(1.0) + quiet(5.0) + tone(1.0) + quiet(3.0))
    send_all(c)
    c.receive(timed("一", 0.2, 1.2))  # the first sentence, confirmed to its end (1.2 s)
    c.restart()
    # Re-sent: only the second sentence with its pre-roll and tail, not the first one's tail.
    assert c.send_pos == pytest.approx(round((7.0 - PRE_ROLL_S) * RATE), abs=RATE // 50)
    assert send_all(c) / 2 / RATE == pytest.approx(PRE_ROLL_S + 1.0 + 0.5, abs=0.05)
    (line,), _ = c.receive(timed("二", 0.2, 1.2))
    assert line.segment.start == pytest.approx(7.0, abs=0.03)


def test_a_commit_ends_the_silence_tail_early() -> None:
    c = gated(tail=2.0)
    feed(c, tone(1.0) + quiet(0.3))
    send_all(c)
    c.receive(timed("一", 0.0, 1.0))  # the upstream needed only 0.3 s of pause
    feed(c, quiet(3.0))
    assert send_all(c) == 0
    assert c.stats.seconds_sent == pytest.approx(1.3, abs=0.02)


def test_a_plain_commit_is_placed_on_its_speech_across_gaps() -> None:
    """Item 12: the estimate must find where the speech is, not the span since the last
    commit (that would start this line at 0 s, in the silence)."""
    c = gated(tail=0.5, stream_offset=10.0)
    feed(c, quiet(4.0) + tone(1.5) + quiet(6.0))
    send_all(c)
    (line,), _ = c.receive({"message_type": "committed_transcript", "text": "嗰句"})
    assert line.segment.start == pytest.approx(14.0, abs=0.03)
    assert line.segment.end == pytest.approx(15.5, abs=0.03)


def test_an_upstream_error_message_is_taken_once_by_code() -> None:
    c = gated()
    assert c.receive({"message_type": "error", "error": "quota_exceeded"}) == ([], None)
    error = c.take_error()
    assert error is not None and error.code == "quota_exceeded"
    assert c.take_error() is None and c.stats.upstream_errors == {"quota_exceeded": 1}


# -- the session against the loopback fake -----------------------------------------------------


class Recorder(list[SttEvent]):
    def __call__(self, event: SttEvent) -> None:
        self.append(event)

    def states(self) -> list[StateChanged]:
        return [e for e in self if isinstance(e, StateChanged)]

    def lines(self) -> list[str]:
        return [e.segment.text for e in self if isinstance(e, SegmentCommitted)]


def speech(lines: list[tuple[float, str]], duration: float | None = None) -> bytes:
    return np.round(speech_track(lines, RATE, duration) * 32767).astype("<i2").tobytes()


async def until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def session(url: str, rec: Recorder, **kw: object) -> SttSession:
    options: dict[str, object] = dict(
        url=url, api_key=KEY, sample_rate=RATE, speaker="alice", on_event=rec, speaker_id=7,
        stop_timeout=3.0, reconnect_initial_delay=0.01, reconnect_max_delay=0.05,
        rng=random.Random(3), silence_tail_s=0.8)
    options.update(kw)
    return SttSession(**options)  # type: ignore[arg-type]


def send(s: SttSession, pcm: bytes) -> None:
    for i in range(0, len(pcm), CHUNK):
        s.send_audio(pcm[i:i + CHUNK])


@pytest.mark.parametrize("code", sorted(PERMANENT_ERRORS))
async def test_a_permanent_upstream_error_fails_once_says_what_to_do_and_never_reconnects(
    code: str,
) -> None:
    async with FakeSttServer(KEY) as server:
        rec = Recorder()
        s = session(server.url, rec)
        await s.start()
        server.upstream_error = code
        send(s, speech([(0.2, "你好")]))
        await until(lambda: s.state is SttState.FAILED)
        await asyncio.sleep(0.3)  # time for any reconnect that should not happen
        assert server.connection_attempts == 1 and s.stats.reconnects == 0
        (failed,) = [e for e in rec.states() if e.state is SttState.FAILED]
        assert failed.error is not None and failed.error.permanent
        assert isinstance(failed.error, SttAuthError if code == "auth_error" else SttSessionError)
        assert code in failed.error.user_message
        assert ("api_key" if code == "auth_error" else "/transcribe start") in \
            failed.error.user_message
        await s.stop()


async def test_a_session_time_limit_starts_a_new_session_at_once_without_a_notice() -> None:
    async with FakeSttServer(KEY) as server:
        rec = Recorder()
        s = session(server.url, rec)
        await s.start()
        server.upstream_error, server.upstream_error_after_chunks = \
            "session_time_limit_exceeded", 8  # inside the sentence: it is lost upstream
        send(s, speech([(0.2, "預算OK")], duration=4.0))
        await s.stop()
    assert rec.lines() == ["預算OK"]  # re-sent to the new session: once, not lost
    assert s.stats.reconnects == 1
    assert all(e.error is None for e in rec.states())  # nothing to tell the channel
    assert rec.states()[-1].state is SttState.CLOSED


async def dormant_after_one_line(server: FakeSttServer, rec: Recorder) -> SttSession:
    """A session that committed "一", then was closed upstream for inactivity."""
    s = session(server.url, rec)
    await s.start()
    send(s, speech([(0.1, "一")], duration=2.0))
    await until(lambda: rec.lines() == ["一"])
    await server.emit_raw("transcript-message",
                          {"message_type": "error", "error": "insufficient_audio_activity"})
    await until(lambda: s.state is SttState.RECONNECTING)
    return s


async def test_insufficient_activity_closes_quietly_until_speech_resumes() -> None:
    async with FakeSttServer(KEY) as server:
        rec = Recorder()
        s = await dormant_after_one_line(server, rec)
        await asyncio.sleep(0.3)
        assert server.connection_attempts == 1  # no connection while nobody speaks
        send(s, quiet(1.0))
        await asyncio.sleep(0.2)
        assert server.connection_attempts == 1  # silence is not speech
        send(s, speech([(0.1, "二")], duration=2.0))
        await until(lambda: s.state is SttState.STREAMING)
        await s.stop()
    assert rec.lines() == ["一", "二"] and server.connection_attempts == 2
    assert all(e.error is None for e in rec.states())


async def test_a_dormant_session_stops_at_once_with_nothing_lost() -> None:
    async with FakeSttServer(KEY) as server:
        rec = Recorder()
        s = await dormant_after_one_line(server, rec)
        async with asyncio.timeout(1.0):
            await s.stop()
    assert s.state is SttState.CLOSED and s.stats.lost_seconds == 0


@pytest.mark.parametrize("code", ["rate_limited", "chunk_size_exceeded", "transcriber_error"])
async def test_other_upstream_errors_back_off_retry_and_lose_nothing(
    code: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with FakeSttServer(KEY) as server:
        rec = Recorder()
        s = session(server.url, rec)
        await s.start()
        server.upstream_error, server.upstream_error_after_chunks = code, 8
        send(s, speech([(0.2, "預算OK")], duration=4.0))
        await s.stop()
    assert rec.lines() == ["預算OK"] and s.stats.reconnects == 1
    reconnecting = [e for e in rec.states() if e.state is SttState.RECONNECTING]
    assert reconnecting[0].error is not None and code in str(reconnecting[0].error)
    if code == "chunk_size_exceeded":
        assert "last chunks sent at stream time" in caplog.text


# -- replays: a 15 s session limit, long silences, and a loss that is said ---------------------

#: Two 60 s tracks: short sentences with long silences between them (9 in all).
TRACKS = {
    "alice": [(2.0, "開會"), (14.0, "預算"), (27.0, "好"), (41.0, "散會"), (55.0, "拜拜")],
    "bob": [(6.0, "收到"), (21.0, "OK"), (35.0, "明白"), (49.0, "再見")],
}


def clip(folder: Path, name: str, lines: list[tuple[float, str]],
         duration: float = 60.0) -> TrackSource:
    mono = (speech_track(lines, RATE, duration) * 16000).astype(np.int16)
    soundfile.write(folder / f"{name}.wav", mono, RATE)
    return open_track(str(folder / f"{name}.wav"), name)


async def test_a_15_s_session_limit_loses_and_doubles_nothing_and_silence_is_not_sent(
    tmp_path: Path,
) -> None:
    clips = [clip(tmp_path, name, lines) for name, lines in TRACKS.items()]
    async with FakeSttServer(KEY) as server:
        server.session_limit_seconds = 15.0
        config = Config(stt=SttConfig(url=server.url, api_key=Secret(KEY), stop_timeout=5.0,
                                      reconnect_initial_delay=0.01, reconnect_max_delay=0.05))
        result = await replay(clips, config, speed=0)
        audio_bytes = server.total_audio_bytes
        assert server.session_limits_hit >= 1  # the limit did cut sessions short
    said = sorted((s.speaker, s.text) for s in result.segments)
    assert said == sorted((name, text) for name, lines in TRACKS.items() for _, text in lines)
    assert result.errors == []
    # Every line keeps its time in the meeting: within 0.3 s of where its speech is.
    starts = {(name, text): t for name, lines in TRACKS.items() for t, text in lines}
    for seg in result.segments:
        t = starts[(seg.speaker, seg.text)]
        assert abs(seg.start - t) <= 0.3, seg
        assert abs(seg.end - (t + utterance_duration(seg.text))) <= 0.3, seg
    speech_s = sum(utterance_duration(text) for lines in TRACKS.values() for _, text in lines)
    # Only speech with its pre-roll and tail went out (each 60 s track streamed whole would
    # be 120 s): at most the tail per sentence on top, at --speed 0 where no commit cuts it.
    assert audio_bytes / 2 / RATE <= speech_s + 9 * (PRE_ROLL_S + 2.0) + 0.5


async def test_a_replay_that_gives_up_says_whose_speech_and_how_long(tmp_path: Path) -> None:
    clips = [clip(tmp_path, "alice", [(0.1, "預算OK")], duration=3.0)]
    async with FakeSttServer(KEY) as server:
        config = Config(stt=SttConfig(url=server.url, api_key=Secret(KEY), stop_timeout=0.5,
                                      reconnect_initial_delay=0.01, reconnect_max_delay=0.05))
        task = asyncio.create_task(replay(clips, config, speed=1.0))
        await until(lambda: server.total_audio_bytes > 0)
        await server.stop()  # gone for good
        result = await task
    (error,) = result.errors  # run_replay raises it: one line, a non-zero exit
    assert isinstance(error, SttAudioLost) and error.speaker == "alice"
    # From its first speech to its last (the silence after it is no loss).
    assert error.seconds == pytest.approx(0.1 + utterance_duration("預算OK"), abs=0.05)
    assert "of alice's speech could not be transcribed" in error.user_message


async def test_a_permanent_error_stops_every_later_start_of_the_meeting() -> None:
    from bot.pipeline import Transcriber

    events = Recorder()
    async with FakeSttServer(KEY) as server:
        config = SttConfig(url=server.url, api_key=Secret(KEY), stop_timeout=1.0,
                           reconnect_initial_delay=0.01, reconnect_max_delay=0.05)
        transcriber = Transcriber(config, events)
        alice = transcriber.open("alice", speaker="alice", in_rate=RATE)
        await alice.keep_starting()
        server.upstream_error = "quota_exceeded"
        alice.feed(np.frombuffer(speech([(0.1, "你好")], duration=3.0), dtype="<i2"))
        await until(lambda: alice.session.state is SttState.FAILED)
        bob = transcriber.open("bob", speaker="bob", in_rate=RATE)
        async with asyncio.timeout(1.0):
            await bob.keep_starting()  # refused by the gate: no connection, no retry loop
        bob.feed(np.frombuffer(speech([(0.1, "收到")], duration=3.0), dtype="<i2"))
        await transcriber.finish_all()
        assert server.connection_attempts == 1
    refusals = [e for e in events.states() if e.error is not None and not
                isinstance(e.error, SttAudioLost)]
    assert [e.speaker for e in refusals] == ["alice"]
    assert "quota_exceeded" in refusals[0].error.user_message  # type: ignore[union-attr]
    # What neither could say is not silently dropped: a loss for each, with its seconds.
    losses = {e.speaker: e.error.seconds for e in events.states()
              if isinstance(e.error, SttAudioLost)}
    assert set(losses) == {"alice", "bob"} and all(s > 1.0 for s in losses.values())


def test_a_replay_amends_the_line_of_its_ref_not_the_first_with_the_same_text() -> None:
    """A speaker says the same thing twice; only the second gets word times. Matching by
    (speaker, text) gave the first line the second one's time (issue 13's LineRef amend)."""
    from bot.replay import ReplayResult
    from bot.stt.events import LineRef
    from bot.transcript.model import Segment, Word

    result = ReplayResult()
    first, second = LineRef("alice", 1), LineRef("alice", 2)
    result.add(first, Segment("alice", "好", 1.0, 1.5))
    result.add(second, Segment("alice", "好", 9.0, 9.5))
    result.amend(second, Segment("alice", "好", 9.1, 9.4, (Word("好", 9.1, 9.4),)))
    assert [(s.start, bool(s.words)) for s in result.segments] == [(1.0, False), (9.1, True)]


def test_word_times_are_bounded_by_the_audio_this_upstream_session_was_sent() -> None:
    """Issue 12 item 5 through the session: the bound is the audio actually sent on this
    upstream clock (skipped silence excluded) plus the protocol's margin."""
    from bot.stt.protocol import WORD_TIME_MARGIN_S

    c = gated(tail=0.5)
    feed(c, quiet(30.0) + tone(1.0) + quiet(3.0))  # 30 s of silence never reach the upstream
    send_all(c)
    assert c.upstream_seconds() == pytest.approx(PRE_ROLL_S + 1.0 + 0.5, abs=0.03)
    (line,), _ = c.receive(timed("遠", 0.2, 1e306))
    bound = c.upstream_seconds() + WORD_TIME_MARGIN_S
    assert line.segment.words[0].end == pytest.approx(  # clamped, then mapped to the stream
        c.lines.seconds(c.upstream_to_stream(bound)))
    assert line.segment.end < 34.0
    (late,), _ = c.receive(timed("後", 1e306, 1e306))  # after everything sent: dropped
    assert late.segment.words == () and late.segment.end < 34.0


def test_a_long_silent_chunk_leaves_only_the_pre_roll_before_speech() -> None:
    c = gated(tail=0.5)
    c.append(quiet(5.0))  # one big chunk (chunk_ms may be up to 1000; a file's block)
    c.append(tone(1.0) + quiet(2.0))
    assert send_all(c) / 2 / RATE == pytest.approx(PRE_ROLL_S + 1.0 + 0.5, abs=0.03)
    # Skipped: the silence before the pre-roll, and after the tail all but the last 200 ms
    # (held in case speech follows).
    assert c.stats.skipped_seconds == pytest.approx(5.0 + 1.5 - 2 * PRE_ROLL_S, abs=0.03)
