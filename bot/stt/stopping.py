"""Stopping one STT session within a deadline: send what is queued, stop the upstream session,
await its last commits, reconnect (and re-send) if the connection drops meanwhile, and say what
speech was lost if it gives up. Part of the Socket.IO adapter (:mod:`bot.stt.session`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from bot.errors import SttError, SttUnavailable
from bot.stt.events import StateChanged, SttAudioLost, SttSessionRenewed, SttState

if TYPE_CHECKING:
    from bot.stt.session import SttSession

# The session's logger: what a stop logs reads as the session's, as before.
log = logging.getLogger("bot.stt.session")


class Stopper:
    """One session's :meth:`~bot.stt.session.SttSession.stop`; one stop at a time."""

    def __init__(self, session: SttSession) -> None:
        self._session = session
        self._lock = asyncio.Lock()

    async def stop(self, within: float | None) -> None:
        """See :meth:`SttSession.stop`."""
        s = self._session
        async with self._lock:
            if s.state is SttState.CLOSED:
                return
            s._stop_requested = True
            loop = asyncio.get_running_loop()
            deadline = loop.time() + (s.stop_timeout if within is None else within)
            stopped = False  # the upstream committed everything and closed
            if s._dormant and s.core.unsent_samples <= 0:
                stopped = True  # closed for inactivity: nothing left to transcribe
            elif s.state not in (SttState.IDLE, SttState.FAILED):
                stopped = await self._until_stopped(deadline)
            lost = 0.0 if stopped else s.core.unconfirmed_speech_seconds()
            if lost > 0 and not s._discarded:
                self._report_loss(lost)
            await s._shutdown(SttState.FAILED if lost > 0 and not s._discarded
                              else SttState.CLOSED)

    async def _until_stopped(self, deadline: float) -> bool:
        """Stop the upstream session before ``deadline``, reconnecting as often as needed;
        True if it committed everything and closed."""
        s = self._session
        loop = asyncio.get_running_loop()
        attempt = 0
        while loop.time() < deadline:
            if s.state is SttState.RECONNECTING:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(s._streaming.wait(), deadline - loop.time())
            if s.state is not SttState.STREAMING:
                return False
            s._set_state(SttState.STOPPING)
            try:
                await self._drain_and_stop(deadline)
                return True
            except TimeoutError:
                log.warning("stt[%s] stop timed out waiting for the last commits", s.speaker)
                return False
            except SttError as exc:
                if exc.permanent:
                    return False  # an upstream error no retry can fix (the session FAILED)
                # The connection dropped while stopping: reconnect and re-send what is
                # unconfirmed, as mid-session, within the same deadline.
                quiet = isinstance(exc, SttSessionRenewed)
                attempt += 0 if quiet else 1
                log.log(logging.INFO if quiet else logging.WARNING,
                        "stt[%s] lost while stopping (%s); reconnecting", s.speaker, exc)
                if s._reconnector.running:
                    continue
                s._set_state(SttState.RECONNECTING, None if quiet else exc)
                s._reconnector.begin(s.link, first_attempt=max(0, attempt - 1),
                                     immediate=quiet)
        return False

    def _report_loss(self, seconds: float) -> None:
        """A stop gave up with speech unconfirmed: say for whom and how long (log, event)."""
        s = self._session
        why = (s.last_error.user_message if s.last_error is not None
               else "the speech-to-text service did not confirm it in time")
        loss = SttAudioLost(s.speaker, seconds, why)
        log.warning("stt[%s] gave up: %s", s.speaker, loss)
        s.stats.lost_seconds += seconds
        if s.state is SttState.FAILED:
            s._emit(StateChanged(s.speaker, SttState.FAILED, loss))
        else:
            s._set_state(SttState.FAILED, loss)

    async def _drain_and_stop(self, deadline: float) -> None:
        conn = self._session.link
        if conn is None:
            raise SttUnavailable("no connection to stop")
        loop = asyncio.get_running_loop()
        await self._session._sender.all_sent(max(0.0, deadline - loop.time()))
        await conn.stop_session(max(0.0, deadline - loop.time()))
