"""The pipeline seam: speaker streams over real STT sessions against the loopback fake."""

from __future__ import annotations

import asyncio

import numpy as np

from bot.config import Secret, SttConfig
from bot.pipeline import Transcriber
from bot.sim.stt_server import FakeSttServer
from bot.sim.tonecode import speech_track
from bot.stt.session import SegmentCommitted, SttEvent

RATE = 16000
KEY = "test-key"
#: Bound on each test (seconds).
TEST_TIMEOUT = 40.0


def pcm_of(lines: list[tuple[float, str]], duration: float) -> np.ndarray:
    return (speech_track(lines, RATE, duration=duration) * 16000).astype(np.int16)


async def test_a_speaker_quiet_during_an_stt_outage_is_transcribed_when_it_returns() -> None:
    events: list[SttEvent] = []
    async with asyncio.timeout(TEST_TIMEOUT), FakeSttServer(KEY) as server:
        config = SttConfig(url=server.url, api_key=Secret(KEY), stop_timeout=2.0,
                           reconnect_initial_delay=0.2, reconnect_max_delay=1.0)
        transcriber = Transcriber(config, events.append)
        try:
            stream = transcriber.open("alice", speaker="alice", in_rate=RATE)
            await stream.start()
            audio = pcm_of([(0.1, "好")], duration=4.0)
            stream.feed_converted(audio[: RATE])  # the first second reaches the server
            await stream.session.drain()
            await server.stop()  # outage: the rest of her sentence is only in our buffer
            stream.feed_converted(audio[RATE:])
            # She goes quiet; the idle stop may outlast stop_timeout (2 s) while STT is down.
            transcriber.finish_in_background("alice", within=20.0)
            await asyncio.sleep(3.0)
            await server.start()  # same port: the session reconnects and re-sends
            await transcriber.finish_all()
        finally:
            await transcriber.aclose()
    lines = [e.segment.text for e in events if isinstance(e, SegmentCommitted)]
    assert lines == ["好"]
