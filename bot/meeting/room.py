"""The room a meeting hears: consent before audio, following a move, ending when empty.

Kept apart from :class:`~bot.meeting.core.Meeting` so the consent-on-move rules can be read and
tested alone: audio of a room is heard only once its consent notice was accepted by Discord;
after a move the new room is told first (or the meeting ends, when ``follow_moves`` is off or
the notice could not be posted); a room with no humans left ends the meeting after a while.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import discord

from bot.meeting.consent import ConsentNotices, Encryption, consent_notices
from bot.meeting.tasks import TaskOwner
from bot.transcript.escape import ERROR_BUDGET, outside

log = logging.getLogger(__name__)

VoiceChannel = discord.VoiceChannel | discord.StageChannel


class Intake(Protocol):
    """What the room needs of the voice intake."""

    @property
    def channel(self) -> VoiceChannel: ...

    def follow_move(self) -> VoiceChannel | None: ...

    async def settle(self, *, moved: bool) -> Encryption: ...

    def admit(self, channel_id: int) -> None: ...

    def humans_in_channel(self) -> int: ...


class Notices(Protocol):
    """What the room needs of the ledger: the meeting's number and the transcript channel."""

    @property
    def number(self) -> int: ...

    def say(self, text: str) -> None: ...

    async def post_consent(self, voice_channel: VoiceChannel,
                           notices: ConsentNotices) -> str | None: ...


@dataclass(kw_only=True, eq=False)
class Room:
    """Consent notice per room, the move rules and the empty-channel timer of one meeting."""

    guild_id: int
    intake: Intake
    notices: Notices
    tasks: TaskOwner
    text_channel_name: str
    threads: bool
    stt_url: str
    follow_moves: bool
    empty_timeout: float
    #: Whether the meeting is live (moves and empty rooms matter only then).
    is_live: Callable[[], bool]
    stop: Callable[[str], Coroutine[Any, Any, object]]
    _empty_timer: asyncio.TimerHandle | None = field(default=None, init=False)

    async def tell(self, channel: VoiceChannel, *, moved: bool) -> str | None:
        """Post the consent notice in the transcript channel and in the voice channel's chat;
        once Discord accepted both, that room's audio may go on. The reason when not."""
        encryption = await self.intake.settle(moved=moved)
        notices = consent_notices(
            voice_name=channel.name, text_channel_name=self.text_channel_name,
            number=self.notices.number, threads=self.threads, stt_url=self.stt_url,
            encryption=encryption, moved=moved)
        failure = await self.notices.post_consent(channel, notices)
        if failure is None and self.intake.channel.id == channel.id:
            self.intake.admit(channel.id)
            log.info("guild %s: consent notice accepted in %s; its audio is heard",
                     self.guild_id, channel.id)
        return failure

    def follow_move(self) -> None:
        """The bot may have been moved: follow (tell the new room first) or stop."""
        moved = self.intake.follow_move()
        if moved is None or not self.is_live():
            return
        if not self.follow_moves:
            self.notices.say(f"\N{WARNING SIGN} Moved to **{outside(moved.name)}**; "
                              "`transcribe.follow_moves` is off, so the meeting ends here.")
            self.tasks.spawn(self.stop("moved to another voice channel"), "stop-on-move")
            return
        self.tasks.spawn(self._follow(moved), f"consent-{moved.id}")

    async def _follow(self, channel: VoiceChannel) -> None:
        failure = await self.tell(channel, moved=True)
        if failure is not None and self.is_live():
            self.notices.say(f"\N{WARNING SIGN} {outside(failure, ERROR_BUDGET)} Nothing of "
                              "that room was sent; the meeting ends here.")
            await self.stop("consent notice not posted after a move")

    def check(self) -> None:
        """Called on voice state changes: follow a move; end by itself after a while with no
        humans in the room (the timer is dropped as soon as one is back)."""
        if not self.is_live():
            return
        self.follow_move()
        if self.intake.humans_in_channel() > 0:
            self.cancel_timer()
            return
        if self._empty_timer is None:
            loop = asyncio.get_running_loop()
            self._empty_timer = loop.call_later(
                self.empty_timeout,
                lambda: self.tasks.spawn(self.stop("voice channel empty"), "auto-stop"))

    def cancel_timer(self) -> None:
        """The meeting is stopping (or someone is back): no empty-channel stop."""
        if self._empty_timer is not None:
            self._empty_timer.cancel()
            self._empty_timer = None
