"""Row "speech": audio sent to the STT service ÷ speech, before and after silence gating.

Every second sent is upstream work and likely billed (issue 15 item 5). Two inputs, each run
with ``stt.silence_tail_ms: 0`` (every sample streamed, the old behaviour) and with the default
(speech, a 200 ms pre-roll and at most the silence tail, cut short by the commit):

* live: ``cantobot demo``'s meeting (the loopback Discord, the real bot, the STT fake), in
  real time: two members, four tone-coded sentences;
* replay: two 60 s tracks with 5-14 s pauses between nine short sentences, through the same
  :func:`bot.replay.replay` as ``cantobot replay`` (paced at ``REPLAY_SPEED`` x real time);
  the two tracks are written as WAV files and read back as ``cantobot replay`` reads them.

"Speech" is the length of the tone-coded sentences; "sent" is what the fake STT server
received (re-sends after a reconnect included). For the replay the row also gives the largest
distance between a line's start and where its speech starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import soundfile

from bot.audio.files import open_track
from bot.config import Config, load_config, with_overrides
from bot.sim.stt_server import FakeSttServer
from bot.sim.tonecode import speech_track, utterance_duration

log = logging.getLogger("bench")

KEY = "bench-key"
RATE = 16000
#: Replay pace: real time, ``cantobot replay``'s default and a live meeting's pace. Faster, the
#: tail races ahead of the commit that would cut it short (measured on this 2-core machine under
#: load: 1.34-1.53x at 4x; at ``--speed 0`` every sentence sends its whole tail).
REPLAY_SPEED = 1.0
TRACKS: dict[str, list[tuple[float, str]]] = {
    "alice": [(2.0, "開會"), (14.0, "預算"), (27.0, "好"), (41.0, "散會"), (55.0, "拜拜")],
    "bob": [(6.0, "收到"), (21.0, "OK"), (35.0, "明白"), (49.0, "再見")],
}


@dataclass(frozen=True)
class SpeechRow:
    source: str
    gating: str
    speech_s: float
    sent_s: float
    lines: int
    expected_lines: int
    #: Largest |line start - speech start| (replay only).
    worst_time_error_s: float | None

    @property
    def ratio(self) -> float:
        return self.sent_s / self.speech_s if self.speech_s else float("nan")


def _config(url: str, tail_ms: int | None) -> Config:
    stt: dict[str, object] = {"url": url, "api_key": KEY}
    if tail_ms is not None:
        stt["silence_tail_ms"] = tail_ms
    return with_overrides(load_config(None, environ={}), stt=stt)


async def _replay(tail_ms: int | None) -> SpeechRow:
    from bot.replay import replay

    starts = {(n, text): t for n, lines in TRACKS.items() for t, text in lines}
    with tempfile.TemporaryDirectory() as folder:
        tracks = []
        for name, lines in TRACKS.items():
            mono = (speech_track(lines, RATE, 60.0) * 16000).astype(np.int16)
            path = os.path.join(folder, f"{name}.wav")
            soundfile.write(path, mono, RATE)
            tracks.append(open_track(path, name))
        async with FakeSttServer(KEY) as server:
            result = await replay(tracks, _config(server.url, tail_ms), speed=REPLAY_SPEED)
            sent = server.total_audio_bytes / 2 / RATE
    errors = [abs(s.start - starts[(s.speaker, s.text)]) for s in result.segments
              if (s.speaker, s.text) in starts]
    return SpeechRow("replay: 2 x 60 s tracks, pauses 5-14 s", _label(tail_ms),
                     sum(utterance_duration(t) for _, t in starts), sent,
                     len(result.segments), len(starts), max(errors) if errors else None)


async def _live(tail_ms: int | None) -> SpeechRow:
    from bot.sim.simulate import DEMO_SCRIPT, demo_speakers, simulate

    async with FakeSttServer(KEY) as server:
        await simulate(demo_speakers(), _config(server.url, tail_ms))
        sent = server.total_audio_bytes / 2 / RATE
        committed = len(server.committed_texts)
    texts = [t for lines in DEMO_SCRIPT.values() for _, t in lines]
    return SpeechRow("live: cantobot demo meeting (2 members)", _label(tail_ms),
                     sum(utterance_duration(t) for t in texts), sent, committed, len(texts), None)


def _label(tail_ms: int | None) -> str:
    return "off (every sample)" if tail_ms == 0 else "on (default tail)"


def row_speech(live: bool = True) -> list[SpeechRow]:
    """Before (gating off) and after (the default), for the replay and, if asked, live."""
    rows = []
    for tail in (0, None):
        rows.append(asyncio.run(_replay(tail)))
        if live:
            rows.append(asyncio.run(_live(tail)))
    return sorted(rows, key=lambda r: (r.source, r.gating != "off (every sample)"))
