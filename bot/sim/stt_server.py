"""A loopback fake of the cantonese.ai real-time STT server, for tests and ``cantobot fake-stt``.

It is a real python-socketio ``AsyncServer`` on aiohttp, mounted at the documented path and
speaking the documented protocol (see :mod:`bot.stt.protocol`); instead of recognising speech it
decodes tone-coded text (:mod:`bot.sim.tonecode`), so tests can say exactly what was "said".

Behaviour, following the reference:

* the ``x-api-key`` header is checked before the Socket.IO handshake: a wrong or missing key
  answers HTTP 401 (an aiohttp middleware; python-socketio's own ``connect`` refusal would come
  *after* a successful HTTP handshake, as a Socket.IO CONNECT_ERROR, which is not what the API
  documents);
* ``start-session`` -> transcript ``session_started`` then ``session-started``;
* ``audio-chunk`` -> ``partial_transcript`` while an utterance is heard, and per utterance
  ``committed_transcript`` then ``committed_transcript_with_timestamps`` (the same sentence, as
  the upstream does; word times in seconds from the session start, ElevenLabs ``words`` shape);
* ``stop-session`` -> commit what is pending, then ``session-closed {code: 1000}``.

Events of one connection are handled in order (``async_handlers=False``), like one upstream
stream. Fault knobs (attributes, each fault fires once and then clears itself so a reconnecting
client can recover) let tests break things on purpose; :class:`SidRecord` keeps what was received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import socketio
from aiohttp import web

from bot.sim.tonecode import Partial, ToneDecoder, Utterance
from bot.stt import protocol as p

__all__ = ["FakeSttServer", "SidRecord", "serve_forever"]

log = logging.getLogger(__name__)

#: aiohttp waits this long for open connections at shutdown; a fake need not be graceful.
_SHUTDOWN_TIMEOUT_S = 0.5


@dataclass
class SidRecord:
    """What one Socket.IO connection (sid) sent and was told; kept after it disconnects."""

    sample_rates: list[int] = field(default_factory=list)  # one per start-session
    chunk_rates: set[int] = field(default_factory=set)
    chunks: int = 0
    audio_bytes: int = 0
    session_starts: int = 0
    session_stops: int = 0
    committed: list[str] = field(default_factory=list)
    partials: list[str] = field(default_factory=list)
    #: Sentences heard to their end marker (before their commit pause), in order.
    heard: list[str] = field(default_factory=list)
    disconnected: bool = False
    #: ``time.monotonic()`` at each audio chunk's arrival (same clock as the test's).
    chunk_times: list[float] = field(default_factory=list)
    #: The first 4 bytes of each chunk's audio, in arrival order (a test tags its chunks).
    chunk_heads: list[bytes] = field(default_factory=list)


@dataclass
class _Live:
    """Per-connection session state (gone when the connection is)."""

    decoder: ToneDecoder | None = None
    rate: int = 0
    chunks_in_session: int = 0
    samples_in_session: int = 0
    pending_seen: int = -1  # commits so far when the current pending sentence was first seen


class FakeSttServer:
    """Loopback cantonese.ai: ``async with FakeSttServer() as server: ... server.url ...``."""

    def __init__(self, api_key: str = "test-key", *, host: str = "127.0.0.1", port: int = 0,
                 ping_interval: float = 25.0, ping_timeout: float = 20.0):
        self.api_key = api_key
        self.host = host
        self.port = port
        #: Engine.IO heartbeat (python-engineio's defaults): a client that has not answered a
        #: ping within ``ping_timeout`` seconds of it is disconnected.
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        # What happened (for assertions).
        self.records: dict[str, SidRecord] = {}
        self.connection_attempts = 0  # every handshake request to the Socket.IO path
        self.rejected_attempts = 0  # ... of which answered 401
        # Fault knobs: each fires once, then resets to its "off" value.
        self.ignore_start_session = False
        self.start_session_error: str | None = None
        self.error_after_chunks: int | None = None
        self.close_after_chunks: int | None = None
        self.close_code = 1011
        self.drop_after_chunks: int | None = None
        self.drop_after_seconds: float | None = None  # of audio received in the session
        #: Upstream ``{"message_type": "error", "error": CODE}`` sent (as a transcript-message)
        #: after this many chunks of a session, then the session ends (fires once).
        self.upstream_error: str | None = None
        self.upstream_error_after_chunks = 1
        #: Persistent: every session ends with ``session_time_limit_exceeded`` once it has
        #: received this many seconds of audio (what was not committed is lost upstream).
        self.session_limit_seconds: float | None = None
        #: Sessions ended by that limit.
        self.session_limits_hit = 0
        # Output shape knobs (persistent).
        self.send_plain = True  # committed_transcript
        self.send_timestamps = True  # committed_transcript_with_timestamps
        self.timestamps_first = False  # the twin may arrive before the plain form
        #: Commits are decoded but held (not sent) until :meth:`release_commits` or a
        #: stop-session, like a recogniser that is slow to finalise.
        self.hold_commits = False
        self._held: list[tuple[str, Utterance]] = []
        # Decode tone codes only in the first this-many seconds of each session's audio (None:
        # all of it); later audio is counted, not decoded, so hours of it pass quickly.
        self.decode_seconds: float | None = None
        # Flood fault (fires once): the next utterance's commit is followed, back to back, by
        # this many more plain commits ("flood 00000", ...), as a runaway upstream might send.
        self.flood_commits = 0
        self.flood_seconds: float | None = None  # how long the last flood took to send
        # ... and the next partial is followed by this many more (fires once).
        self.flood_partials = 0
        self._runner: web.AppRunner | None = None
        self._sio: socketio.AsyncServer | None = None
        self._live: dict[str, _Live] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL for the client (``http://127.0.0.1:PORT``), valid once started."""
        if self.port == 0:
            raise RuntimeError("FakeSttServer.url is known only after start()")
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen (on :attr:`port`; 0 picks a free one that later restarts keep)."""
        if self._runner is not None:
            raise RuntimeError("FakeSttServer already started")
        self._sio = self._build_sio()
        app = web.Application(middlewares=[self._auth_middleware])
        self._sio.attach(app, socketio_path=p.SOCKETIO_PATH.strip("/"))
        runner = web.AppRunner(app, shutdown_timeout=_SHUTDOWN_TIMEOUT_S, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        self._runner = runner
        if self.port == 0:
            self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening and drop every connection (no Socket.IO goodbye); idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for sid in list(self._live):
            self._mark_gone(sid)
        await runner.cleanup()
        self._sio = None

    async def restart(self) -> None:
        """Go away and come back on the same port, as a redeployed server does."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> FakeSttServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- what tests read ---------------------------------------------------------------------

    @property
    def committed_texts(self) -> list[str]:
        """Every committed sentence, all connections, in connection order."""
        return [text for record in self.records.values() for text in record.committed]

    @property
    def heard_texts(self) -> list[str]:
        """Every sentence heard to its end, committed yet or not, across connections."""
        return [text for r in self.records.values() for text in r.heard]

    @property
    def total_audio_bytes(self) -> int:
        return sum(r.audio_bytes for r in self.records.values())

    async def emit_raw(self, event: str, payload: object = None) -> None:
        """Send any event with any payload to every client (to test malformed input)."""
        if self._sio is not None:
            for sid in list(self._live):
                await self._sio.emit(event, payload, to=sid)

    async def drop_all(self) -> None:
        """Server-side disconnect of every client now (python-socketio will not reconnect)."""
        if self._sio is not None:
            for sid in list(self._live):
                await self._sio.disconnect(sid)

    # -- Socket.IO handlers ------------------------------------------------------------------

    @web.middleware
    async def _auth_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.rstrip("/") == p.SOCKETIO_PATH and "sid" not in request.query:
            self.connection_attempts += 1
            key = request.headers.get(p.API_KEY_HEADER, "")
            if not secrets.compare_digest(key.encode(), self.api_key.encode()):
                self.rejected_attempts += 1
                return web.json_response({"error": "Invalid or missing API key"}, status=401)
        return await handler(request)

    def _build_sio(self) -> socketio.AsyncServer:
        # async_handlers=False: one connection's events run in order, like one audio stream.
        sio = socketio.AsyncServer(async_mode="aiohttp", async_handlers=False,
                                   ping_interval=self.ping_interval,
                                   ping_timeout=self.ping_timeout)

        async def on_connect(sid: str, environ: dict[str, Any]) -> None:
            self.records[sid] = SidRecord()
            self._live[sid] = _Live()

        async def on_disconnect(sid: str, *args: Any) -> None:
            self._mark_gone(sid)

        async def on_start(sid: str, payload: Any = None) -> None:
            await self._on_start(sio, sid, payload)

        async def on_audio(sid: str, payload: Any = None) -> None:
            await self._on_audio(sio, sid, payload)

        async def on_stop(sid: str, *args: Any) -> None:
            await self._on_stop(sio, sid)

        # Registered by call, not as decorators: python-socketio is untyped, and an untyped
        # decorator would erase the handlers' types (bot/stt/session.py does the same).
        sio.on("connect", on_connect)
        sio.on("disconnect", on_disconnect)
        sio.on(p.START_SESSION, on_start)
        sio.on(p.AUDIO_CHUNK, on_audio)
        sio.on(p.STOP_SESSION, on_stop)
        return sio

    def _mark_gone(self, sid: str) -> None:
        self._live.pop(sid, None)
        if sid in self.records:
            self.records[sid].disconnected = True

    async def _on_start(self, sio: socketio.AsyncServer, sid: str, payload: Any) -> None:
        live, record = self._live.get(sid), self.records.get(sid)
        if live is None or record is None:
            return
        rate = payload.get("sampleRate") if isinstance(payload, dict) else None
        if isinstance(rate, bool) or not isinstance(rate, int) or not 8000 <= rate <= 48000:
            await sio.emit(p.SESSION_ERROR, {"error": f"invalid sampleRate {rate!r}"}, to=sid)
            return
        record.sample_rates.append(rate)
        record.session_starts += 1
        if self.ignore_start_session:
            self.ignore_start_session = False
            return
        if self.start_session_error is not None:
            error, self.start_session_error = self.start_session_error, None
            await sio.emit(p.SESSION_ERROR, {"error": error}, to=sid)
            return
        live.decoder, live.rate = ToneDecoder(rate), rate
        live.chunks_in_session = live.samples_in_session = 0
        session_id = f"fake-{secrets.token_hex(6)}"
        await sio.emit(
            p.TRANSCRIPT_MESSAGE,
            {"message_type": "session_started", "session_id": session_id},
            to=sid,
        )
        await sio.emit(p.SESSION_STARTED, to=sid)

    async def _on_audio(self, sio: socketio.AsyncServer, sid: str, payload: Any) -> None:
        live, record = self._live.get(sid), self.records.get(sid)
        if live is None or record is None:
            return
        try:
            pcm, rate = p.decode_audio_chunk(payload)
        except p.ProtocolError as exc:
            await sio.emit(p.SESSION_ERROR, {"error": str(exc)}, to=sid)
            return
        if live.decoder is None:
            await sio.emit(p.SESSION_ERROR, {"error": "no active session"}, to=sid)
            return
        if rate != live.rate:
            await sio.emit(
                p.SESSION_ERROR, {"error": f"sample_rate {rate} != session {live.rate}"}, to=sid
            )
            return
        record.chunks += 1
        record.chunk_times.append(time.monotonic())
        record.chunk_heads.append(pcm[:4])
        record.audio_bytes += len(pcm)
        record.chunk_rates.add(rate)
        live.chunks_in_session += 1
        live.samples_in_session += len(pcm) // 2
        if self.decode_seconds is None or live.samples_in_session <= self.decode_seconds * rate:
            for event in live.decoder.feed(np.frombuffer(pcm, dtype="<i2")):
                await self._emit_decoded(sio, sid, event)
            pending = live.decoder.pending if live.decoder is not None else None
            # A new pending sentence: none was pending, or the one that was has been committed.
            if pending is not None and live.pending_seen != len(record.committed):
                record.heard.append(pending)
            live.pending_seen = len(record.committed) if pending is not None else -1
        await self._maybe_fault(sio, sid, live)

    async def _upstream_error(self, sio: socketio.AsyncServer, sid: str, live: _Live,
                              code: str) -> None:
        """The upstream's error message, then the end of its session (as ElevenLabs does)."""
        live.decoder = None
        await sio.emit(p.TRANSCRIPT_MESSAGE, {"message_type": "error", "error": code,
                                              "message": f"fake upstream: {code}"}, to=sid)
        await sio.emit(p.SESSION_CLOSED, {"code": 1008, "reason": code}, to=sid)

    async def _maybe_fault(self, sio: socketio.AsyncServer, sid: str, live: _Live) -> None:
        n = live.chunks_in_session
        if self.upstream_error is not None and n >= self.upstream_error_after_chunks:
            code, self.upstream_error = self.upstream_error, None
            await self._upstream_error(sio, sid, live, code)
        elif (self.session_limit_seconds is not None and live.rate
              and live.samples_in_session / live.rate >= self.session_limit_seconds):
            self.session_limits_hit += 1
            await self._upstream_error(sio, sid, live, "session_time_limit_exceeded")
        elif self.error_after_chunks is not None and n >= self.error_after_chunks:
            self.error_after_chunks = None
            live.decoder = None  # the upstream session is gone
            await sio.emit(p.SESSION_ERROR, {"error": "upstream transcription failed"}, to=sid)
        elif self.close_after_chunks is not None and n >= self.close_after_chunks:
            self.close_after_chunks = None
            live.decoder = None
            await sio.emit(
                p.SESSION_CLOSED, {"code": self.close_code, "reason": "upstream error"}, to=sid
            )
        elif (self.drop_after_chunks is not None and n >= self.drop_after_chunks) or (
            self.drop_after_seconds is not None
            and live.rate
            and live.samples_in_session / live.rate >= self.drop_after_seconds
        ):
            self.drop_after_chunks = self.drop_after_seconds = None
            await sio.disconnect(sid)

    async def _on_stop(self, sio: socketio.AsyncServer, sid: str) -> None:
        live, record = self._live.get(sid), self.records.get(sid)
        if live is None or record is None:
            return
        record.session_stops += 1
        await self._release(sio, lambda held: held == sid)
        if live.decoder is not None:
            for event in live.decoder.flush():
                await self._emit_decoded(sio, sid, event, release=True)
            live.decoder = None
        await sio.emit(p.SESSION_CLOSED, {"code": p.CLOSE_NORMAL, "reason": "stopped"}, to=sid)

    async def release_commits(self) -> int:
        """Send the commits held by :attr:`hold_commits` to connections still open; returns
        how many were sent."""
        if self._sio is None:
            return 0
        return await self._release(self._sio, lambda _sid: True)

    async def _release(self, sio: socketio.AsyncServer, which: Callable[[str], bool]) -> int:
        keep, sent = [], 0
        for sid, event in self._held:
            if not which(sid):
                keep.append((sid, event))
            elif sid in self._live:
                await self._emit_decoded(sio, sid, event, release=True)
                sent += 1
        self._held = keep
        return sent

    async def _emit_decoded(
        self, sio: socketio.AsyncServer, sid: str, event: Partial | Utterance, *,
        release: bool = False,
    ) -> None:
        record = self.records[sid]
        if isinstance(event, Utterance) and self.hold_commits and not release:
            self._held.append((sid, event))
            return
        if isinstance(event, Partial):
            count, self.flood_partials = self.flood_partials, 0
            for text in [event.text, *(f"{event.text} {i:05d}" for i in range(count))]:
                record.partials.append(text)
                await sio.emit(
                    p.TRANSCRIPT_MESSAGE,
                    {"message_type": "partial_transcript", "text": text},
                    to=sid,
                )
            return
        record.committed.append(event.text)
        plain = {"message_type": "committed_transcript", "text": event.text}
        words: list[p.WordPayload] = [
            {
                "text": w.text,
                "start": round(w.start, 3),
                "end": round(w.end, 3),
                "type": "spacing" if w.text.isspace() else "word",
            }
            for w in event.words
        ]
        if words:
            # The checksum and end marker after the last character are part of the utterance:
            # like a real recogniser, the last word ends where the speech ends.
            words[-1]["end"] = round(max(event.end, words[-1]["end"]), 3)
        timed = {
            "message_type": "committed_transcript_with_timestamps",
            "text": event.text,
            "words": words,
        }
        order = [(self.send_plain, plain), (self.send_timestamps, timed)]
        if self.timestamps_first:
            order.reverse()
        for enabled, message in order:
            if enabled:
                await sio.emit(p.TRANSCRIPT_MESSAGE, message, to=sid)
        if self.flood_commits:
            count, self.flood_commits = self.flood_commits, 0
            began = time.monotonic()
            for i in range(count):
                text = f"flood {i:05d}"
                await sio.emit(p.TRANSCRIPT_MESSAGE,
                               {"message_type": "committed_transcript", "text": text}, to=sid)
                # Recorded once sent: after the last one, flood_seconds is set before anyone
                # waiting on the count can run (no await in between).
                record.committed.append(text)
            self.flood_seconds = time.monotonic() - began


async def serve_forever(host: str, port: int, api_key: str) -> None:
    """Run the fake until cancelled (``cantobot fake-stt``); logs its URL and key at start."""
    server = FakeSttServer(api_key, host=host, port=port)
    await server.start()
    log.info("fake cantonese.ai STT listening at %s (api key %r)", server.url, api_key)
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await server.stop()
