"""`Meeting`: one guild's live transcription, wired from its parts.

    VoiceIntake --(member PCM, member idle)--> Speakers --(STT events)--> Ledger
    (voice channel, receiver, reconnect)       (streams, opt-outs, slots)  (storage, sink, notices)

Meeting owns none of the work: it builds the parts, routes STT events to the ledger, holds the
:class:`~bot.meeting.state.StateMachine` and the :class:`~bot.meeting.tasks.TaskOwner` every
part spawns into, runs the empty-channel timer, and reads :meth:`Meeting.stop` as
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
from bot.meeting.consent import consent_notices, format_privacy_code
from bot.meeting.intake import VoiceIntake
from bot.meeting.ledger import Ledger
from bot.meeting.speakers import Speakers
from bot.meeting.state import MeetingError, MeetingState, MeetingStatus, SpeakerStatus, StateMachine
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
from bot.transcript.escape import ERROR_BUDGET, outside
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
        self._empty_timer: asyncio.TimerHandle | None = None
        self._stopped = asyncio.Event()
        self.tasks = TaskOwner()
        sink = DiscordTranscriptSink(
            channel=text_channel,
            bot_user_name=guild.me.display_name if guild.me else "cantobot",
            threads=threads, captions=captions,
            caption_interval=config.transcribe.caption_edit_interval,
            readability=readability,
        )
        self.ledger = Ledger(storage=storage, sink=sink, guild=guild, tasks=self.tasks,
                             readability=readability)
        self.speakers = Speakers(
            config=config, guild=guild, tasks=self.tasks, on_event=self._on_stt_event,
            is_opted_out=is_opted_out, confirm_opt_out=confirm_opt_out,
            accepting=lambda: self._machine.accepting_speakers,
            notice_once=self.ledger.notice_once,
            forget_voice=self._forget_voice, slots=slots, t0=self._t0,
        )
        self.intake = VoiceIntake(
            config=config, guild=guild, channel=voice_channel, tasks=self.tasks,
            on_audio=self._on_audio, on_idle=self.speakers.on_idle,
            is_ignored=self.speakers.is_ignored,
            notice_once=self.ledger.notice_once, say=self.ledger.say,
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

    def _forget_voice(self, user_id: int) -> None:
        self.intake.forget_member(user_id)

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
            await self.intake.leave()
            await self.ledger.abort()
            self._machine.to(MeetingState.ENDED, "could not join voice")
            raise MeetingError(f"could not join {self.voice_channel.name}: {exc}") from exc
        failure = await self._tell_room(self.voice_channel, moved=False)
        if failure is not None:
            await self.intake.leave()
            await self.ledger.abort()
            self._machine.to(MeetingState.ENDED, "consent notice not posted")
            raise MeetingError(failure)
        self._machine.to(MeetingState.LIVE)
        log.info("guild %s: joined %s, transcribing into #%s (meeting %d)", self.guild.id,
                 self.voice_channel.name, self.text_channel.name, self.meeting_id)

    async def stop(self, reason: str = "stopped") -> Minutes:
        """Drain the voice, flush every speaker and every write, close: the minutes."""
        if self.state in (MeetingState.STOPPING, MeetingState.ENDED):
            await self._stopped.wait()
            return await self.storage.minutes(self.meeting_id)
        self._machine.to(MeetingState.STOPPING, reason)
        log.info("guild %s: stopping meeting %d (%s)", self.guild.id, self.meeting_id, reason)
        if self._empty_timer is not None:
            self._empty_timer.cancel()
        try:
            await self.intake.drain()  # drain: nothing more is heard
            await self.speakers.finish_all()  # flush: the last commits ...
            await self.intake.leave()
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

    def humans_in_channel(self) -> int:
        return self.intake.humans_in_channel()

    def follow_move(self) -> None:
        """The bot may have been moved: follow (tell the new room first) or stop."""
        moved = self.intake.follow_move()
        if moved is None or self.state is not MeetingState.LIVE:
            return
        if not self.config.transcribe.follow_moves:
            self.ledger.say(f"\N{WARNING SIGN} Moved to **{outside(moved.name)}**; "
                            "`transcribe.follow_moves` is off, so the meeting ends here.")
            self.tasks.spawn(self.stop("moved to another voice channel"), "stop-on-move")
            return
        self.tasks.spawn(self._follow(moved), f"consent-{moved.id}")

    async def _follow(self, channel: discord.VoiceChannel | discord.StageChannel) -> None:
        failure = await self._tell_room(channel, moved=True)
        if failure is not None and self.state is MeetingState.LIVE:
            self.ledger.say(f"\N{WARNING SIGN} {outside(failure, ERROR_BUDGET)} Nothing of that "
                            "room was sent; the meeting ends here.")
            await self.stop("consent notice not posted after a move")

    async def _tell_room(self, channel: discord.VoiceChannel | discord.StageChannel, *,
                         moved: bool) -> str | None:
        """Post the consent notice in the transcript channel and in the voice channel's chat;
        once Discord accepted both, that room's audio may go on. The reason when not."""
        encryption = await self.intake.settle(moved=moved)
        notices = consent_notices(
            voice_name=channel.name, text_channel_name=self.text_channel.name,
            number=self.ledger.number, threads=self.threads, stt_url=self.config.stt.url,
            encryption=encryption, moved=moved)
        failure = await self.ledger.post_consent(channel, notices)
        if failure is None and self.intake.channel.id == channel.id:
            self.intake.admit(channel.id)
            log.info("guild %s: consent notice accepted in %s; its audio is heard",
                     self.guild.id, channel.id)
        return failure

    def check_empty(self) -> None:
        """Called on voice state changes: end by itself after a while with no humans."""
        if self.state is not MeetingState.LIVE:
            return
        self.follow_move()
        if self.intake.humans_in_channel() > 0:
            if self._empty_timer is not None:
                self._empty_timer.cancel()
                self._empty_timer = None
            return
        if self._empty_timer is None:
            delay = self.config.transcribe.empty_channel_timeout
            loop = asyncio.get_running_loop()
            self._empty_timer = loop.call_later(
                delay, lambda: self.tasks.spawn(self.stop("voice channel empty"), "auto-stop"))

    def forget_member(self, user_id: int) -> None:
        """A member opted out mid-meeting: from now nothing of theirs is sent, posted or stored
        (their stream is dropped unsent, a caption edit not yet made is not made)."""
        self.speakers.forget(user_id)
        self.ledger.sink.silence(user_id)

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> MeetingStatus:
        speakers = tuple(
            SpeakerStatus(name=s.speaker, user_id=s.speaker_id, seconds=s.seconds_fed,
                          upstream=s.session.state.name.lower())
            for s in self.speakers.streams()
        )
        e2ee, code = self.intake.e2ee()
        return MeetingStatus(
            meeting_id=self.meeting_id, voice_channel=self.voice_channel.name,
            text_channel=self.text_channel.name, started_at=self.started_at,
            duration=time.monotonic() - self._t0, speakers=speakers, lines_posted=self.lines,
            upstream=self.ledger.upstream_text(), e2ee=e2ee,
            privacy_code=format_privacy_code(code), state=self.state,
            voice=self.intake.listener.counters().summary(),
        )

