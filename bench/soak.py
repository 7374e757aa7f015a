"""Soak: a long meeting replayed faster than real time through the receive and STT pipeline.

    python -m bench.soak [--minutes 60] [--speakers 5]

Each speaker talks without end (sentence after sentence, short pauses, never idle): real Opus
frames in encrypted RTP go through :class:`~bot.voice.receiver.VoiceReceiver` (decrypt, jitter,
decode) into a :class:`~bot.pipeline.Transcriber` whose real :class:`~bot.stt.session.SttSession`
per speaker streams to the loopback cantonese.ai fake. Discord itself is left out (its fake
paces media in real time); the clock is simulated, so an hour takes minutes. Printed: RSS and
asyncio task count at start and end, the largest unconfirmed STT buffer seen, and whether every
sentence said was committed exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import resource
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from bot.config import SttConfig
from bot.pipeline import Transcriber
from bot.sim.sender import OpusEncoder, audio_level_extension, build_rtp_header
from bot.sim.stt_server import FakeSttServer
from bot.sim.tonecode import speech_track, utterance_duration
from bot.stt.session import SegmentCommitted, SttEvent
from bot.voice.crypto import TransportCipher
from bot.voice.receiver import FRAME_SAMPLES_48K, VoiceReceiver

log = logging.getLogger(__name__)

MODE = "aead_aes256_gcm_rtpsize"
KEY = "soak-key"
FRAME_S = 0.020
#: The receiver's clock runs every this many frames (the bot ticks every 50 ms).
TICK_EVERY = 3
#: Producer backpressure: at most this much audio unsent per session (seconds).
MAX_AHEAD_S = 2.0
#: ... and at most this much sent but not yet confirmed by a commit (a real upstream keeps pace
#: with real time; here the producer would outrun the fake's decoder without it).
MAX_UNCONFIRMED_S = 8.0
#: Pause after each sentence: long enough for a commit (the fake needs 0.3 s), short enough
#: that nobody ever goes idle.
PAUSE_S = 0.45
SENTENCES = ("早晨", "開會", "預算", "收到", "明白", "下一項", "好的", "散會")


@dataclass
class SoakResult:
    minutes: float
    speakers: int
    wall_seconds: float
    rss_start_mb: float
    rss_end_mb: float
    tasks_start: int
    tasks_end: int
    bot_tasks_start: int
    bot_tasks_peak: int
    bot_tasks_end: int
    expected_lines: int
    committed_lines: int
    missing: int
    doubled: int
    max_unconfirmed_s: float
    dropped_s: float
    packets: int

    @property
    def ok(self) -> bool:
        return (self.missing == 0 and self.doubled == 0 and self.dropped_s == 0
                and self.bot_tasks_end == self.bot_tasks_start)

    def report(self) -> str:
        return (
            f"soak: {self.minutes:g} min x {self.speakers} speakers ({self.packets} packets) in "
            f"{self.wall_seconds:.1f} s wall\n"
            f"  RSS   {self.rss_start_mb:.1f} MB -> {self.rss_end_mb:.1f} MB\n"
            f"  tasks {self.tasks_start} -> {self.tasks_end} (bot's own: {self.bot_tasks_start}, "
            f"peak {self.bot_tasks_peak}, end {self.bot_tasks_end}; the rest are the fake "
            f"server's Engine.IO pingers, which end at their next ping)\n"
            f"  lines {self.committed_lines}/{self.expected_lines} committed, "
            f"{self.missing} missing, {self.doubled} doubled\n"
            f"  largest unconfirmed STT buffer {self.max_unconfirmed_s:.2f} s, "
            f"dropped {self.dropped_s:.2f} s\n"
            f"  {'OK' if self.ok else 'FAILED'}"
        )


def bot_tasks() -> list[asyncio.Task[object]]:
    """Live tasks running cantobot code or the client libraries it drives (not the fake)."""
    def ours(task: asyncio.Task[object]) -> bool:
        code = getattr(task.get_coro(), "cr_code", None)
        name = code.co_filename if code is not None else ""
        return "/bot/" in name and "/bot/sim/" not in name or "socketio" in name and (
            "client" in name)
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and ours(t)]


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: peak instead of current
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Speaker:
    """One member: a cycle of sentences pre-encoded once, sent as RTP for ever."""

    def __init__(self, index: int, cipher: TransportCipher) -> None:
        self.user_id = 1000 + index
        self.ssrc = 5000 + index
        self.cipher = cipher
        # Each speaker starts the cycle at a different sentence, so streams differ.
        self.texts = [SENTENCES[(index + i) % len(SENTENCES)] for i in range(len(SENTENCES))]
        lines, t = [], PAUSE_S
        for text in self.texts:
            lines.append((t, text))
            t += utterance_duration(text) + PAUSE_S
        mono = speech_track(lines, 48000, duration=t)
        pcm = np.clip(mono * 32767 * 0.5, -32768, 32767).astype(np.int16)
        stereo = np.ascontiguousarray(np.repeat(pcm[:, None], 2, axis=1))
        pad = (-len(stereo)) % FRAME_SAMPLES_48K
        stereo = np.concatenate([stereo, np.zeros((pad, 2), np.int16)])
        with OpusEncoder(48000, 2) as enc:
            self.frames = [enc.encode(np.ascontiguousarray(stereo[i:i + FRAME_SAMPLES_48K]))
                           for i in range(0, len(stereo), FRAME_SAMPLES_48K)]
        self.cycle_seconds = len(self.frames) * FRAME_S
        self.seq = self.nonce = 0

    def packet(self, step: int) -> bytes:
        frame = self.frames[step % len(self.frames)]
        header, ext = build_rtp_header(self.seq & 0xFFFF, (step * FRAME_SAMPLES_48K) & 0xFFFFFFFF,
                                       self.ssrc, extension=audio_level_extension(30))
        data = self.cipher.encrypt(header, ext, frame, self.nonce & 0xFFFFFFFF)
        self.seq += 1
        self.nonce += 1
        return data

    def expected(self, steps: int) -> Counter[str]:
        """Sentences completely said (and followed by their pause) within ``steps`` frames."""
        out: Counter[str] = Counter()
        full, rest = divmod(steps, len(self.frames))
        for text in self.texts:
            out[text] += full
        t = PAUSE_S
        for text in self.texts:
            t += utterance_duration(text)
            if t / FRAME_S <= rest:  # fully said: stop-session commits it even unpaused
                out[text] += 1
            t += PAUSE_S
        return out


async def run_soak(minutes: float = 60.0, speakers: int = 5, sample_rate: int = 16000,
                   max_buffer_seconds: float = 120.0) -> SoakResult:
    """Replay ``minutes`` of a meeting of ``speakers`` endless talkers; see the module doc."""
    cipher = TransportCipher(MODE, bytes(range(32)))
    people = [_Speaker(i, cipher) for i in range(speakers)]
    # Whole cycles (every speaker's cycle has the same sentences, so the same length): the
    # replay never ends mid-sentence, and each sentence is expected an exact number of times.
    cycle = len(people[0].frames)
    steps = max(1, round(minutes * 60 / FRAME_S / cycle)) * cycle
    committed: dict[str, Counter[str]] = {}
    gc.collect()
    rss_start, tasks_start = rss_mb(), len(asyncio.all_tasks())
    bot_tasks_start = len(bot_tasks())
    bot_tasks_peak = 0
    began = time.perf_counter()
    async with FakeSttServer(api_key=KEY) as server:
        config = SttConfig(url=server.url, sample_rate=sample_rate,
                           max_buffer_seconds=max_buffer_seconds)
        config = _with_key(config)

        def on_event(event: SttEvent) -> None:
            if isinstance(event, SegmentCommitted):
                committed.setdefault(event.segment.speaker, Counter())[event.segment.text] += 1

        transcriber = Transcriber(config, on_event)
        starts: list[asyncio.Task[None]] = []

        def on_audio(user_id: int, pcm: np.ndarray) -> None:
            stream = transcriber.get(user_id)
            if stream is None:
                stream = transcriber.open(user_id, speaker=f"speaker-{user_id}",
                                          speaker_id=user_id, in_rate=receiver.output_rate)
                starts.append(asyncio.create_task(stream.start(), name=f"start-{user_id}"))
            stream.feed_converted(pcm)

        receiver = VoiceReceiver(sample_rate=sample_rate, on_audio=on_audio,
                                 on_idle=transcriber.finish_in_background,
                                 is_ignored=lambda uid: False)
        receiver.set_transport(MODE, bytes(range(32)))
        for p in people:
            receiver.on_speaking(p.user_id, p.ssrc, 0.0)
        max_unconfirmed = 0
        for step in range(steps):
            now = step * FRAME_S
            for p in people:
                receiver.handle_packet(p.packet(step), now)
            if step % TICK_EVERY == 0:
                receiver.tick(now)
            if step % 50 == 0:  # once a simulated second: backpressure and bookkeeping
                await asyncio.gather(*starts)
                streams = transcriber.streams()
                await asyncio.gather(*(s.session.drain(MAX_AHEAD_S) for s in streams))
                # The figure this soak exists to watch.
                unconfirmed = max((s.session.unconfirmed_samples for s in streams), default=0)
                max_unconfirmed = max(max_unconfirmed, unconfirmed)
                bot_tasks_peak = max(bot_tasks_peak, len(bot_tasks()))
                # Faster than real time, the fake decodes behind us: wait for its commits
                # rather than let the unconfirmed audio pile up towards its bound.
                while unconfirmed > MAX_UNCONFIRMED_S * sample_rate:
                    await asyncio.sleep(0.005)
                    unconfirmed = max(s.session.unconfirmed_samples for s in streams)
        receiver.tick(steps * FRAME_S + 0.2)
        dropped = sum(s.session.stats.dropped_seconds for s in transcriber.streams())
        await transcriber.finish_all()
        await transcriber.aclose()
        await asyncio.sleep(0.1)  # let closed clients' background tasks end
        bot_tasks_end = len(bot_tasks())
    gc.collect()
    wall = time.perf_counter() - began
    missing = doubled = expected_total = 0
    for p in people:
        want = p.expected(steps)
        got = committed.get(f"speaker-{p.user_id}", Counter())
        expected_total += sum(want.values())
        for text in set(want) | set(got):
            missing += max(0, want[text] - got[text])
            doubled += max(0, got[text] - want[text])
    return SoakResult(
        minutes=steps * FRAME_S / 60, speakers=speakers, wall_seconds=wall,
        rss_start_mb=rss_start, rss_end_mb=rss_mb(),
        tasks_start=tasks_start, tasks_end=len(asyncio.all_tasks()),
        bot_tasks_start=bot_tasks_start, bot_tasks_peak=bot_tasks_peak,
        bot_tasks_end=bot_tasks_end,
        expected_lines=expected_total, committed_lines=sum(sum(c.values())
                                                           for c in committed.values()),
        missing=missing, doubled=doubled,
        max_unconfirmed_s=max_unconfirmed / sample_rate, dropped_s=dropped,
        packets=steps * speakers,
    )


def _with_key(config: SttConfig) -> SttConfig:
    from dataclasses import replace

    from bot.config import Secret

    return replace(config, api_key=Secret(KEY))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--speakers", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(run_soak(args.minutes, args.speakers))
    print(result.report())
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
