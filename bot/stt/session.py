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

The logic without the socket (the unconfirmed-audio buffer that is also the send queue, the
send cursor, the re-send origin of a new upstream session, pairing the two committed forms of a
sentence, voice detection) is :class:`~bot.stt.core.SttCore`; this adapter owns the socket, its
two tasks and the retries: reconnects after a start, upstream ``error`` messages (what each
code means is :class:`~bot.stt.upstream.ErrorPolicy`; this adapter applies it), the stop
procedure (:class:`~bot.stt.stopping.Stopper`), and first starts (:class:`StartGate`,
shared by the sessions of one owner so that a rejected key costs one connection per backoff
period however many people talk). The events it hands on are in :mod:`bot.stt.events`: each
new line carries a :class:`~bot.stt.events.LineRef` and its timestamped twin amends that ref.

Transport: ``transports=["websocket"]``: one long-lived TCP connection suits a steady 10 chunks
a second (no long-polling round trips) and a dropped connection shows at once as a disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator
from typing import Any, Final, Protocol

import aiohttp
import socketio

from bot.backoff import Backoff
from bot.errors import (
    CantobotError,
    StreamClosed,
    SttAuthError,
    SttError,
    SttSessionError,
    SttUnavailable,
)
from bot.lifecycle import change
from bot.stt import protocol as p
from bot.stt.core import BYTES_PER_SAMPLE, SessionStats, SttCore
from bot.stt.events import (
    TRANSITIONS,
    LineRef,
    PartialText,
    SegmentCommitted,
    SegmentTimestamped,
    SpeakerKey,
    StateChanged,
    SttAudioLost,
    SttEvent,
    SttSessionRenewed,
    SttState,
)
from bot.stt.stopping import Stopper
from bot.stt.upstream import PERMANENT_ERRORS, Action, ErrorPolicy, UpstreamError

__all__ = [
    "LineRef",
    "PartialText",
    "SegmentCommitted",
    "SegmentTimestamped",
    "SessionStats",
    "StartGate",
    "StateChanged",
    "SttEvent",
    "SttSession",
    "SttState",
]

log = logging.getLogger(__name__)

#: A session must stream this long before the reconnect backoff starts again from its initial
#: delay, so connections that die at once keep backing off (cf. pipecat's QuickFailureTracker).
HEALTHY_AFTER_S: Final = 10.0
#: Bound on disconnecting one client (sending the Engine.IO close packet).
DISCONNECT_TIMEOUT_S: Final = 2.0
#: Socket.IO's default namespace, and the prefix of an event in it as one Engine.IO text
#: packet: "4" (message) + "2" (event), then the JSON array.
_DEFAULT_NAMESPACE: Final = "/"
_EVENT_PREFIX: Final = "42"


class _LinkOwner(Protocol):
    """What a link reports to (the session): its events, while it is the current link."""

    def link_current(self, link: _Link) -> bool: ...

    def link_lost(self, link: _Link, error: SttError) -> None: ...

    def link_transcript(self, link: _Link, payload: object) -> None: ...

    def link_stopping(self) -> bool: ...


async def _finish(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Any:
    """The rest of a coroutine started by hand (``coro.send(None)``) that suspended on
    ``waiting_on``: wait for what it waited for, then let it go on; its result or error is
    this one's, and a cancellation reaches it."""
    return await _resumed(coro, waiting_on)


@types.coroutine
def _resumed(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Generator[Any, Any, Any]:
    # What ``await coro`` does, minus the first step, which was already taken: hand what the
    # coroutine yields to the running task, and pass what the task sends (or throws) back in.
    while True:
        try:
            sent = yield waiting_on
        except BaseException as exc:  # cancellation included: the coroutine gets it
            try:
                waiting_on = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting_on = coro.send(sent)
            except StopIteration as done:
                return done.value


def _raise_as_connection_error(write: asyncio.Future[Any]) -> None:
    if write.cancelled():
        raise socketio.exceptions.ConnectionError("websocket write cancelled")
    exc = write.exception()
    if exc is not None:
        raise socketio.exceptions.ConnectionError(f"websocket write failed: {exc}") from exc


class _Link:
    """One Socket.IO connection and its upstream session: connect (errors translated),
    start-session, audio-chunk, stop-session, close. Server events go to the owner."""

    def __init__(self, owner: _LinkOwner) -> None:
        self.http = aiohttp.ClientSession()
        self.client = socketio.AsyncClient(reconnection=False, http_session=self.http,
                                           handle_sigint=False)
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[None] = loop.create_future()
        #: Resolved by session-closed (or failed by the connection's loss).
        self.closed: asyncio.Future[None] = loop.create_future()
        self.session_id = ""
        self.lost = False
        self._owner = owner
        #: A direct write that waits for the socket's buffer to drain (see write_now).
        self._draining: asyncio.Future[Any] | None = None
        self.client.on("disconnect", self._on_disconnect)
        self.client.on(p.SESSION_STARTED, self._on_started)
        self.client.on(p.SESSION_ERROR, self._on_error)
        self.client.on(p.SESSION_CLOSED, self._on_closed)
        self.client.on(p.TRANSCRIPT_MESSAGE, self._on_transcript)

    async def connect(self, url: str, api_key: str, within: float) -> None:
        """Connect, or close this link and raise SttAuthError / SttUnavailable."""
        try:
            await asyncio.wait_for(
                self.client.connect(url, headers={p.API_KEY_HEADER: api_key},
                                    transports=["websocket"], socketio_path=p.SOCKETIO_PATH,
                                    wait_timeout=within),
                within,
            )
        except BaseException as exc:
            await self.close()
            if isinstance(exc, TimeoutError):
                raise SttUnavailable(
                    f"cannot reach cantonese.ai at {url}: no answer in {within:g} s"
                ) from None
            if isinstance(exc, socketio.exceptions.ConnectionError | aiohttp.ClientError):
                if _is_auth_rejection(exc):
                    raise SttAuthError(
                        "cantonese.ai rejected the API key (HTTP 401); check stt.api_key"
                    ) from exc
                raise SttUnavailable(f"cannot connect to cantonese.ai at {url}") from exc
            raise

    async def start_session(self, sample_rate: int, within: float) -> None:
        await self.client.emit(p.START_SESSION, p.start_session(sample_rate))
        try:
            await asyncio.wait_for(asyncio.shield(self.started), within)
        except TimeoutError:
            raise SttSessionError(
                f"cantonese.ai did not start a session within {within:g} s"
            ) from None

    async def send_audio(self, pcm: bytes, sample_rate: int) -> bool:
        """One ``audio-chunk``, the same text frame either way; True if written directly.

        :meth:`write_now` when it can, else python-socketio's ``emit``. Either way this
        returns once the socket's buffer has room again (backpressure for the sender task).
        """
        await self._drained()
        if self.write_now(pcm, sample_rate):
            await self._drained()
            return True
        await self.client.emit(p.AUDIO_CHUNK, p.audio_chunk(pcm, sample_rate))
        return False

    def write_now(self, pcm: bytes, sample_rate: int) -> bool:
        """Write the ``audio-chunk`` frame here and now if that keeps the order; False if not
        (nothing written: send it with :meth:`send_audio`).

        python-socketio's ``emit`` JSON-encodes the ~4 KB payload and queues it for
        python-engineio's write task, which wakes (through a fresh ``wait_for`` task on Python
        3.11) to write it: more task steps per chunk, 10 chunks a second per speaker. On a plain
        websocket with nothing of ours unwritten ahead, the same text frame is written at once:
        aiohttp writes an uncompressed frame before its only suspension point, the wait for a
        full socket buffer to drain. That rare wait is finished by a task that every later
        write waits for. Raises ``socketio.exceptions.ConnectionError`` if the write fails.
        """
        draining = self._draining
        if draining is not None:
            if not draining.done():
                return False
            self._draining = None
            _raise_as_connection_error(draining)
        ws = self._idle_websocket()
        if ws is None:
            return False
        write = ws.send_str(_EVENT_PREFIX + p.audio_chunk_event_json(pcm, sample_rate))
        try:
            waiting_on = write.send(None)
        except StopIteration:
            return True
        except (OSError, aiohttp.ClientError, RuntimeError) as exc:
            raise socketio.exceptions.ConnectionError(f"websocket write failed: {exc}") from exc
        self._draining = asyncio.ensure_future(_finish(write, waiting_on))
        return True

    async def _drained(self) -> None:
        """Wait for a write that waits on a full socket buffer, if any (its error is ours)."""
        draining, self._draining = self._draining, None
        if draining is not None:
            await asyncio.wait([draining])
            _raise_as_connection_error(draining)

    def _idle_websocket(self) -> Any:
        """python-engineio's websocket when a frame written now keeps the emit order, else None.

        Every packet python-engineio was given must be written already: its write task takes
        a packet off the queue one loop step before writing it, so an empty queue is not
        enough; the queue's count of unfinished packets (``task_done`` after each write) is.
        Reads python-engineio internals (``state``, ``current_transport``, ``ws``, ``queue``)
        and asyncio.Queue's ``_unfinished_tasks``; the versions are pinned and .ci/run checks
        them; any of them missing means ``emit``.
        """
        eio = self.client.eio
        if (getattr(eio, "state", None) != "connected"
                or getattr(eio, "current_transport", None) != "websocket"
                or getattr(getattr(eio, "queue", None), "_unfinished_tasks", 1) != 0
                or _DEFAULT_NAMESPACE not in self.client.namespaces):
            return None
        return getattr(eio, "ws", None)

    async def stop_session(self, within: float) -> None:
        """stop-session; the server commits what is pending, then closes (code 1000)."""
        if self.lost:
            raise SttUnavailable("the connection was lost while stopping")
        try:
            await self.client.emit(p.STOP_SESSION)
        except socketio.exceptions.SocketIOError as exc:
            raise SttUnavailable(f"cannot send stop-session: {exc}") from exc
        await asyncio.wait_for(asyncio.shield(self.closed), within)

    def fail(self, error: SttError) -> None:
        """Lost: whoever waits for the start or the close gets ``error``."""
        self.lost = True
        for fut in (self.started, self.closed):
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved here: whoever awaits it gets it too

    async def close(self) -> None:
        """Close (late events are then ignored); idempotent."""
        self.lost = True
        for fut in (self.started, self.closed):
            if not fut.done():
                fut.cancel()
        draining, self._draining = self._draining, None
        if draining is not None:  # its outcome no longer matters: this link is closed
            draining.cancel()
            await asyncio.wait([draining])
            if not draining.cancelled():
                draining.exception()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.disconnect(), DISCONNECT_TIMEOUT_S)
        await self.http.close()

    # -- server events ---------------------------------------------------------------------------

    def _current(self) -> bool:
        return self._owner.link_current(self) and not self.lost

    async def _on_disconnect(self, *args: Any) -> None:
        if self._current():
            reason = args[0] if args else "unknown"
            self._owner.link_lost(
                self, SttUnavailable(f"disconnected from cantonese.ai ({reason})"))

    async def _on_started(self, *args: Any) -> None:
        if self._current() and not self.started.done():
            self.started.set_result(None)

    async def _on_error(self, payload: Any = None) -> None:
        if self._current():
            message = p.parse_session_error(payload)
            self._owner.link_lost(self, SttSessionError(f"cantonese.ai session error: {message}"))

    async def _on_closed(self, payload: Any = None) -> None:
        if not self._current():
            return
        code, reason = p.parse_session_closed(payload)
        if self._owner.link_stopping() and code == p.CLOSE_NORMAL:
            if not self.closed.done():
                self.closed.set_result(None)
            return
        self._owner.link_lost(self, SttSessionError(
            f"cantonese.ai closed the session (code {code}: {reason or 'no reason'})", code=code))

    async def _on_transcript(self, payload: Any = None) -> None:
        if self._current():
            self._owner.link_transcript(self, payload)


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


def _reraise_lost_cancel(exc: BaseException) -> None:
    """Raise CancelledError if this task was cancelled but got ``exc`` instead.

    Python 3.11's ``asyncio.wait_for`` returns the inner result (here: a refused connection)
    when the cancel arrives just as the inner call ends, so the cancel is lost; a retry loop that
    only catches the error would then never end (``aclose`` would wait for it forever).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


async def _cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class StartGate:
    """First starts of many sessions (one owner's speakers), retried here with one backoff.

    A session's :meth:`SttSession.start` is one attempt. :meth:`keep_starting` repeats it until
    it works, the session is stopped or closed (``startable`` says no), or it raises
    :class:`~bot.errors.StreamClosed`. Every session passing through the same gate shares its
    capped, jittered :class:`~bot.backoff.Backoff` and, while in trouble, tries one at a time:
    a rejected key costs at most one connection per backoff period, however many people talk.
    A failed attempt is reported by the session itself (``StateChanged`` to FAILED).
    """

    def __init__(self, backoff: Backoff, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.backoff = backoff
        self._clock = clock
        self._not_before = 0.0
        self._lock = asyncio.Lock()
        #: An upstream error no retry can fix (quota, terms, key) seen by any of the sessions:
        #: no further starts through this gate (the channel was told what to do).
        self.refused: CantobotError | None = None

    def refuse(self, error: CantobotError) -> None:
        """Stop starting sessions: ``error`` needs a person to act, not a retry."""
        if self.refused is None:
            log.warning("stt: no more sessions start (%s)", error)
        self.refused = error

    async def keep_starting(self, attempt: Callable[[], Awaitable[None]],
                            startable: Callable[[], bool], label: str) -> None:
        while startable() and self.refused is None:
            wait = self._not_before - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self.backoff.failing:
                async with self._lock:
                    if self._not_before > self._clock() or not startable():
                        continue
                    if await self._try(attempt, label):
                        return
            elif await self._try(attempt, label):
                return

    async def _try(self, attempt: Callable[[], Awaitable[None]], label: str) -> bool:
        try:
            await attempt()
        except StreamClosed:  # stopped or discarded while connecting: nothing left to start
            return True
        except CantobotError as exc:
            _reraise_lost_cancel(exc)
            delay = self.backoff.next()
            self._not_before = self._clock() + delay
            log.info("stt[%s] start failed (%s); next attempt in %.2f s", label, exc, delay)
            return False
        self.backoff.reset()
        self._not_before = 0.0
        return True


class _Sender:
    """The one task that emits a session's unsent audio, in order, over its current link.

    ``ready`` wakes it (new audio, a new link, a stop); ``progress`` is set whenever audio went
    out or the session's state changed (backpressure waits on it); ``drained`` is set once a
    stopping session has sent everything, or its link was lost.
    """

    def __init__(self, session: SttSession) -> None:
        self._session = session
        self.ready = asyncio.Event()
        self.progress = asyncio.Event()
        self.drained = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        #: The task is between a wake-up and its next wait: send_now leaves the writing to it.
        self.busy = False

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._loop(),
                                            name=f"stt-sender:{self._session.speaker}")

    def send_now(self) -> None:
        """Audio was queued: write what is due here (see :meth:`_Link.write_now`) when the
        sender task is idle, else leave it to the task. This saves a task step per chunk."""
        session, core = self._session, self._session.core
        conn = session.link
        if (self.busy or session.state is not SttState.STREAMING or conn is None
                or conn.lost):
            self.ready.set()
            return
        while (chunk := core.next_chunk()) is not None:
            start, pcm = chunk
            try:
                written = conn.write_now(pcm, core.sample_rate)
            except socketio.exceptions.SocketIOError as exc:
                self._failed(conn, exc)
                return
            if not written:
                self.ready.set()
                return
            self._sent(conn, start, pcm, direct=True)

    async def _loop(self) -> None:
        while True:
            await self.ready.wait()
            self.ready.clear()
            self.busy = True
            try:
                await self._send_due()
            finally:
                self.busy = False

    async def _send_due(self) -> None:
        session, core = self._session, self._session.core
        while session.state in (SttState.STREAMING, SttState.STOPPING):
            conn = session.link
            chunk = core.next_chunk()
            if conn is None or conn.lost or chunk is None:
                break
            start, pcm = chunk
            try:
                direct = await conn.send_audio(pcm, core.sample_rate)
            except socketio.exceptions.SocketIOError as exc:
                self._failed(conn, exc)
                break
            self._sent(conn, start, pcm, direct=direct)
        if session.state is SttState.STOPPING and core.unsent_samples <= 0:
            self.drained.set()

    def _sent(self, conn: _Link, start: int, pcm: bytes, *, direct: bool) -> None:
        """A chunk went out on ``conn``: the cursor moves on, unless a restart moved it."""
        session, core = self._session, self._session.core
        if session.link is conn and core.sent(start, len(pcm)):
            core.stats.chunks_direct += direct
            self.progress.set()

    def _failed(self, conn: _Link, exc: Exception) -> None:
        self._session.link_lost(conn, SttUnavailable(f"send failed: {exc}"))

    async def all_sent(self, within: float) -> None:
        """Wake the loop and wait (bounded) until everything queued went out."""
        self.drained.clear()  # may be left set by an earlier connection's loss
        self.ready.set()
        if self._session.core.unsent_samples > 0:
            await asyncio.wait_for(self.drained.wait(), within)

    async def aclose(self) -> None:
        task, self.task = self.task, None
        await _cancel(task)


class _Reconnector:
    """The retry loop after a start: back off, connect, start a new upstream session (whose
    audio the session re-sends from the last commit), until it streams again, the key is
    rejected (FAILED) or the session closes it."""

    def __init__(self, session: SttSession, backoff: Backoff) -> None:
        self._session = session
        self.backoff = backoff
        self.task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def begin(self, old: _Link | None, first_attempt: int | None = None, *,
              immediate: bool = False, wait_for_speech: bool = False) -> None:
        """``immediate``: the first attempt without a delay (the upstream ended a session in
        the ordinary course); ``wait_for_speech``: not before new audio is queued."""
        self.task = asyncio.create_task(
            self._run(old, first_attempt, immediate, wait_for_speech),
            name=f"stt-reconnect:{self._session.speaker}")

    async def _run(self, old: _Link | None, first_attempt: int | None, immediate: bool,
                   wait_for_speech: bool) -> None:
        session = self._session
        if old is not None:
            await session._drop_connection(old)
        if first_attempt is not None:
            self.backoff.reset()
            self.backoff.failures = first_attempt
        if wait_for_speech:
            session._dormant = True
            session._audio.clear()
            if session.core.unsent_samples <= 0:  # (speech may have come meanwhile)
                await session._audio.wait()
            session._dormant = False
        while not session._shutting_down and session.state is SttState.RECONNECTING:
            if immediate:
                immediate = False
                delay, attempt = 0.0, self.backoff.failures
            else:
                delay = self.backoff.next()  # jittered: spreads a fleet's retries
                attempt = self.backoff.failures
            log.info("stt[%s] reconnect attempt %d in %.2f s", session.speaker, attempt, delay)
            await asyncio.sleep(delay)
            try:
                await session._connect_and_start(first=False)
            except SttAuthError as exc:
                session._set_state(SttState.FAILED, exc)
                return
            except SttError as exc:
                _reraise_lost_cancel(exc)
                log.info("stt[%s] reconnect attempt %d failed: %s", session.speaker, attempt,
                         exc)
                continue
            if session._shutting_down or session.state is not SttState.RECONNECTING:
                if session.link is not None:
                    await session._drop_connection(session.link)
                return
            session.stats.reconnects += 1
            session._set_state(SttState.STREAMING)
            return

    async def aclose(self) -> None:
        task, self.task = self.task, None
        await _cancel(task)


class _UpstreamErrors:
    """Applies what :class:`~bot.stt.upstream.ErrorPolicy` decides about an upstream ``error``
    message: fail for good, renew at once or once speech resumes, or reconnect with backoff."""

    def __init__(self, session: SttSession) -> None:
        self._session = session
        #: What an upstream error code means (it remembers the last session limit).
        self.policy = ErrorPolicy()
        #: Links closing in the background after a permanent error (awaited by a shutdown).
        self.closing: set[asyncio.Task[None]] = set()

    def handle(self, link: _Link, error: UpstreamError) -> None:
        """An upstream ``error`` message, handled as :class:`ErrorPolicy` decides by its code
        (issue 12 item 16)."""
        s = self._session
        code, detail = error.code, error.detail
        if self.policy.names_chunks(code):
            chunks = ", ".join(f"{start / s.sample_rate:.2f} s ({nbytes} bytes)"
                               for start, nbytes in s.core.recent_chunks)
            log.warning("stt[%s] the upstream rejected audio (%s); last chunks sent at stream "
                        "time %s", s.speaker, detail, chunks or "none")
        action = self.policy.decide(code, s.stats.commits)
        if action is Action.FAIL:
            text = PERMANENT_ERRORS[code]
            exc: SttError = (SttAuthError(text) if code == "auth_error"
                             else SttSessionError(text, permanent=True))
            exc.upstream_code = code  # type: ignore[attr-defined]  # read by the StartGate's owner
            log.error("stt[%s] %s", s.speaker, text)
            self._fail(link, exc)
        elif action is Action.RENEW:
            # The upstream's session length ran out: a new session at once, re-sending what
            # is unconfirmed; not trouble to report.
            log.info("stt[%s] upstream session limit reached; starting a new session",
                     s.speaker)
            self._renew(link, SttSessionRenewed(f"cantonese.ai: {detail}"), wait_for_speech=False)
        elif action is Action.RENEW_ON_SPEECH:
            log.info("stt[%s] upstream closed the session for inactivity; reopening when "
                     "speech resumes", s.speaker)
            self._renew(link, SttSessionRenewed(f"cantonese.ai: {detail}"), wait_for_speech=True)
        else:
            s.link_lost(link, SttSessionError(f"cantonese.ai error ({detail})"))

    def _fail(self, link: _Link, error: SttError) -> None:
        """An upstream error no retry can fix: FAILED, said once, no reconnect."""
        s = self._session
        link.fail(error)
        s.core.connection_lost()
        s._sender.drained.set()
        if s.state in (SttState.STREAMING, SttState.STOPPING, SttState.RECONNECTING):
            s._set_state(SttState.FAILED, error)
        self._close_in_background(link)

    def _renew(self, link: _Link, error: SttError, *, wait_for_speech: bool) -> None:
        """A quiet new upstream session: at once, or once speech resumes (no notice)."""
        s = self._session
        link.fail(error)
        s.core.connection_lost()
        s._sender.drained.set()
        if s.state is not SttState.STREAMING or s._stop_requested:
            return  # a stop in progress reconnects by itself within its deadline
        s._set_state(SttState.RECONNECTING)  # no error: nothing to tell the channel
        s._reconnector.begin(link, immediate=True,
                             wait_for_speech=wait_for_speech
                             and s.core.unconfirmed_speech_seconds() <= 0)

    def _close_in_background(self, link: _Link) -> None:
        s = self._session
        task = asyncio.create_task(s._drop_connection(link), name=f"stt-close:{s.speaker}")
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)


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
        key: SpeakerKey | None = None,
        line_numbers: Iterator[int] | None = None,
        silence_tail_s: float | None = None,
    ) -> None:
        self.core = SttCore(
            sample_rate=sample_rate, speaker=speaker,
            key=key if key is not None else speaker_id if speaker_id is not None else speaker,
            speaker_id=speaker_id, stream_offset=stream_offset,
            max_buffer_seconds=max_buffer_seconds, line_numbers=line_numbers,
            silence_tail_s=silence_tail_s,
        )
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
        #: Reconnects after a start back off here; a start that worked for HEALTHY_AFTER_S
        #: seconds starts again from the initial delay.
        self.backoff = Backoff(reconnect_initial_delay, reconnect_max_delay,
                               rng=rng or random.Random(), healthy_after=HEALTHY_AFTER_S)
        self._reconnector = _Reconnector(self, self.backoff)
        self.state = SttState.IDLE
        self.stats = self.core.stats
        #: The last error a state change reported (named when audio is lost).
        self.last_error: CantobotError | None = None
        self.link: _Link | None = None
        self._streaming = asyncio.Event()
        self._sender = _Sender(self)
        self._stopper = Stopper(self)
        self._stop_requested = False
        #: Set when audio is queued: a session closed for inactivity waits on it.
        self._audio = asyncio.Event()
        #: Closed by the upstream for inactivity, waiting for speech to reopen.
        self._dormant = False
        self._errors = _UpstreamErrors(self)
        self._shutting_down = False
        self._discarded = False

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
        self._sender.start()

    def send_audio(self, pcm: bytes) -> None:
        """Queue mono int16 LE PCM at ``sample_rate``; never blocks; ignored once stopping."""
        if len(pcm) % BYTES_PER_SAMPLE:
            raise ValueError(f"16-bit PCM must have an even byte count, got {len(pcm)}")
        if self._stop_requested or self.state is SttState.CLOSED or not pcm:
            return
        self.core.append(pcm)
        if self._dormant and self.core.unsent_samples > 0:
            self._audio.set()  # speech resumed: reopen
        self._sender.send_now()

    @property
    def unconfirmed_samples(self) -> int:
        """Audio kept until a commit confirms it (also what a new upstream session re-sends)."""
        return self.core.unconfirmed_samples

    def startable(self) -> bool:
        """Not started yet (or the last start failed), and neither stopped nor closed."""
        return not self._stop_requested and self.state in (SttState.IDLE, SttState.FAILED)

    async def drain(self, max_ahead_seconds: float = 0.0) -> None:
        """Wait until at most ``max_ahead_seconds`` of queued audio is unsent.

        Backpressure for a producer faster than real time (``replay --speed 0``): without it the
        whole file would sit in the unconfirmed buffer and hit its bound. Returns at once when
        the session cannot send (stopped, closed or failed).

        Always takes at least one step of the event loop. While the socket takes every chunk
        as it is queued (a fast link does) nothing is unsent, and a producer looping on a drain
        that did not suspend would hold the loop for the whole file: no transcript and no ping
        from the server would be read until the end, lines came out placed where the sending
        had got to, and a file longer than the server's ping timeout lost its connection with
        the lines waiting on it.
        """
        limit = round(max_ahead_seconds * self.sample_rate)
        core = self.core
        sending = (SttState.CONNECTING, SttState.STARTING, SttState.STREAMING,
                   SttState.RECONNECTING)
        await asyncio.sleep(0)
        while core.unsent_samples > limit and self.state in sending:
            self._sender.progress.clear()
            await self._sender.progress.wait()

    async def stop(self, within: float | None = None) -> None:
        """Send what is queued, stop the session, await its last commits; idempotent.

        Bounded by ``within`` seconds (default ``stop_timeout``) overall; a reconnect in progress is
        waited for within it. A stop that gives up with speech unconfirmed says so (FAILED with
        :class:`SttAudioLost`); see :class:`~bot.stt.stopping.Stopper`.
        """
        await self._stopper.stop(within)

    def discard(self) -> None:
        """Forget this speaker now (an opt-out): buffered audio is dropped unsent, nothing more
        is sent, and no transcript event (partial, line, twin) is emitted from here on, even
        if the service still sends one. Follow with :meth:`aclose` to disconnect."""
        self._discarded = True
        self._stop_requested = True
        self.core.discard()

    async def aclose(self) -> None:
        """Close now: cancel the tasks, disconnect; idempotent (no stop-session sent)."""
        self._stop_requested = True
        await self._shutdown()

    # -- state -------------------------------------------------------------------------------

    def _set_state(self, new: SttState, error: CantobotError | None = None) -> None:
        if error is not None and not isinstance(error, SttAudioLost):
            self.last_error = error
        if not change(TRANSITIONS, self.state, new, label=f"stt[{self.speaker}]", log=log,
                      why=error):
            return
        self.state = new
        self._sender.progress.set()
        if new is SttState.STREAMING:
            self._streaming.set()
            self.backoff.succeeded()
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
        conn = self.link = _Link(self)
        try:
            await conn.connect(self.url, self._api_key, self.connect_timeout)
            if first:
                self._set_state(SttState.STARTING)
            await conn.start_session(self.sample_rate, self.start_timeout)
        except BaseException:
            await self._drop_connection(conn)
            raise
        # Re-send the unconfirmed audio first; its upstream times start at the buffer's start.
        self.core.restart()
        self._sender.ready.set()

    async def _drop_connection(self, conn: _Link) -> None:
        """Forget and close one connection (its late events are then ignored)."""
        if self.link is conn:
            self.link = None
        await conn.close()

    # -- what the current link reports -----------------------------------------------------------

    def link_current(self, link: _Link) -> bool:
        return self.link is link

    def link_stopping(self) -> bool:
        return self.state is SttState.STOPPING

    def link_transcript(self, link: _Link, payload: object) -> None:
        events, session_id = self.core.receive(payload)
        if session_id is not None:
            link.session_id = session_id
        for event in events:
            self._emit(event)
        error = self.core.take_error()
        if error is not None and self.link is link:
            self._errors.handle(link, error)

    def link_lost(self, conn: _Link, error: SttError) -> None:
        """The connection or its upstream session is gone: fail a wait, or reconnect."""
        conn.fail(error)
        self.core.connection_lost()  # no twin can come any more
        self._sender.drained.set()  # wake a stop() waiting for the sender
        if self.state is SttState.STREAMING and not self._stop_requested:
            log.warning("stt[%s] %s; reconnecting", self.speaker, error)
            self._set_state(SttState.RECONNECTING, error)
            self._reconnector.begin(conn)

    # -- sending -----------------------------------------------------------------------------

    async def _shutdown(self, final: SttState = SttState.CLOSED) -> None:
        self._shutting_down = True
        await self._reconnector.aclose()
        await self._sender.aclose()
        if self.link is not None:
            await self._drop_connection(self.link)
        if self._errors.closing:
            await asyncio.gather(*self._errors.closing, return_exceptions=True)
        if self.state is not SttState.CLOSED:
            self._set_state(final)
