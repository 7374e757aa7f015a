"""`Meeting`: one guild's live transcription, wired from its parts.

    VoiceIntake --(member PCM, member idle)--> Speakers --(STT events)--> Ledger
    (voice channel, receiver, reconnect)       (streams, opt-outs, slots)  (storage, sink, notices)
    Room: consent notice per room, following a move, the empty-channel stop

Meeting owns none of the work: it builds the parts, routes STT events to the ledger, holds the
:class:`~bot.meeting.state.StateMachine` and the :class:`~bot.meeting.tasks.TaskOwner` every
part spawns into, and reads :meth:`Meeting.stop` as
drain -> flush -> close.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import discord
import numpy as np

from bot.config import Config
from bot.meeting.consent import format_privacy_code
from bot.meeting.intake import VoiceIntake
from bot.meeting.ledger import Ledger
from bot.meeting.room import Room
from bot.meeting.speakers import Speakers
from bot.meeting.state import MeetingError, MeetingState, MeetingStatus, StateMachine
from bot.meeting.tasks import TaskOwner
from bot.pipeline import SessionSlots, Transcriber
from bot.sinks.discord_sink import DiscordTranscriptSink
from bot.storage import StorageBackend
from bot.stt.session import (
    PartialText,
    SegmentCommitted,
    SegmentTimestamped,
    StateChanged,
    SttEvent,
)
from bot.transcript.model import Minutes
from bot.transcript.script import PLAIN, Readability
from bot.voice.client import VoiceListener
from bot.voice.receiver import VoiceReceiver

log = logging.getLogger(__name__)


class Meeting:
    """One guild's live transcription."""

    def __init__(
        self,
        *,
        config: Config,
        storage: StorageBackend,
        guild: discord.Guild,
        voice_channel: discord.VoiceChannel | discord.StageChannel,
        text_channel: discord.TextChannel,
        threads: bool,
        captions: bool,
        is_opted_out: Callable[[int], bool],
        on_ended: Callable[[Meeting], None] | None = None,
        slots: SessionSlots | None = None,
        confirm_opt_out: Callable[[int], Awaitable[bool]] | None = None,
        readability: Readability = PLAIN,
        title: str | None = None,
    ) -> None:
        self.config = config
        #: How lines and minutes are shown (script, Jyutping); storage keeps what was said.
        self.readability = readability
        self.title = title
        self.storage = storage
        self.guild = guild
        self.text_channel = text_channel
        self.threads = threads
        self.captions = captions
        self._on_ended = on_ended
        self._machine = StateMachine(f"guild {guild.id}: meeting")
        self.started_at = datetime.now(UTC)
        self._t0 = time.monotonic()
        self._stopped = asyncio.Event()
        self.tasks = TaskOwner()
        sink = DiscordTranscriptSink(
            channel=text_channel, bot_user_name=guild.me.display_name if guild.me else "cantobot",
            threads=threads, captions=captions, readability=readability,
            caption_interval=config.transcribe.caption_edit_interval)
        self.ledger = Ledger(storage=storage, sink=sink, guild=guild, tasks=self.tasks,
                             readability=readability)
        self.speakers = Speakers(
            config=config, guild=guild, tasks=self.tasks, on_event=self._on_stt_event,
            is_opted_out=is_opted_out, confirm_opt_out=confirm_opt_out,
            accepting=lambda: self._machine.accepting_speakers,
            notice_once=self.ledger.notice_once,
            forget_voice=lambda uid: self.intake.forget_member(uid), slots=slots, t0=self._t0,
        )
        self.intake = VoiceIntake(
            config=config, guild=guild, channel=voice_channel, tasks=self.tasks,
            on_audio=self._on_audio, on_idle=self.speakers.on_idle,
            is_ignored=self.speakers.is_ignored,
            notice_once=self.ledger.notice_once, say=self.ledger.say,
        )
        self.room = Room(
            guild_id=guild.id, intake=self.intake, notices=self.ledger, tasks=self.tasks,
            text_channel_name=text_channel.name, threads=threads, stt_url=config.stt.url,
            follow_moves=config.transcribe.follow_moves,
            empty_timeout=config.transcribe.empty_channel_timeout,
            is_live=lambda: self.state is MeetingState.LIVE, stop=self.stop,
        )

    # -- what the parts hold, under the names callers know --------------------------------------

    @property
    def state(self) -> MeetingState:
        return self._machine.state

    @property
    def meeting_id(self) -> int:
        return self.ledger.meeting_id

    @property
    def lines(self) -> int:
        return self.ledger.lines

    @property
    def voice_channel(self) -> discord.VoiceChannel | discord.StageChannel:
        return self.intake.channel

    @property
    def receiver(self) -> VoiceReceiver:
        return self.intake.receiver

    @property
    def listener(self) -> VoiceListener:
        return self.intake.listener

    @property
    def transcriber(self) -> Transcriber:
        return self.speakers.transcriber

    # -- wiring ----------------------------------------------------------------------------------

    def _on_audio(self, user_id: int, pcm: np.ndarray) -> None:
        if not self.intake.admits_audio():
            return  # a room not (yet) told it is transcribed: its audio goes nowhere
        self.speakers.on_audio(user_id, pcm, self.intake.output_rate)

    def _on_stt_event(self, event: SttEvent) -> None:
        if isinstance(event, SegmentCommitted | SegmentTimestamped):
            uid = event.segment.speaker_id
            if uid is not None and self.speakers.opted_out(uid):
                log.info("guild %s: dropped a late line of a member who opted out", self.guild.id)
                return
        if isinstance(event, SegmentCommitted):
            segment = event.segment
            name, avatar = segment.speaker, None
            if segment.speaker_id is not None:
                name, avatar = self.speakers.display(segment.speaker_id)
            self.ledger.commit(event.ref, segment, display_name=name, avatar_url=avatar)
        elif isinstance(event, SegmentTimestamped):
            self.ledger.amend(event.ref, event.segment)
        elif isinstance(event, PartialText):
            if self.captions and self.state is MeetingState.LIVE:
                key = event.key
                if isinstance(key, int):
                    if self.speakers.opted_out(key):
                        return  # opted out: not even a caption edit
                    name, _ = self.speakers.display(key)
                else:
                    name = event.speaker
                self.ledger.sink.update_caption(key, event.text, display_name=name)
        elif isinstance(event, StateChanged):
            self.ledger.upstream_state(event.state, event.error)

    # -- start / stop ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.ledger.open(text_channel=self.text_channel, voice_channel=self.voice_channel,
                               started_at=self.started_at, threads=self.threads,
                               title=self.title)
        try:
            await self.intake.join()
        except Exception as exc:
            await self._abort("could not join voice")
            raise MeetingError(f"could not join {self.voice_channel.name}: {exc}") from exc
        failure = await self.room.tell(self.voice_channel, moved=False)
        if failure is not None:
            await self._abort("consent notice not posted")
            raise MeetingError(failure)
        self._machine.to(MeetingState.LIVE)
        log.info("guild %s: joined %s, transcribing into #%s (meeting %d)", self.guild.id,
                 self.voice_channel.name, self.text_channel.name, self.meeting_id)

    async def _abort(self, why: str) -> None:
        await self.intake.leave()
        await self.ledger.abort()
        self._machine.to(MeetingState.ENDED, why)

    async def stop(self, reason: str = "stopped") -> Minutes:
        """Drain the voice, flush every speaker and every write, close: the minutes."""
        if self.state in (MeetingState.STOPPING, MeetingState.ENDED):
            await self._stopped.wait()
            return await self.storage.minutes(self.meeting_id)
        self._machine.to(MeetingState.STOPPING, reason)
        log.info("guild %s: stopping meeting %d (%s)", self.guild.id, self.meeting_id, reason)
        self.room.cancel_timer()
        try:
            await self.intake.drain()  # drain: nothing more is heard
            await self.speakers.finish_all()  # flush: the last commits ...
            await self.intake.leave(self.ledger.deadline)
            await self.ledger.flush()  # ... and their storage writes
            minutes = await self.ledger.close()  # close: end, post the minutes, leave
        finally:
            await self.speakers.aclose()
            await self.tasks.cancel_all()
            self._machine.to(MeetingState.ENDED)
            self._stopped.set()
            if self._on_ended is not None:
                self._on_ended(self)
        log.info("guild %s: meeting %d ended: %d lines; voice packets: %s", self.guild.id,
                 self.meeting_id, len(minutes.segments), dict(self.receiver.stats))
        return minutes

    # -- channel presence ------------------------------------------------------------------------

    def check_empty(self) -> None:
        """Called on voice state changes: follow a move; end after a while with no humans."""
        self.room.check()

    def forget_member(self, user_id: int) -> None:
        """A member opted out mid-meeting: from now nothing of theirs is sent, posted or stored
        (their stream is dropped unsent, a caption edit not yet made is not made)."""
        self.speakers.forget(user_id)
        self.ledger.sink.silence(user_id)

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> MeetingStatus:
        e2ee, code = self.intake.e2ee()
        return MeetingStatus(
            meeting_id=self.meeting_id, voice_channel=self.voice_channel.name,
            text_channel=self.text_channel.name, started_at=self.started_at,
            duration=time.monotonic() - self._t0, speakers=self.speakers.status(),
            lines_posted=self.lines, upstream=self.ledger.upstream_text(), e2ee=e2ee,
            privacy_code=format_privacy_code(code), state=self.state,
            voice=self.intake.listener.counters().summary(),
        )

