"""One speaker's cantonese.ai real-time STT session: connect, stream, reconnect, stop.

Boundary: this adapter owns one ``socketio.AsyncClient`` (and its aiohttp session) per
connection, two named tasks (sender, reconnector) and the audio not yet confirmed by a commit.
It turns server messages (parsed by :mod:`bot.stt.protocol`) into :class:`SttEvent` values
handed to the owner's ``on_event`` callback on the event loop. It knows nothing of Discord.

States (every transition is logged once at INFO and reported as :class:`StateChanged`)::

    IDLE -> CONNECTING -> STARTING -> STREAMING -> STOPPING -> CLOSED
                 |            |          |  ^
                 v            v          v  |          (any state) -> CLOSED  by aclose()
               FAILED <-----FAILED    RECONNECTING --> FAILED  (401: permanent)

* ``start()`` makes one attempt; a first failure raises and leaves FAILED (calling ``start()``
  again is again one attempt: no retry storm on a bad key).
* After a successful start, a lost connection (network error, server gone, a server-side
  disconnect, which python-socketio never reconnects after), a ``session-error`` or a
  ``session-closed`` we did not ask for moves to RECONNECTING: reconnect with capped, jittered
  exponential backoff, start a new upstream session, re-send the unconfirmed audio, go on.

Unconfirmed audio: the PCM since the last commit boundary (the committed segment's last word end
when word timestamps say so, else the audio position when the commit arrived), bounded by
``max_buffer_seconds`` (the oldest is dropped, counted in ``stats.dropped_seconds``, logged
once). The same buffer is the send queue: a cursor marks what was sent, so ``send_audio`` never
blocks and the sender emits chunks in order. A new upstream session starts at the buffer's
start, and its timestamps are offset by that position, so no sentence is lost or doubled.

Both committed forms of one sentence make one line: :class:`SegmentCommitted` on the first form,
:class:`SegmentTimestamped` (same text, words and better times) when the timestamped twin comes
(matched to the oldest unmatched commit with equal text). If the timestamped form comes first
it is the line, and the plain twin is swallowed.

Transport: ``transports=["websocket"]``: one long-lived TCP connection suits a steady 10 chunks
a second (no long-polling round trips) and a dropped connection shows at once as a disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import numpy as np
import socketio

from bot.errors import (
    CantobotError,
    StreamClosed,
    SttAuthError,
    SttError,
    SttSessionError,
    SttUnavailable,
)
from bot.stt import protocol as p
from bot.transcript.model import Segment, Word

__all__ = [
    "PartialText",
    "SegmentCommitted",
    "SegmentTimestamped",
    "SessionStats",
    "StateChanged",
    "SttEvent",
    "SttSession",
    "SttState",
]

log = logging.getLogger(__name__)

#: Bytes per 16-bit mono sample (the reference: "16-bit PCM", mono recommended).
BYTES_PER_SAMPLE: Final = 2
#: Largest audio-chunk we emit: 64 KiB of PCM (2 s at 16 kHz) stays far below python-engineio's
#: default 1 MB message limit even after base64; re-sent audio is split to this size.
MAX_CHUNK_BYTES: Final = 64 * 1024
#: Commits awaiting their timestamped twin (or twins awaiting a plain form) kept per session; a
#: server that sends only one form would otherwise grow the lists forever.
MAX_UNMATCHED: Final = 64
#: A session must stream this long before the reconnect backoff starts again from its initial
#: delay, so connections that die at once keep backing off (cf. pipecat's QuickFailureTracker).
HEALTHY_AFTER_S: Final = 10.0
#: RMS (int16 units, about -40 dBFS) above which a 20 ms frame counts as speech when a commit
#: without word timestamps has to be placed in time.
VOICED_RMS: Final = 330.0
#: A pause this long ends a sentence; voiced stretches shorter than MIN_VOICED_S are ignored.
SENTENCE_GAP_S: Final = 0.5
MIN_VOICED_S: Final = 0.25
#: Bound on disconnecting one client (sending the Engine.IO close packet).
DISCONNECT_TIMEOUT_S: Final = 2.0


class SttState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    STARTING = "starting"
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"
    STOPPING = "stopping"
    CLOSED = "closed"
    FAILED = "failed"


_S = SttState
#: Legal transitions (anything else is a bug in this module).
_TRANSITIONS: Final[dict[SttState, frozenset[SttState]]] = {
    _S.IDLE: frozenset({_S.CONNECTING, _S.CLOSED}),
    _S.CONNECTING: frozenset({_S.STARTING, _S.FAILED, _S.CLOSED}),
    _S.STARTING: frozenset({_S.STREAMING, _S.FAILED, _S.CLOSED}),
    _S.STREAMING: frozenset({_S.RECONNECTING, _S.STOPPING, _S.CLOSED}),
    _S.RECONNECTING: frozenset({_S.STREAMING, _S.FAILED, _S.CLOSED}),
    # A drop while stopping reconnects (within stop_timeout) so the last sentences are not lost.
    _S.STOPPING: frozenset({_S.RECONNECTING, _S.CLOSED}),
    _S.FAILED: frozenset({_S.CONNECTING, _S.CLOSED}),
    _S.CLOSED: frozenset(),
}


@dataclass(frozen=True)
class SegmentCommitted:
    """A new committed line."""

    segment: Segment


@dataclass(frozen=True)
class SegmentTimestamped:
    """The line last committed with this text, now with words and better times (not new)."""

    segment: Segment


@dataclass(frozen=True)
class PartialText:
    speaker: str
    text: str


@dataclass(frozen=True)
class StateChanged:
    speaker: str
    state: SttState
    error: CantobotError | None = None


SttEvent = SegmentCommitted | SegmentTimestamped | PartialText | StateChanged


@dataclass
class SessionStats:
    chunks_sent: int = 0
    bytes_sent: int = 0
    #: Seconds of audio dropped from the unconfirmed buffer by ``max_buffer_seconds``.
    dropped_seconds: float = 0.0
    reconnects: int = 0
    #: Malformed server messages ignored (see :mod:`bot.stt.protocol`).
    protocol_errors: int = 0
    #: Lines committed (twins are not counted twice).
    commits: int = 0


@dataclass
class _Connection:
    """One Socket.IO connection and its upstream session."""

    client: socketio.AsyncClient
    http: aiohttp.ClientSession
    started: asyncio.Future[None]
    closed: asyncio.Future[None]  # resolved by session-closed (or the connection's loss)
    origin: int  # stream sample where this upstream session's audio starts
    session_id: str = ""
    lost: bool = False


def _is_auth_rejection(exc: BaseException) -> bool:
    """True if the handshake was answered 401 (python-engineio hides it in the chain)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if getattr(cur, "status", None) == 401:  # aiohttp WSServerHandshakeError
            return True
        if "status code 401" in str(cur):  # long-polling handshake
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class SttSession:
    """A speaker's STT stream; see the module docstring for the lifecycle."""

    def __init__(
        self,
        *,
        url: str,
        api_key: str,
        sample_rate: int,
        speaker: str,
        on_event: Callable[[SttEvent], None],
        speaker_id: int | None = None,
        stream_offset: float = 0.0,
        connect_timeout: float = 10.0,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        max_buffer_seconds: float = 120.0,
        reconnect_initial_delay: float = 0.5,
        reconnect_max_delay: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if stream_offset < 0:
            raise ValueError(f"stream_offset must be >= 0, got {stream_offset}")
        self.url = url
        self._api_key = api_key
        self.sample_rate = sample_rate
        self.speaker = speaker
        self.speaker_id = speaker_id
        self.stream_offset = stream_offset
        self._on_event = on_event
        self.connect_timeout = connect_timeout
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.max_buffer_samples = max(1, round(max_buffer_seconds * sample_rate))
        self.reconnect_initial_delay = reconnect_initial_delay
        self.reconnect_max_delay = reconnect_max_delay
        self._rng = rng or random.Random()
        self.state = SttState.IDLE
        self.stats = SessionStats()
        # Audio, in stream samples (sample 0 = the first sample given to send_audio).
        self._buffer: deque[tuple[int, bytes]] = deque()  # (start sample, pcm), unconfirmed
        self._buf_start = 0  # first unconfirmed sample
        self._appended = 0  # samples given to send_audio
        self._send_pos = 0  # next sample to send
        self._last_commit_end = 0  # stream sample of the previous commit boundary
        self._dropped_logged = False
        # Twins of committed sentences.
        self._unmatched: deque[str] = deque(maxlen=MAX_UNMATCHED)  # plain, awaiting twin
        self._early_twins: deque[str] = deque(maxlen=MAX_UNMATCHED)  # twin came first
        # send position when a plain commit came; confirmed unless its timestamped twin follows
        self._deferred_boundary: int | None = None
        self._conn: _Connection | None = None
        self._audio_ready = asyncio.Event()
        self._streaming = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._stop_lock = asyncio.Lock()
        self._streaming_since = 0.0
        self._failures_in_a_row = 0
        self._stop_requested = False
        self._discarded = False
        self._drained = asyncio.Event()
        self._progress = asyncio.Event()  # set whenever audio went out or the state changed

    # -- public ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and start the upstream session (one attempt, bounded by the timeouts).

        Raises :class:`SttAuthError` (401), :class:`SttUnavailable` (cannot connect) or
        :class:`SttSessionError` (refused or no ``session-started`` in time); the state is then
        FAILED.
        """
        if self.state is SttState.CLOSED:
            raise StreamClosed(f"stt[{self.speaker}] closed before it started")
        if self.state not in (SttState.IDLE, SttState.FAILED):
            raise RuntimeError(f"start() in state {self.state.value}: a session starts once")
        try:
            await self._connect_and_start(first=True)
        except SttError as exc:
            self._set_state(SttState.FAILED, exc)
            raise
        self._set_state(SttState.STREAMING)
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_loop(), name=f"stt-sender:{self.speaker}")

    def send_audio(self, pcm: bytes) -> None:
        """Queue mono int16 LE PCM at ``sample_rate``; never blocks; ignored once stopping."""
        if len(pcm) % BYTES_PER_SAMPLE:
            raise ValueError(f"16-bit PCM must have an even byte count, got {len(pcm)}")
        if self._stop_requested or self.state is SttState.CLOSED or not pcm:
            return
        self._buffer.append((self._appended, bytes(pcm)))
        self._appended += len(pcm) // BYTES_PER_SAMPLE
        self._enforce_bound()
        self._audio_ready.set()

    async def drain(self, max_ahead_seconds: float = 0.0) -> None:
        """Wait until at most ``max_ahead_seconds`` of queued audio is unsent.

        Backpressure for a producer faster than real time (``replay --speed 0``): without it the
        whole file would sit in the unconfirmed buffer and hit its bound. Returns at once when
        the session cannot send (stopped, closed or failed).
        """
        limit = round(max_ahead_seconds * self.sample_rate)
        sending = (SttState.CONNECTING, SttState.STARTING, SttState.STREAMING,
                   SttState.RECONNECTING)
        while self._appended - self._send_pos > limit and self.state in sending:
            self._progress.clear()
            await self._progress.wait()

    async def stop(self, within: float | None = None) -> None:
        """Send what is queued, stop the session, await its last commits; idempotent.

        Bounded by ``within`` seconds (default ``stop_timeout``) overall; a reconnect in progress is
        waited for within it.
        """
        async with self._stop_lock:
            if self.state is SttState.CLOSED:
                return
            self._stop_requested = True
            loop = asyncio.get_running_loop()
            deadline = loop.time() + (self.stop_timeout if within is None else within)
            clean = self.state in (SttState.IDLE, SttState.FAILED)
            attempt = 0
            while not clean and loop.time() < deadline:
                if self.state is SttState.RECONNECTING:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._streaming.wait(), deadline - loop.time())
                if self.state is not SttState.STREAMING:
                    break
                self._set_state(SttState.STOPPING)
                try:
                    await self._drain_and_stop(deadline)
                    clean = True
                except TimeoutError:
                    log.warning("stt[%s] stop timed out waiting for the last commits",
                                self.speaker)
                    break
                except SttError as exc:
                    # The connection dropped while stopping: reconnect and re-send what is
                    # unconfirmed, as mid-session, within the same deadline.
                    attempt += 1
                    log.warning("stt[%s] lost while stopping (%s); reconnecting", self.speaker,
                                exc)
                    if self._reconnector is not None and not self._reconnector.done():
                        continue
                    self._set_state(SttState.RECONNECTING, exc)
                    self._reconnector = asyncio.create_task(
                        self._reconnect(self._conn, first_attempt=attempt - 1),
                        name=f"stt-reconnect:{self.speaker}",
                    )
            if not clean:
                log.warning(
                    "stt[%s] gave up: %.1f s of audio were not transcribed",
                    self.speaker,
                    (self._appended - self._buf_start) / self.sample_rate,
                )
            await self._shutdown()

    def discard(self) -> None:
        """Forget this speaker now (an opt-out): buffered audio is dropped unsent, nothing more
        is sent, and no transcript event (partial, line, twin) is emitted from here on, even
        if the service still sends one. Follow with :meth:`aclose` to disconnect."""
        self._discarded = True
        self._stop_requested = True
        self._buffer.clear()
        self._send_pos = self._buf_start = self._appended
        self._audio_ready.clear()

    async def aclose(self) -> None:
        """Close now: cancel the tasks, disconnect; idempotent (no stop-session sent)."""
        self._stop_requested = True
        await self._shutdown()

    # -- state -------------------------------------------------------------------------------

    def _set_state(self, new: SttState, error: CantobotError | None = None) -> None:
        old = self.state
        if new is old:
            return
        if new not in _TRANSITIONS[old]:
            raise AssertionError(f"illegal STT state change {old.value} -> {new.value}")
        self.state = new
        if error is None:
            log.info("stt[%s] %s -> %s", self.speaker, old.value, new.value)
        else:
            log.info("stt[%s] %s -> %s (%s)", self.speaker, old.value, new.value, error)
        self._progress.set()
        if new is SttState.STREAMING:
            self._streaming.set()
            self._streaming_since = asyncio.get_running_loop().time()
        else:
            self._streaming.clear()
        self._emit(StateChanged(self.speaker, new, error))

    def _emit(self, event: SttEvent) -> None:
        if self._discarded and not isinstance(event, StateChanged):
            return  # the speaker opted out: nothing of theirs goes on
        try:
            self._on_event(event)
        except Exception:  # the owner's bug must not end this speaker's transcript
            log.exception("stt[%s] on_event callback failed for %r", self.speaker, event)

    # -- connecting --------------------------------------------------------------------------

    async def _connect_and_start(self, *, first: bool) -> None:
        if first:
            self._set_state(SttState.CONNECTING)
        conn = await self._connect()
        try:
            if first:
                self._set_state(SttState.STARTING)
            await conn.client.emit(p.START_SESSION, p.start_session(self.sample_rate))
            try:
                await asyncio.wait_for(asyncio.shield(conn.started), self.start_timeout)
            except TimeoutError:
                raise SttSessionError(
                    f"cantonese.ai did not start a session within {self.start_timeout:g} s"
                ) from None
        except BaseException:
            await self._drop_connection(conn)
            raise
        # Re-send the unconfirmed audio first; its upstream times start at the buffer's start.
        conn.origin = self._send_pos = self._buf_start
        self._unmatched.clear()
        self._early_twins.clear()
        self._audio_ready.set()

    async def _connect(self) -> _Connection:
        http = aiohttp.ClientSession()
        client = socketio.AsyncClient(reconnection=False, http_session=http, handle_sigint=False)
        loop = asyncio.get_running_loop()
        conn = _Connection(client, http, loop.create_future(), loop.create_future(), 0)
        self._register_handlers(conn)
        self._conn = conn
        try:
            await asyncio.wait_for(
                client.connect(
                    self.url,
                    headers={p.API_KEY_HEADER: self._api_key},
                    transports=["websocket"],
                    socketio_path=p.SOCKETIO_PATH,
                    wait_timeout=self.connect_timeout,
                ),
                self.connect_timeout,
            )
        except BaseException as exc:
            await self._drop_connection(conn)
            if isinstance(exc, TimeoutError):
                raise SttUnavailable(
                    f"cannot reach cantonese.ai at {self.url}: no answer in "
                    f"{self.connect_timeout:g} s"
                ) from None
            if isinstance(exc, socketio.exceptions.ConnectionError | aiohttp.ClientError):
                if _is_auth_rejection(exc):
                    raise SttAuthError(
                        "cantonese.ai rejected the API key (HTTP 401); check stt.api_key"
                    ) from exc
                raise SttUnavailable(f"cannot connect to cantonese.ai at {self.url}") from exc
            raise
        return conn

    async def _drop_connection(self, conn: _Connection) -> None:
        """Forget and close one connection (its late events are then ignored)."""
        if self._conn is conn:
            self._conn = None
        conn.lost = True
        for fut in (conn.started, conn.closed):
            if not fut.done():
                fut.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.client.disconnect(), DISCONNECT_TIMEOUT_S)
        await conn.http.close()

    def _register_handlers(self, conn: _Connection) -> None:
        client = conn.client

        def current() -> bool:
            return self._conn is conn and not conn.lost

        async def on_disconnect(*args: Any) -> None:
            if current():
                reason = args[0] if args else "unknown"
                self._connection_lost(
                    conn, SttUnavailable(f"disconnected from cantonese.ai ({reason})")
                )

        async def on_started(*args: Any) -> None:
            if current() and not conn.started.done():
                conn.started.set_result(None)

        async def on_error(payload: Any = None) -> None:
            if current():
                message = p.parse_session_error(payload)
                self._connection_lost(
                    conn, SttSessionError(f"cantonese.ai session error: {message}")
                )

        async def on_closed(payload: Any = None) -> None:
            if not current():
                return
            code, reason = p.parse_session_closed(payload)
            if self.state is SttState.STOPPING and code == p.CLOSE_NORMAL:
                if not conn.closed.done():
                    conn.closed.set_result(None)
                return
            self._connection_lost(
                conn,
                SttSessionError(
                    f"cantonese.ai closed the session (code {code}: {reason or 'no reason'})",
                    code=code,
                ),
            )

        async def on_transcript(payload: Any = None) -> None:
            if current():
                self._on_transcript(conn, payload)

        client.on("disconnect", on_disconnect)
        client.on(p.SESSION_STARTED, on_started)
        client.on(p.SESSION_ERROR, on_error)
        client.on(p.SESSION_CLOSED, on_closed)
        client.on(p.TRANSCRIPT_MESSAGE, on_transcript)

    def _connection_lost(self, conn: _Connection, error: SttError) -> None:
        """The connection or its upstream session is gone: fail a wait, or reconnect."""
        conn.lost = True
        self._settle_deferred()  # no twin can come any more
        self._drained.set()  # wake a stop() waiting for the sender
        for fut in (conn.started, conn.closed):
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved here: whoever awaits it gets it too
        if self.state is SttState.STREAMING and not self._stop_requested:
            log.warning("stt[%s] %s; reconnecting", self.speaker, error)
            self._set_state(SttState.RECONNECTING, error)
            self._reconnector = asyncio.create_task(
                self._reconnect(conn), name=f"stt-reconnect:{self.speaker}"
            )

    async def _reconnect(self, old: _Connection | None, first_attempt: int | None = None) -> None:
        if old is not None:
            await self._drop_connection(old)
        loop = asyncio.get_running_loop()
        healthy = loop.time() - self._streaming_since >= HEALTHY_AFTER_S
        attempt = 0 if healthy else self._failures_in_a_row
        if first_attempt is not None:
            attempt = first_attempt
        while True:
            delay = min(self.reconnect_max_delay, self.reconnect_initial_delay * 2**attempt)
            delay *= 0.5 + self._rng.random() / 2  # jitter: spread a fleet's retries
            attempt += 1
            self._failures_in_a_row = attempt
            log.info("stt[%s] reconnect attempt %d in %.2f s", self.speaker, attempt, delay)
            await asyncio.sleep(delay)
            try:
                await self._connect_and_start(first=False)
            except SttAuthError as exc:
                self._set_state(SttState.FAILED, exc)
                return
            except SttError as exc:
                log.info("stt[%s] reconnect attempt %d failed: %s", self.speaker, attempt, exc)
                continue
            self.stats.reconnects += 1
            self._set_state(SttState.STREAMING)
            return

    # -- sending -----------------------------------------------------------------------------

    def _enforce_bound(self) -> None:
        excess = (self._appended - self._buf_start) - self.max_buffer_samples
        if excess <= 0:
            return
        self._trim_to(self._buf_start + excess)
        self.stats.dropped_seconds += excess / self.sample_rate
        skipped = self._buf_start - self._send_pos
        if skipped > 0:
            # Never-sent audio was dropped: the upstream hears a gap-free stream, so its clock
            # runs behind ours by the skipped samples from now on.
            self._send_pos = self._buf_start
            if self._conn is not None:
                self._conn.origin += skipped
        if not self._dropped_logged:
            self._dropped_logged = True
            log.warning(
                "stt[%s] unconfirmed audio exceeds %.0f s: dropping the oldest (logged once)",
                self.speaker,
                self.max_buffer_samples / self.sample_rate,
            )

    def _trim_to(self, sample: int) -> None:
        """Forget audio before stream ``sample`` (it is confirmed, or dropped)."""
        while self._buffer:
            start, pcm = self._buffer[0]
            end = start + len(pcm) // BYTES_PER_SAMPLE
            if end <= sample:
                self._buffer.popleft()
            elif start < sample:
                self._buffer[0] = (sample, pcm[(sample - start) * BYTES_PER_SAMPLE :])
                break
            else:
                break
        self._buf_start = max(self._buf_start, min(sample, self._appended))

    def _next_chunk(self) -> tuple[int, bytes] | None:
        """The next unsent piece of audio at the send cursor, at most MAX_CHUNK_BYTES."""
        # Scan from the newest piece: the unsent tail is short while the unconfirmed head can
        # hold minutes of audio (a scan from the left cost O(buffer) per chunk sent).
        found: tuple[int, bytes] | None = None
        for start, pcm in reversed(self._buffer):
            if start + len(pcm) // BYTES_PER_SAMPLE <= self._send_pos:
                break
            found = (start, pcm)
        if found is None:
            return None
        start, pcm = found
        offset = (self._send_pos - start) * BYTES_PER_SAMPLE
        return self._send_pos, pcm[offset : offset + MAX_CHUNK_BYTES]

    async def _send_loop(self) -> None:
        while True:
            await self._audio_ready.wait()
            self._audio_ready.clear()
            while self.state in (SttState.STREAMING, SttState.STOPPING):
                conn = self._conn
                chunk = self._next_chunk()
                if conn is None or conn.lost or chunk is None:
                    break
                start, pcm = chunk
                try:
                    await conn.client.emit(p.AUDIO_CHUNK, p.audio_chunk(pcm, self.sample_rate))
                except socketio.exceptions.SocketIOError as exc:
                    self._connection_lost(conn, SttUnavailable(f"send failed: {exc}"))
                    break
                if self._conn is conn and self._send_pos == start:
                    self._send_pos = start + len(pcm) // BYTES_PER_SAMPLE
                    self.stats.chunks_sent += 1
                    self.stats.bytes_sent += len(pcm)
                    self._progress.set()
            if self.state is SttState.STOPPING and self._send_pos >= self._appended:
                self._drained.set()

    async def _drain_and_stop(self, deadline: float) -> None:
        conn = self._conn
        if conn is None:
            raise SttUnavailable("no connection to stop")
        loop = asyncio.get_running_loop()
        self._drained.clear()  # may be left set by an earlier connection's loss
        self._audio_ready.set()
        if self._send_pos < self._appended:
            await asyncio.wait_for(self._drained.wait(), max(0.0, deadline - loop.time()))
        if conn.lost:
            raise SttUnavailable("the connection was lost while stopping")
        try:
            await conn.client.emit(p.STOP_SESSION)
        except socketio.exceptions.SocketIOError as exc:
            raise SttUnavailable(f"cannot send stop-session: {exc}") from exc
        # The server commits what is pending, then closes the session (code 1000).
        await asyncio.wait_for(asyncio.shield(conn.closed), max(0.0, deadline - loop.time()))

    async def _shutdown(self) -> None:
        for task in (self._reconnector, self._sender):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._reconnector, self._sender):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._reconnector = self._sender = None
        if self._conn is not None:
            await self._drop_connection(self._conn)
        if self.state is not SttState.CLOSED:
            self._set_state(SttState.CLOSED)

    # -- transcripts -------------------------------------------------------------------------

    def _seconds(self, sample: float) -> float:
        """Meeting time of a stream sample position."""
        return self.stream_offset + sample / self.sample_rate

    def _on_transcript(self, conn: _Connection, payload: object) -> None:
        try:
            event = p.parse_transcript_message(payload)
        except p.ProtocolError as exc:
            self.stats.protocol_errors += 1
            log.warning("stt[%s] ignored a malformed transcript message: %s", self.speaker, exc)
            return
        if not isinstance(event, p.TimestampedTranscript):
            self._settle_deferred()  # the message after a plain commit was not its twin
        if isinstance(event, p.SessionStarted):
            conn.session_id = event.session_id
        elif isinstance(event, p.PartialTranscript):
            self._emit(PartialText(self.speaker, event.text))
        elif isinstance(event, p.CommittedTranscript):
            self._on_plain_commit(event.text)
        elif isinstance(event, p.TimestampedTranscript):
            self._on_timestamped_commit(conn, event)

    def _estimated_segment(self, text: str) -> Segment:
        """Times of a commit without word timestamps: the voiced audio since the last commit.

        The unconfirmed buffer still holds that audio, so the first and last 20 ms frames above
        a speech threshold bound the sentence far better than "previous commit .. now" would
        (that would start every sentence at the end of the previous one, pauses included).
        """
        lo, hi = self._last_commit_end, self._send_pos
        span = self._voiced_span(lo, hi)
        if span is not None:
            lo, hi = span
        start = self._seconds(lo)
        return Segment(self.speaker, text, start, max(start, self._seconds(hi)),
                       speaker_id=self.speaker_id)

    def _voiced_span(self, lo: int, hi: int) -> tuple[int, int] | None:
        """The first stretch of speech in stream samples [lo, hi): voiced 20 ms frames joined
        across pauses shorter than SENTENCE_GAP_S, ignoring blips shorter than MIN_VOICED_S
        (a click, the tail of the previous sentence)."""
        frame = max(1, self.sample_rate // 50)
        pieces = [
            (start, pcm) for start, pcm in self._buffer
            if start < hi and start + len(pcm) // BYTES_PER_SAMPLE > lo
        ]
        if not pieces:
            return None
        first = max(lo, pieces[0][0])
        audio = np.frombuffer(b"".join(pcm for _, pcm in pieces), dtype="<i2")
        audio = audio[first - pieces[0][0]: hi - pieces[0][0]]
        n = len(audio) // frame
        if n == 0:
            return None
        frames = audio[: n * frame].astype(np.float32).reshape(n, frame)
        voiced = np.sqrt(np.mean(frames * frames, axis=1)) > VOICED_RMS
        gap = round(SENTENCE_GAP_S * 50)
        shortest = max(1, round(MIN_VOICED_S * 50))
        i = 0
        while i < n:
            if not voiced[i]:
                i += 1
                continue
            begin = end = i
            j = i
            while j < n and j - end <= gap:
                if voiced[j]:
                    end = j
                j += 1
            if end - begin + 1 >= shortest:
                return first + begin * frame, first + (end + 1) * frame
            i = end + 1
        return None

    def _settle_deferred(self) -> None:
        if self._deferred_boundary is not None:
            self._confirm(self._deferred_boundary)
            self._deferred_boundary = None

    def _confirm(self, boundary: int) -> None:
        boundary = min(boundary, self._send_pos)
        self._last_commit_end = max(self._last_commit_end, boundary)
        self._trim_to(boundary)

    def _on_plain_commit(self, text: str) -> None:
        if text in self._early_twins:
            self._early_twins.remove(text)  # the timestamped twin already made this line
            return
        self.stats.commits += 1
        segment = self._estimated_segment(text)
        self._unmatched.append(text)
        # A timestamped twin, if one comes, is the next message and gives a precise boundary.
        self._deferred_boundary = self._send_pos
        self._emit(SegmentCommitted(segment))

    def _on_timestamped_commit(self, conn: _Connection, event: p.TimestampedTranscript) -> None:
        base = self.stream_offset + conn.origin / self.sample_rate
        words = tuple(Word(w.text, base + w.start, base + w.end) for w in event.words)
        if words:
            segment = Segment(
                self.speaker,
                event.text,
                words[0].start,
                max(w.end for w in words),
                words,
                self.speaker_id,
            )
            boundary = conn.origin + round(max(w.end for w in event.words) * self.sample_rate)
        else:
            segment = self._estimated_segment(event.text)
            boundary = self._send_pos
        if event.text in self._unmatched:
            self._unmatched.remove(event.text)
            self._deferred_boundary = None
            self._confirm(boundary)
            self._emit(SegmentTimestamped(segment))
            return
        self._settle_deferred()  # a twin of some other sentence: that plain commit had none
        self.stats.commits += 1
        self._early_twins.append(event.text)
        self._confirm(boundary)
        self._emit(SegmentCommitted(segment))
