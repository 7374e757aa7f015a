"""Prototype of a cheaper upstream send path, measured by row 2 against the product's.

Today (``bot.stt.session.SttSession``) every 100 ms chunk costs three task steps: ``send_audio``
sets the sender's event, the session's sender task wakes and awaits ``_Link.send_audio`` ->
``AsyncClient.emit`` (python-socketio JSON-encodes a ~4 KB string and puts the packet on
python-engineio's queue), and engineio's write task wakes through
``asyncio.wait_for(queue.get())`` (on Python 3.11 a new task per packet) to write the frame.

:class:`BatchedUplink` does the same bookkeeping (``SttCore.append`` / ``next_chunk`` /
``sent``, the sender's ``progress`` event) but emits from **one** task per event-loop
iteration for all sessions that got audio in that iteration: the Socket.IO text is built by
:func:`bot.stt.protocol.audio_chunk_event_json` and written with the connection's own aiohttp
websocket (``await ws.send_str``, which completes without suspending unless the socket's buffer
is full). Same bytes on the wire, same order per session (audio only flows through here while
the session is STREAMING with nothing else unsent; anything else falls back to the session's
own sender).

It reaches into the session's private state on purpose: it is the measured proposal for a
change to ``bot/stt/session.py``, not a second implementation to ship.
"""

from __future__ import annotations

import asyncio
import logging

from bot.stt import protocol as p
from bot.stt.core import BYTES_PER_SAMPLE
from bot.stt.session import SttSession, SttState

log = logging.getLogger(__name__)

#: Engine.IO "message" (4) + Socket.IO "event" (2) for the default namespace.
_EVENT_PREFIX = "42"


class BatchedUplink:
    """One flush task per loop iteration writes every session's newly queued chunk."""

    def __init__(self) -> None:
        self._ready: list[SttSession] = []
        self._pending: set[SttSession] = set()
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.flushes = 0
        self.fallbacks = 0

    def send_audio(self, session: SttSession, pcm: bytes) -> None:
        """What ``SttSession.send_audio`` would do: queue, then hand over to one flush."""
        s = session
        if len(pcm) % BYTES_PER_SAMPLE:
            raise ValueError(f"16-bit PCM must have an even byte count, got {len(pcm)}")
        if s._stop_requested or s.state is SttState.CLOSED or not pcm:
            return
        core = s.core
        idle = s.state is SttState.STREAMING and core.unsent_samples <= 0
        core.append(pcm)
        if s in self._pending:
            return  # the flush already due sends everything up to the end of the buffer
        if not idle:
            # The session's own sender is (or must be) at work: a reconnect, a backlog, a
            # chunk in flight. Sending here too could send a chunk twice.
            self.fallbacks += 1
            s._sender.ready.set()
            return
        self._pending.add(s)
        self._ready.append(s)
        if not self._scheduled:
            self._scheduled = True
            task = asyncio.get_running_loop().create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        self._scheduled = False
        ready, self._ready = self._ready, []
        self.flushes += 1
        for s in ready:
            self._pending.discard(s)
            link, core = s.link, s.core
            while True:
                if link is None or link.lost or s.state is not SttState.STREAMING:
                    s._sender.ready.set()
                    break
                chunk = core.next_chunk()
                if chunk is None:
                    break
                start, pcm = chunk
                try:
                    await link.client.eio.ws.send_str(
                        _EVENT_PREFIX + p.audio_chunk_event_json(pcm, core.sample_rate))
                except Exception as exc:  # noqa: BLE001 - the session's own path reconnects
                    log.warning("uplink write failed for %s: %s", s.speaker, exc)
                    s._sender.ready.set()
                    break
                if s.link is not link or not core.sent(start, len(pcm)):
                    break
                s._sender.progress.set()

    async def aclose(self) -> None:
        """Wait for flushes in flight."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
