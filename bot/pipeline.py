"""The speech pipeline: per-speaker PCM -> mono PCM at the STT rate -> chunks -> STT session.

This is the seam shared by `cantobot replay` (recorded tracks) and the Discord voice receiver
(decoded Opus): both hand each speaker's audio to a :class:`SpeakerStream`, and a
:class:`Transcriber` owns every stream of one meeting and fans the STT events out to one
callback. Audio conversion is pure (``bot.audio.convert``); the network lives in
``bot.stt.session``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

from bot.audio.convert import Chunker, StreamConverter
from bot.config import SttConfig
from bot.stt.session import SttEvent, SttSession, SttState

log = logging.getLogger(__name__)

EventCallback = Callable[[SttEvent], None]


@dataclass(frozen=True, slots=True)
class StreamInfo:
    speaker: str
    speaker_id: int | None
    state: SttState
    seconds_sent: float
    reconnects: int


class SpeakerStream:
    """One speaker's audio on its way to one STT session.

    ``feed`` never blocks: conversion is a few microseconds of numpy per 20 ms and the session
    queues what it cannot send yet (bounded, see ``stt.max_buffer_seconds``).
    """

    def __init__(
        self,
        *,
        speaker: str,
        config: SttConfig,
        on_event: EventCallback,
        in_rate: int,
        in_channels: int = 1,
        speaker_id: int | None = None,
        stream_offset: float = 0.0,
    ) -> None:
        self.speaker = speaker
        self.speaker_id = speaker_id
        self.sample_rate = config.sample_rate
        self._converter = StreamConverter(in_rate, in_channels, config.sample_rate)
        self._chunker = Chunker(config.sample_rate, config.chunk_ms)
        self._samples_fed = 0
        self._finished = False
        self.session = SttSession(
            url=config.url,
            api_key=config.api_key.reveal(),
            sample_rate=config.sample_rate,
            speaker=speaker,
            on_event=on_event,
            speaker_id=speaker_id,
            stream_offset=stream_offset,
            connect_timeout=config.connect_timeout,
            start_timeout=config.start_timeout,
            stop_timeout=config.stop_timeout,
            max_buffer_seconds=config.max_buffer_seconds,
            reconnect_initial_delay=config.reconnect_initial_delay,
            reconnect_max_delay=config.reconnect_max_delay,
        )

    async def start(self) -> None:
        await self.session.start()

    def feed(self, pcm: np.ndarray | bytes) -> None:
        """Audio of this speaker at the stream's input rate and channel count."""
        if self._finished:
            raise RuntimeError(f"stream of {self.speaker} already finished")
        mono = self._converter.process(pcm)
        self._send(mono)

    def feed_converted(self, mono: np.ndarray) -> None:
        """Mono int16 already at the STT rate (the voice receiver decodes straight to it)."""
        if self._finished:
            raise RuntimeError(f"stream of {self.speaker} already finished")
        self._send(mono)

    def _send(self, mono: np.ndarray) -> None:
        self._samples_fed += len(mono)
        for chunk in self._chunker.push(mono):
            self.session.send_audio(chunk)

    @property
    def seconds_fed(self) -> float:
        return self._samples_fed / self.sample_rate

    async def finish(self) -> None:
        """Send the tail, stop the session and wait (bounded) for its last commits."""
        if self._finished:
            return
        self._finished = True
        tail = self._converter.flush()
        if len(tail):
            self._send(tail)
        rest = self._chunker.flush()
        if rest:
            self.session.send_audio(rest)
        await self.session.stop()

    async def aclose(self) -> None:
        self._finished = True
        await self.session.aclose()

    def info(self) -> StreamInfo:
        return StreamInfo(
            speaker=self.speaker,
            speaker_id=self.speaker_id,
            state=self.session.state,
            seconds_sent=self.seconds_fed,
            reconnects=self.session.stats.reconnects,
        )


class Transcriber:
    """Owns the speaker streams of one meeting, keyed by whatever identifies a speaker.

    Streams are opened lazily and closed on idle or at the end; :meth:`aclose` stops every
    session (stop-session, bounded wait for the last commits) concurrently, so shutdown flushes
    everyone at once rather than one after another.
    """

    def __init__(self, config: SttConfig, on_event: EventCallback) -> None:
        self._config = config
        self._on_event = on_event
        self._streams: dict[Hashable, SpeakerStream] = {}
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def config(self) -> SttConfig:
        return self._config

    def get(self, key: Hashable) -> SpeakerStream | None:
        return self._streams.get(key)

    def streams(self) -> list[SpeakerStream]:
        return list(self._streams.values())

    def open(
        self,
        key: Hashable,
        *,
        speaker: str,
        in_rate: int,
        in_channels: int = 1,
        speaker_id: int | None = None,
        stream_offset: float = 0.0,
    ) -> SpeakerStream:
        """Create a stream (not yet started); the caller awaits ``stream.start()``."""
        if key in self._streams:
            raise KeyError(f"stream {key!r} already open")
        stream = SpeakerStream(
            speaker=speaker,
            config=self._config,
            on_event=self._on_event,
            in_rate=in_rate,
            in_channels=in_channels,
            speaker_id=speaker_id,
            stream_offset=stream_offset,
        )
        self._streams[key] = stream
        log.info("speaker %s: stream opened", speaker)
        return stream

    async def finish(self, key: Hashable) -> None:
        stream = self._streams.pop(key, None)
        if stream is not None:
            await stream.finish()
            log.info("speaker %s: stream finished (%.1f s of audio)", stream.speaker,
                     stream.seconds_fed)

    def finish_in_background(self, key: Hashable) -> None:
        """Stop one stream without making the caller wait; :meth:`aclose` awaits it."""
        if key not in self._streams:
            return
        task = asyncio.create_task(self.finish(key), name=f"finish-stream-{key}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def finish_all(self) -> None:
        keys = list(self._streams)
        await asyncio.gather(*(self.finish(k) for k in keys), return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def aclose(self) -> None:
        """Immediate close (no flush) of whatever is left; idempotent."""
        streams = list(self._streams.values())
        self._streams.clear()
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        for task in list(self._closing):
            task.cancel()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
