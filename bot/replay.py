"""`cantobot replay`: transcribe recorded per-speaker tracks through the real STT pipeline.

Every speaker streams concurrently over its own STT connection, paced at real time x speed,
through the same :class:`~bot.pipeline.Transcriber` the Discord receiver feeds. Committed lines
go to stdout as they arrive (human lines, or JSON lines with ``--jsonl``); a progress bar goes to
stderr on a terminal; ``--minutes DIR`` writes Markdown, SRT, WebVTT and JSON.

Tracks are decoded as they are sent (:class:`~bot.audio.files.TrackSource`), so memory stays
flat however long the recording. SIGINT and SIGTERM stop the same way: feeding stops, every
session gets stop-session and its last commits are awaited (bounded by the stop timeout), the
lines committed so far are printed and written, and the exit code is 128 + the signal number.
A second signal gives up waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

from bot.audio.files import TrackSource, find_tracks, open_track
from bot.config import Config
from bot.errors import AudioInputError, CantobotError, SttAuthError, SttUnavailable
from bot.pipeline import SpeakerStream, Transcriber
from bot.stt.session import (
    LineRef,
    SegmentCommitted,
    SegmentTimestamped,
    StateChanged,
    SttEvent,
    SttState,
)
from bot.transcript.format import format_timestamp
from bot.transcript.minutes import write_minutes
from bot.transcript.model import Minutes, Segment

log = logging.getLogger(__name__)

#: Audio is handed to the pipeline in 20 ms blocks, as Discord delivers it.
BLOCK_MS = 20
#: With --speed 0, feed at most this much audio ahead of what the session has sent.
MAX_AHEAD_SECONDS = 2.0


@dataclass
class ReplayResult:
    """What a replay produced, in commit order (timestamped twins replace their plain line)."""

    segments: list[Segment] = field(default_factory=list)
    #: Sessions that did not close cleanly, with the last error each one saw.
    errors: list[CantobotError] = field(default_factory=list)
    #: Set when a stop request (SIGINT/SIGTERM) cut the replay short.
    interrupted: bool = False

    #: Where each committed line is in ``segments``, by the ref its session gave it.
    _at: dict[LineRef, int] = field(default_factory=dict, repr=False)

    def add(self, ref: LineRef, segment: Segment) -> None:
        self._at[ref] = len(self.segments)
        self.segments.append(segment)

    def amend(self, ref: LineRef, segment: Segment) -> None:
        """The timestamped twin of line ``ref`` replaces it (found by identity, never by its
        text: a speaker may say the same thing twice)."""
        i = self._at.get(ref)
        if i is None:  # not a line of ours (a session gives each ref once): keep the words
            self._at[ref] = len(self.segments)
            self.segments.append(segment)
        else:
            self.segments[i] = segment


def collect_tracks(speakers: list[tuple[str, str]], tracks: list[str]) -> list[TrackSource]:
    """Probe every input up front (format, channels, length) so a bad file fails before any
    connection is made; nothing is decoded yet."""
    result: list[TrackSource] = []
    for name, path in speakers:
        result.append(open_track(path, name))
    for path in tracks:
        result.extend(find_tracks(path))
    if not result:
        raise AudioInputError("nothing to replay: give --speaker NAME=FILE or --tracks PATH")
    seen: set[str] = set()
    for name in (t.name for t in result):
        if name in seen:
            raise AudioInputError(f"speaker name {name!r} is given twice; names must be unique")
        seen.add(name)
    return result


class Output:
    """Prints committed lines as they arrive; stdout carries nothing else."""

    def __init__(self, *, jsonl: bool, stream: TextIO) -> None:
        self.jsonl = jsonl
        self.stream = stream

    def line(self, segment: Segment) -> None:
        if self.jsonl:
            record = {
                "speaker": segment.speaker,
                "text": segment.text,
                "start": round(segment.start, 3),
                "end": round(segment.end, 3),
            }
            self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            self.stream.write(f"[{format_timestamp(segment.start)}] {segment.speaker}: "
                              f"{segment.text}\n")
        self.stream.flush()


class Progress:
    """A one-line progress bar on stderr, only on a terminal."""

    WIDTH = 30

    def __init__(self, total_seconds: float, enabled: bool) -> None:
        self.total = max(total_seconds, 1e-9)
        self.enabled = enabled
        self._last = -1

    def update(self, sent_seconds: float) -> None:
        if not self.enabled:
            return
        filled = int(self.WIDTH * min(sent_seconds / self.total, 1.0))
        if filled == self._last:
            return
        self._last = filled
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        sys.stderr.write(f"\r[{bar}] {format_timestamp(sent_seconds)} / "
                         f"{format_timestamp(self.total)} sent")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self._last >= 0:
            sys.stderr.write("\n")
            sys.stderr.flush()


#: Frames decoded from a track at a time (then fed in BLOCK_MS pieces): about a second.
READ_BLOCKS = 50


async def _pace(stream: SpeakerStream, track: TrackSource, speed: float,
                progress: Callable[[str, float], None]) -> None:
    block = max(1, track.sample_rate * BLOCK_MS // 1000)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    i = fed = 0
    for samples in track.blocks(block * READ_BLOCKS):
        if speed <= 0:  # as fast as the session sends: no need to cut the block up
            stream.feed(samples)
            fed += len(samples)
            progress(stream.speaker, fed / track.sample_rate)
            await stream.session.drain(MAX_AHEAD_SECONDS)  # also lets the server be read
            continue
        for begin in range(0, len(samples), block):
            piece = samples[begin:begin + block]
            stream.feed(piece)
            fed += len(piece)
            i += 1
            progress(stream.speaker, fed / track.sample_rate)
            delay = t0 + i * (BLOCK_MS / 1000) / speed - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)


async def replay(
    clips: list[TrackSource],
    config: Config,
    *,
    speed: float = 1.0,
    output: Output | None = None,
    show_progress: bool = False,
    stop: asyncio.Event | None = None,
) -> ReplayResult:
    """Stream every track concurrently and return what was committed.

    Setting ``stop`` ends feeding early; the sessions are then stopped exactly as at the end
    of the audio (stop-session, last commits awaited) and ``interrupted`` is set.
    """
    result = ReplayResult()
    last_error: dict[str, CantobotError] = {}

    def on_event(event: SttEvent) -> None:
        if isinstance(event, SegmentCommitted):
            result.add(event.ref, event.segment)
            if output is not None:
                output.line(event.segment)
        elif isinstance(event, SegmentTimestamped):
            result.amend(event.ref, event.segment)
        elif isinstance(event, StateChanged) and event.error is not None:
            # Transient errors recovered by a reconnect do not fail the replay; only a session
            # that ends anywhere but CLOSED does, reported with the last error it saw.
            last_error[event.speaker] = event.error

    transcriber = Transcriber(config.stt, on_event)
    total = max(clip.duration for clip in clips)
    progress = Progress(total, show_progress)
    sent: dict[str, float] = {}

    def on_progress(speaker: str, seconds: float) -> None:
        sent[speaker] = seconds
        progress.update(min(sent.values()) if len(sent) == len(clips) else 0.0)

    streams = [
        transcriber.open(clip.name, speaker=clip.name, in_rate=clip.sample_rate,
                         in_channels=clip.channels)
        for clip in clips
    ]
    stop = stop or asyncio.Event()
    try:
        await _until_stopped(_start_all(streams), stop)
        if not stop.is_set():
            await _until_stopped(asyncio.gather(*(
                _pace(stream, clip, speed, on_progress)
                for stream, clip in zip(streams, clips, strict=True)
            )), stop)
        result.interrupted = stop.is_set()
        await transcriber.finish_all()
    finally:
        progress.done()
        await transcriber.aclose()
    result.errors.extend(_unclean(streams, last_error))
    result.segments.sort(key=lambda s: (s.start, s.speaker))
    return result


def _unclean(streams: list[SpeakerStream], last_error: dict[str, CantobotError],
             ) -> list[CantobotError]:
    """One error per session that ended anywhere but CLOSED: the last it saw, else a plain
    "did not close cleanly"."""
    return [last_error.get(stream.speaker) or SttUnavailable(
                f"the STT session of {stream.speaker} did not close cleanly "
                f"({stream.session.state.name.lower()})")
            for stream in streams if stream.session.state is not SttState.CLOSED]


async def _start_all(streams: list[SpeakerStream]) -> None:
    starts = await asyncio.gather(*(s.start() for s in streams), return_exceptions=True)
    failures = [r for r in starts if isinstance(r, BaseException)]
    if failures:
        auth = [f for f in failures if isinstance(f, SttAuthError)]
        raise (auth or failures)[0]


async def _until_stopped(work: Awaitable[object], stop: asyncio.Event) -> None:
    """Await ``work`` unless ``stop`` is set first; then cancel it and return."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        cut = not task.done()
        if cut:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if not cut:
        task.result()  # the work's own error, if it failed before any stop


async def run_replay(args: argparse.Namespace, config: Config) -> int:
    """The CLI entry point; errors propagate as CantobotError (one line, exit 1).

    SIGINT and SIGTERM both stop the replay cleanly (see the module doc); a second one gives
    up waiting for the sessions.
    """
    config.require_stt_key()
    clips = collect_tracks(args.speaker, args.tracks)
    started = datetime.now(UTC)
    output = Output(jsonl=args.jsonl, stream=sys.stdout)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[signal.Signals] = []
    main = asyncio.current_task()

    def on_signal(sig: signal.Signals) -> None:
        if received and main is not None:
            log.warning("%s again: not waiting for the STT sessions any longer", sig.name)
            main.cancel()
            return
        received.append(sig)
        log.warning("%s: stopping every STT session and keeping what was committed", sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        result = await replay(
            clips, config, speed=args.speed, output=output,
            show_progress=(not args.jsonl) and sys.stderr.isatty(), stop=stop,
        )
    except asyncio.CancelledError:
        if received:
            return 128 + received[0].value
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if args.minutes:
        minutes = Minutes(
            title="Replay of " + ", ".join(clip.name for clip in clips),
            started_at=started,
            ended_at=datetime.now(UTC),
            segments=tuple(result.segments),
        )
        paths = write_minutes(minutes, args.minutes)
        log.info("minutes written: %s", ", ".join(str(p) for p in paths))
    if received:
        log.warning("replay stopped by %s: %d line(s) committed and kept",
                    received[0].name, len(result.segments))
        return 128 + received[0].value
    if result.errors:
        raise result.errors[0]
    return 0
