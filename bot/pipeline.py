"""The speech pipeline: per-speaker PCM -> mono PCM at the STT rate -> chunks -> STT session.

This is the seam shared by `cantobot replay` (recorded tracks) and the Discord voice receiver
(decoded Opus): both hand each speaker's audio to a :class:`SpeakerStream`, and a
:class:`Transcriber` owns every stream of one meeting and fans the STT events out to one
callback. Audio conversion is pure (``bot.audio.convert``); the network lives in
``bot.stt.session``.

Capacity: :class:`SessionSlots` caps the STT sessions open at once (``stt.max_sessions``; the bot
shares one per process across its meetings). A speaker past the cap waits for a slot in arrival
order, their audio kept by the session (up to ``stt.max_buffer_seconds``) and sent when the slot
comes, so one process never falls behind real time for everyone; slots free as speakers pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import numpy as np

from bot.audio.convert import Chunker, StreamConverter
from bot.backoff import Backoff
from bot.config import SttConfig
from bot.stt.core import PERMANENT_ERRORS
from bot.stt.events import SpeakerKey, StateChanged
from bot.stt.session import StartGate, SttEvent, SttSession, SttState

log = logging.getLogger(__name__)

EventCallback = Callable[[SttEvent], None]
#: Told when a speaker must wait for a session slot: (the stream, its place in the queue, 1-based).
WaitCallback = Callable[["SpeakerStream", int], None]


class SessionSlots:
    """At most ``limit`` sessions at once; waiters are served strictly in arrival order."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"session limit must be >= 1, got {limit}")
        self.limit = limit
        self._used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_use(self) -> int:
        return self._used

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def would_wait(self) -> bool:
        return self._used >= self.limit or bool(self._waiters)

    async def acquire(self) -> None:
        """Take a slot, waiting behind earlier callers; cancellation gives up the place."""
        if not self.would_wait():
            self._used += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back: straight to the longest waiter, if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; the count stays
                return
        if self._used <= 0:
            raise RuntimeError("release() without a slot held")
        self._used -= 1


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
        slots: SessionSlots | None = None,
        on_wait: WaitCallback | None = None,
        key: SpeakerKey | None = None,
        gate: StartGate | None = None,
        line_numbers: Iterator[int] | None = None,
    ) -> None:
        self.speaker = speaker
        self.speaker_id = speaker_id
        self.sample_rate = config.sample_rate
        self._slots = slots
        self._on_wait = on_wait
        self._holds_slot = False
        self._acquiring: asyncio.Task[None] | None = None
        self._start_done = asyncio.Event()
        self._start_called = False
        self._closed = False
        self._converter = StreamConverter(in_rate, in_channels, config.sample_rate)
        self._chunker = Chunker(config.sample_rate, config.chunk_ms)
        self._samples_fed = 0
        self._finished = False
        self._gate = gate
        self._owner_on_event = on_event
        self.session = SttSession(
            url=config.url,
            api_key=config.api_key.reveal(),
            sample_rate=config.sample_rate,
            speaker=speaker,
            on_event=self._on_event,
            speaker_id=speaker_id,
            stream_offset=stream_offset,
            connect_timeout=config.connect_timeout,
            start_timeout=config.start_timeout,
            stop_timeout=config.stop_timeout,
            max_buffer_seconds=config.max_buffer_seconds,
            reconnect_initial_delay=config.reconnect_initial_delay,
            reconnect_max_delay=config.reconnect_max_delay,
            key=key,
            line_numbers=line_numbers,
            silence_tail_s=config.silence_tail_ms / 1000 or None,
        )

    def _on_event(self, event: SttEvent) -> None:
        # A session that failed for good (quota, terms, key) closes the gate for the others.
        if (isinstance(event, StateChanged) and event.state is SttState.FAILED
                and getattr(event.error, "upstream_code", None) in PERMANENT_ERRORS
                and event.error is not None and self._gate is not None):
            self._gate.refuse(event.error)
        self._owner_on_event(event)

    @property
    def waiting_for_slot(self) -> bool:
        return self._acquiring is not None and not self._acquiring.done()

    async def start(self) -> None:
        """Take a session slot (waiting in turn when all are busy), then start the session."""
        self._start_called = True
        try:
            if self._slots is not None and not self._holds_slot:  # a retry keeps its slot
                if self._slots.would_wait() and self._on_wait is not None:
                    self._on_wait(self, self._slots.waiting + 1)
                self._acquiring = asyncio.ensure_future(self._slots.acquire())
                try:
                    await self._acquiring
                except asyncio.CancelledError:
                    if self._closed:
                        return  # closed while waiting: nothing to start
                    raise
                self._holds_slot = True
                if self._closed:
                    self._release_slot()
                    return
                log.debug("speaker %s: got a session slot", self.speaker)
            await self.session.start()
        finally:
            self._start_done.set()

    async def keep_starting(self) -> None:
        """:meth:`start`, a failed first start retried through the gate (see
        :class:`~bot.stt.session.StartGate`) until it works or the stream is finished."""
        if self._gate is None:
            raise RuntimeError("keep_starting() needs a StartGate (Transcriber.open gives one)")
        await self._gate.keep_starting(self.start, self._startable, self.speaker)

    def _startable(self) -> bool:
        return not self._finished and self.session.startable()

    def _release_slot(self) -> None:
        if self._holds_slot and self._slots is not None:
            self._holds_slot = False
            self._slots.release()

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

    async def finish(self, within: float | None = None) -> None:
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
        if self._start_called:
            await self._start_done.wait()  # a speaker waiting for a slot keeps their turn
        try:
            await self.session.stop(within)
        finally:
            self._release_slot()

    def discard(self) -> None:
        """Drop everything of this speaker now, unsent (an opt-out); :meth:`aclose` follows."""
        self._finished = True
        self._closed = True
        self.session.discard()

    async def aclose(self) -> None:
        """Close now (no flush); a wait for a slot is given up."""
        self._finished = True
        self._closed = True
        if self._acquiring is not None and not self._acquiring.done():
            self._acquiring.cancel()
        try:
            await self.session.aclose()
        finally:
            self._release_slot()

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

    def __init__(
        self,
        config: SttConfig,
        on_event: EventCallback,
        *,
        slots: SessionSlots | None = None,
        on_wait: WaitCallback | None = None,
    ) -> None:
        self._config = config
        self._on_event = on_event
        #: Shared with other transcribers of the process when given, else this one's own.
        self.slots = slots if slots is not None else SessionSlots(config.max_sessions)
        self._on_wait = on_wait
        self._streams: dict[Hashable, SpeakerStream] = {}
        self._closing: set[asyncio.Task[None]] = set()
        #: Failed first starts of this transcriber's streams share one backoff.
        self.start_gate = StartGate(Backoff(config.reconnect_initial_delay,
                                            config.reconnect_max_delay))
        #: One line counter for every stream: a speaker's LineRefs stay unique across pauses.
        self._line_numbers = itertools.count(1)
        #: Streams finishing in the background (went quiet), by key, until they are done.
        self._finishing: dict[Hashable, SpeakerStream] = {}

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
            slots=self.slots,
            on_wait=self._on_wait,
            key=key if isinstance(key, int | str) else None,
            gate=self.start_gate,
            line_numbers=self._line_numbers,
        )
        self._streams[key] = stream
        log.info("speaker %s: stream opened", speaker)
        return stream

    async def finish(self, key: Hashable, within: float | None = None) -> None:
        stream = self._streams.pop(key, None)
        if stream is not None:
            await self._finish_stream(stream, within)

    async def _finish_stream(self, stream: SpeakerStream, within: float | None) -> None:
        try:
            await stream.finish(within)
        except asyncio.CancelledError:
            await stream.aclose()  # cut short by aclose(): release the connection
            raise
        else:
            log.info("speaker %s: stream finished (%.1f s of audio)", stream.speaker,
                     stream.seconds_fed)

    async def discard(self, key: Hashable) -> None:
        """Drop one stream without flushing: nothing more of it is sent (an opt-out)."""
        stream = self._streams.pop(key, None)
        if stream is not None:
            await stream.aclose()
            log.info("speaker %s: stream discarded", stream.speaker)

    def drop(self, key: Hashable) -> None:
        """An opt-out: whatever of ``key`` is open or still finishing is discarded at once,
        unsent, its late results ignored; the connections close in the background."""
        streams = [s for s in (self._streams.pop(key, None), self._finishing.pop(key, None))
                   if s is not None]
        for stream in streams:
            stream.discard()
            task = asyncio.create_task(stream.aclose(), name=f"drop-stream-{key}")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            log.info("speaker %s: stream dropped unsent", stream.speaker)

    def finish_in_background(self, key: Hashable, within: float | None = None) -> None:
        """Stop one stream without making the caller wait; :meth:`finish_all` awaits it
        (at most the session's stop timeout more), :meth:`aclose` cuts it short.

        ``within`` may be long for a speaker who simply went quiet: if the STT service is down
        at that moment, their unconfirmed audio is kept for it to come back.
        """
        stream = self._streams.pop(key, None)
        if stream is None:
            return
        task = asyncio.create_task(self._finish_stream(stream, within),
                                   name=f"finish-stream-{key}")
        self._closing.add(task)
        self._finishing[key] = stream

        def done(task: asyncio.Task[None]) -> None:
            self._closing.discard(task)
            if self._finishing.get(key) is stream:
                del self._finishing[key]

        task.add_done_callback(done)

    async def finish_all(self) -> None:
        keys = list(self._streams)
        await asyncio.gather(*(self.finish(k) for k in keys), return_exceptions=True)
        if self._closing:
            # Streams finishing in the background (idle speakers) get the normal stop bound.
            await asyncio.wait(set(self._closing), timeout=self._config.stop_timeout)

    async def aclose(self) -> None:
        """Immediate close (no flush) of whatever is left; idempotent."""
        streams = list(self._streams.values())
        self._streams.clear()
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        for task in list(self._closing):
            task.cancel()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
