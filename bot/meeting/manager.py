"""`MeetingManager`: the process's meetings, one per guild, and the opt-out list.

Several processes (Discord shards) may share one database, so nothing here assumes it is the only
process: opt-outs live in storage and :class:`MeetingManager` keeps only a cache of them. Each new
speaker stream asks storage before anything of it is sent upstream (so an opt-out made through
another process counts from that person's next utterance), and the cache is refreshed every
:data:`OPT_OUT_REFRESH` seconds (so someone opting out elsewhere mid-utterance is dropped within
that time). One query per new stream and one per refresh are cheap next to the audio; a
LISTEN/NOTIFY channel would be PostgreSQL-only. The STT session cap (``stt.max_sessions``) is per
process: one :class:`~bot.pipeline.SessionSlots` is shared by the process's meetings.

The manager also hears discord.py's voice-state updates for its meetings
(:meth:`MeetingManager.on_voice_state_update`, added as a listener by the bot) and ends the
meetings a crashed run left open, posting their minutes the one way minutes are posted
(:class:`~bot.meeting.ledger.MinutesPost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from datetime import timedelta

import discord

from bot.config import Config
from bot.errors import CantobotError
from bot.meeting.core import Meeting
from bot.meeting.ledger import MinutesPost
from bot.meeting.state import MeetingError
from bot.pipeline import SessionSlots
from bot.sinks.payloads import minutes_nonce
from bot.storage import StorageBackend
from bot.transcript.model import Minutes
from bot.transcript.script import PLAIN, Readability, resolve_readability

log = logging.getLogger(__name__)

#: Seconds between re-reads of the opt-out list from storage (another process may change it).
OPT_OUT_REFRESH = 5.0
#: Seconds of ``shutdown_timeout`` kept back from Discord for a meeting's own clean-up
#: (leaving voice, stopping tasks) after its minutes were tried.
SHUTDOWN_RESERVE = 1.0


class MeetingManager:
    """The bot's meetings, one per guild, and the opt-out list (kept in storage)."""

    def __init__(self, config: Config, storage: StorageBackend) -> None:
        self.config = config
        self.storage = storage
        self._meetings: dict[int, Meeting] = {}
        self._opted_out: set[int] = set()
        #: Opted out here, storage write in flight.
        self._storing_opt_outs: set[int] = set()
        #: The process's STT session cap, shared by every meeting.
        self.slots = SessionSlots(config.stt.max_sessions)
        self._refresher: asyncio.Task[None] | None = None

    async def recover_unfinished(self, get_guild: Callable[[int], discord.Guild | None]) -> int:
        """End meetings a previous run left open (a crash) and post their minutes.

        Only guilds this process can see (its shards) are touched; a meeting live here is
        skipped. The meeting ends at its last stored line. Returns how many were recovered.
        """
        recovered = 0
        for info in await self.storage.unfinished_meetings():
            guild = get_guild(info.guild_id)
            if guild is None or info.guild_id in self._meetings:
                continue
            minutes = await self.storage.minutes(info.id)
            last = max((seg.end for seg in minutes.segments), default=0.0)
            ended = info.started_at + timedelta(seconds=last)
            await self.storage.end_meeting(info.id, ended)
            recovered += 1
            minutes = await self.storage.minutes(info.id)
            log.warning("guild %s: meeting %d was left open by a previous run (%d lines); "
                        "ended and posting its minutes", guild.id, info.id, len(minutes.segments))
            channel = guild.get_channel(info.text_channel_id)
            if not isinstance(channel, discord.TextChannel):
                continue
            shown = resolve_readability(None, await self.storage.guild_settings(guild.id),
                                        self.config.transcribe.readability)
            post = MinutesPost.of(minutes, preface=(
                f"\N{WARNING SIGN} The bot restarted during meeting #{info.number}; "
                "everything said before that was kept. Minutes so far:\n"), readability=shown)
            try:
                # The minutes' own nonce: if a shutdown's post reached Discord after all (its
                # answer came too late), Discord returns that message instead of a second.
                await post.send(functools.partial(channel.send, nonce=minutes_nonce(info.id)))
            except discord.HTTPException as exc:
                log.warning("guild %s: could not post recovered minutes: %s", guild.id, exc)
        return recovered

    async def load(self) -> None:
        """Read the opt-outs, then keep them fresh (see the module docstring)."""
        self._opted_out = await self.storage.opted_out_users()
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="opt-out-refresh")

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(OPT_OUT_REFRESH)
            try:
                await self.refresh_opt_outs()
            except CantobotError as exc:
                log.warning("opt-out refresh failed (%s); keeping the cached list", exc)

    async def refresh_opt_outs(self) -> None:
        """Re-read the opt-outs; anyone newly opted out (by any process) is dropped now."""
        current = await self.storage.opted_out_users() | self._storing_opt_outs
        newly = current - self._opted_out
        self._opted_out = current
        for user_id in newly:
            log.info("user %s opted out elsewhere: dropping their streams", user_id)
            for meeting in self._meetings.values():
                meeting.forget_member(user_id)

    async def confirm_opt_out(self, user_id: int) -> bool:
        """Ask storage (the truth shared by every process); the cache follows the answer."""
        try:
            opted_out = await self.storage.is_opted_out(user_id)
        except CantobotError as exc:
            log.warning("opt-out check failed (%s); using the cached list", exc)
            return user_id in self._opted_out
        if opted_out:
            self._opted_out.add(user_id)
        else:
            self._opted_out.discard(user_id)
        return opted_out

    def _forget(self, meeting: Meeting) -> None:
        """A meeting ended (stopped or failed): it no longer holds its guild."""
        self._meetings.pop(meeting.guild.id, None)

    def get(self, guild_id: int) -> Meeting | None:
        return self._meetings.get(guild_id)

    def is_opted_out(self, user_id: int) -> bool:
        return user_id in self._opted_out

    async def set_opt_out(self, user_id: int, opted_out: bool) -> None:
        """An opt-out counts from this instant in this process (before the storage write, which
        may take a while: what the member says meanwhile is not sent); an opt-in only once it
        is stored. A failed write is raised and the cache follows storage again."""
        if opted_out:
            self._opted_out.add(user_id)
            self._storing_opt_outs.add(user_id)  # a refresh meanwhile must not undo it
            for meeting in self._meetings.values():
                meeting.forget_member(user_id)
        try:
            await self.storage.set_opt_out(user_id, opted_out)
        except BaseException:
            if opted_out:  # not stored: the member is told so, and the cache follows storage
                self._opted_out.discard(user_id)
            raise
        finally:
            self._storing_opt_outs.discard(user_id)
        if not opted_out:
            self._opted_out.discard(user_id)

    async def start(
        self,
        *,
        guild: discord.Guild,
        voice_channel: discord.VoiceChannel | discord.StageChannel,
        text_channel: discord.TextChannel,
        threads: bool,
        captions: bool,
        readability: Readability = PLAIN,
        title: str | None = None,
    ) -> Meeting:
        if guild.id in self._meetings:
            current = self._meetings[guild.id]
            raise MeetingError(
                f"already transcribing {current.voice_channel.name} into "
                f"#{current.text_channel.name}; use /transcribe stop first")
        meeting = Meeting(
            config=self.config, storage=self.storage, guild=guild,
            voice_channel=voice_channel, text_channel=text_channel,
            threads=threads, captions=captions, is_opted_out=self.is_opted_out,
            on_ended=self._forget,
            slots=self.slots, confirm_opt_out=self.confirm_opt_out,
            readability=readability, title=title,
        )
        self._meetings[guild.id] = meeting
        try:
            await meeting.start()
        except BaseException:
            self._meetings.pop(guild.id, None)
            raise
        return meeting

    async def stop(self, guild_id: int, reason: str = "stopped") -> Minutes | None:
        meeting = self._meetings.get(guild_id)
        if meeting is None:
            return None
        return await meeting.stop(reason)

    async def shutdown(self, within: float | None = None) -> None:
        """Flush every meeting concurrently (SIGTERM), within ``within`` seconds (default
        ``transcribe.shutdown_timeout``): stop-session and the last commits stored first, then
        the minutes and queued posts get what is left of the time. Whatever Discord cannot take
        by then is left for the next start: the meeting stays open in storage and
        :meth:`recover_unfinished` posts its minutes."""
        timeout = self.config.transcribe.shutdown_timeout if within is None else within
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        meetings = list(self._meetings.values())
        if not meetings:
            return
        log.info("shutting down: flushing %d meeting(s) (at most %.1f s)", len(meetings),
                 timeout)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        for meeting in meetings:
            # Discord's part ends a little early, so a meeting's own clean-up fits in the bound.
            meeting.ledger.deadline = end - min(SHUTDOWN_RESERVE, timeout / 4)
        stops = [loop.create_task(m.stop("bot shutting down"), name=f"shutdown-{m.guild.id}")
                 for m in meetings]
        _, late = await asyncio.wait(stops, timeout=max(0.0, end - loop.time()))
        for task in late:
            task.cancel()
        if late:
            log.error("shutting down: %d meeting(s) did not finish within %.1f s; they stay "
                      "open in storage and the next start posts their minutes", len(late),
                      timeout)
        results = await asyncio.gather(*stops, return_exceptions=True)
        for meeting, result in zip(meetings, results, strict=True):
            if isinstance(result, Exception):
                log.error("guild %s: stopping the meeting at shutdown failed", meeting.guild.id,
                          exc_info=result)

    def meetings(self) -> list[Meeting]:
        return list(self._meetings.values())

    async def on_voice_state_update(self, member: discord.Member, before: discord.VoiceState,
                                    after: discord.VoiceState) -> None:
        """discord.py's voice-state event (registered by the bot): a member joined, left or was
        moved; the guild's meeting checks for an empty channel and follows a move of the bot."""
        meeting = self._meetings.get(member.guild.id)
        if meeting is not None:
            meeting.check_empty()
