"""Speakers: who is heard, and each heard member's stream to the STT service.

Owns the :class:`~bot.pipeline.Transcriber` of one meeting (one
:class:`~bot.pipeline.SpeakerStream` per member, opened on their first audio and finished when
they go quiet), the opt-out checks (the cached list decides whether audio is decoded at all;
storage, shared by every process, is asked again before anything of a new stream is sent), the
process-wide capacity gate (:class:`~bot.pipeline.SessionSlots`) and the names shown for
members. A stream closed before it could start raises :class:`StreamClosed`, which is not
trouble to report; the retries of a failed first start belong to the session. STT events
go to the ``on_event`` callback it is given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import discord
import numpy as np

from bot.config import Config
from bot.errors import StreamClosed
from bot.meeting.tasks import TaskOwner
from bot.pipeline import EventCallback, SessionSlots, SpeakerStream, Transcriber
from bot.transcript.format import nickname_with_notice, webhook_username

__all__ = ["Speakers", "StreamClosed"]


def _fold(name: str) -> str:
    """Two names that would read alike as webhook personas compare equal."""
    return " ".join(webhook_username(name).casefold().split())

log = logging.getLogger(__name__)


class Speakers:
    """The member streams of one meeting; see the module docstring."""

    def __init__(
        self,
        *,
        config: Config,
        guild: discord.Guild,
        tasks: TaskOwner,
        on_event: EventCallback,
        is_opted_out: Callable[[int], bool],
        confirm_opt_out: Callable[[int], Awaitable[bool]] | None,
        accepting: Callable[[], bool],
        notice_once: Callable[[str, str], None],
        forget_voice: Callable[[int], None],
        slots: SessionSlots | None = None,
        t0: float | None = None,
    ) -> None:
        self.config = config
        self.guild = guild
        self._tasks = tasks
        self._is_opted_out = is_opted_out
        self._confirm_opt_out = confirm_opt_out
        self._accepting = accepting
        self._notice_once = notice_once
        self._forget_voice = forget_voice
        self._t0 = time.monotonic() if t0 is None else t0
        self._names: dict[int, str] = {}
        #: user id -> (display name, the unique label shown for it in this meeting)
        self._labels: dict[int, tuple[str, str]] = {}
        self.transcriber = Transcriber(config.stt, on_event, slots=slots,
                                       on_wait=self._on_capacity_wait)

    # -- who is heard ----------------------------------------------------------------------------

    def is_ignored(self, user_id: int) -> bool:
        """Opted out, or a bot: never decoded."""
        if self._is_opted_out(user_id):
            return True
        member = self.guild.get_member(user_id)
        return member is not None and member.bot

    def display(self, user_id: int) -> tuple[str, str | None]:
        """(the name shown for this member, avatar URL); the last known once they have left.

        Keyed by user id: two members with the same display name are told apart (``alice``,
        ``alice (2)``, in order of first speech), and nobody is shown under the bot's own name
        (a member nicknamed ``Cantobot [transcribing]`` gets a ``(2)``); see :meth:`label`.
        """
        member = self.guild.get_member(user_id)
        if member is None:
            return self.label(user_id, self._names.get(user_id, f"user-{user_id}")), None
        self._names[user_id] = member.display_name
        return self.label(user_id, member.display_name), member.display_avatar.url

    def _reserved(self) -> set[str]:
        me = self.guild.me
        if me is None:
            return {_fold("cantobot")}
        names = {me.name, me.display_name, nickname_with_notice(me.name),
                 nickname_with_notice(me.display_name)}
        if me.global_name:
            names.add(me.global_name)
        return {_fold(n) for n in names}

    def label(self, user_id: int, name: str) -> str:
        """The unique name shown for ``user_id`` in this meeting (captions, threads, webhook
        persona, stored lines); stable while their display name stays the same."""
        known = self._labels.get(user_id)
        if known is not None and known[0] == name:
            return known[1]
        taken = {_fold(label) for uid, (_, label) in self._labels.items() if uid != user_id}
        taken |= self._reserved()
        candidate, n = name, 1
        while _fold(candidate) in taken:
            n += 1
            candidate = f"{name} ({n})"
        self._labels[user_id] = (name, candidate)
        return candidate

    # -- audio -----------------------------------------------------------------------------------

    def on_audio(self, user_id: int, pcm: np.ndarray, rate: int) -> None:
        """A member's decoded audio at ``rate``: to their stream, opened on first audio."""
        stream = self.transcriber.get(user_id)
        if stream is None:
            if not self._accepting():
                return
            name, _ = self.display(user_id)
            stream = self.transcriber.open(
                user_id,
                speaker=name,
                speaker_id=user_id,
                in_rate=rate,
                stream_offset=time.monotonic() - self._t0 - len(pcm) / rate,
            )
            log.info("guild %s: speaker %s started", self.guild.id, name)
            self._tasks.spawn(self._start_stream(stream), f"start-stream-{user_id}")
        if rate == self.config.stt.sample_rate:
            stream.feed_converted(pcm)
        else:
            stream.feed(pcm)

    def on_idle(self, user_id: int) -> None:
        """A member went quiet: finish their stream without making anyone wait."""
        # A quiet speaker's session may be mid-reconnect (STT outage): keep their unconfirmed
        # audio as long as the buffer bound allows rather than the short stop timeout.
        stt = self.config.stt
        self.transcriber.finish_in_background(
            user_id, within=max(stt.stop_timeout, stt.max_buffer_seconds))

    def forget(self, user_id: int) -> None:
        """A member opted out mid-meeting: from this instant nothing they said is sent, posted
        or stored. Their voice is no longer decoded, their buffered audio is discarded unsent,
        their session is closed without waiting for results (a stream still finishing after
        they went quiet too), and a result that still comes is dropped."""
        self._forget_voice(user_id)
        self.transcriber.drop(user_id)

    def opted_out(self, user_id: int) -> bool:
        return self._is_opted_out(user_id)

    # -- starting streams ------------------------------------------------------------------------

    async def _start_stream(self, stream: SpeakerStream) -> None:
        """Check the opt-out with storage, then start the stream (the session retries a failed
        first start, one backoff for the whole meeting; see :class:`~bot.stt.session.StartGate`)."""
        uid, confirm = stream.speaker_id, self._confirm_opt_out
        if uid is not None and confirm is not None and await confirm(uid):
            # Opted out through another process: nothing of this stream is sent anywhere.
            self._forget_voice(uid)
            await self.transcriber.discard(uid)
            return
        if self._accepting():
            await stream.keep_starting()

    def _on_capacity_wait(self, stream: SpeakerStream, position: int) -> None:
        limit = self.config.stt.max_sessions
        log.warning("guild %s: %s waits for an STT session (place %d; %d in use)", self.guild.id,
                    stream.speaker, position, limit)
        self._notice_once("stt-capacity", f"\N{HOURGLASS WITH FLOWING SAND} This bot is at its "
                          f"limit of {limit} simultaneous speakers, so new speakers wait their "
                          "turn and are transcribed as others pause; what they say meanwhile is "
                          "kept.")

    # -- ending ----------------------------------------------------------------------------------

    async def finish_all(self) -> None:
        """Flush every stream: the last audio is sent, the last commits awaited (bounded)."""
        await self.transcriber.finish_all()

    async def aclose(self) -> None:
        await self.transcriber.aclose()

    def streams(self) -> list[SpeakerStream]:
        return self.transcriber.streams()
