"""A transcribed meeting: voice receive -> per-speaker STT -> storage and Discord sinks.

One :class:`Meeting` per guild, owned by the :class:`MeetingManager`. Life cycle::

    STARTING --(voice joined)--> LIVE --(/transcribe stop, empty channel, shutdown)--> STOPPING
        --(every session flushed, minutes posted)--> ENDED

Every committed line is written to storage the moment it arrives (a crash loses nothing) and
queued for Discord in order. Upstream trouble (rejected key, outage, lost voice) is said once in
the channel per kind of trouble, not once per speaker per second. Every task a meeting starts is
named and held here, and awaited or cancelled by :meth:`Meeting.stop`.

Several processes (Discord shards) may share one database, so nothing here assumes it is the only
process: opt-outs live in storage and :class:`MeetingManager` keeps only a cache of them. Each new
speaker stream asks storage before anything of it is sent upstream (so an opt-out made through
another process counts from that person's next utterance), and the cache is refreshed every
:data:`OPT_OUT_REFRESH` seconds (so someone opting out elsewhere mid-utterance is dropped within
that time). One query per new stream and one per refresh are cheap next to the audio; a
LISTEN/NOTIFY channel would be PostgreSQL-only. The STT session cap (``stt.max_sessions``) is per
process: one :class:`~bot.pipeline.SessionSlots` is shared by the process's meetings.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import discord
import numpy as np

from bot.config import Config
from bot.errors import CantobotError, SttAuthError
from bot.pipeline import SessionSlots, SpeakerStream, Transcriber
from bot.sinks.discord_sink import DiscordTranscriptSink
from bot.storage import StorageBackend
from bot.stt.session import (
    PartialText,
    SegmentCommitted,
    SegmentTimestamped,
    StateChanged,
    SttEvent,
    SttState,
)
from bot.transcript import minutes as minutes_fmt
from bot.transcript.format import nickname_with_notice
from bot.transcript.model import Minutes, Segment
from bot.voice.client import VoiceListener
from bot.voice.receiver import VoiceReceiver

log = logging.getLogger(__name__)

#: Seconds a stop waits for Discord to take the last queued messages before giving up.
SINK_FLUSH_TIMEOUT = 15.0
#: The same kind of upstream trouble is said in the channel at most once per this many seconds.
NOTICE_COOLDOWN = 300.0
#: Seconds between re-reads of the opt-out list from storage (another process may change it).
OPT_OUT_REFRESH = 5.0


class MeetingState(enum.Enum):
    STARTING = "starting"
    LIVE = "live"
    STOPPING = "stopping"
    ENDED = "ended"


class MeetingError(CantobotError):
    """A meeting could not start or stop; the message is shown to the user."""

    permanent = True


@dataclass(frozen=True)
class SpeakerStatus:
    name: str
    user_id: int | None
    seconds: float
    upstream: str


@dataclass(frozen=True)
class MeetingStatus:
    meeting_id: int
    voice_channel: str
    text_channel: str
    started_at: datetime
    duration: float
    speakers: tuple[SpeakerStatus, ...]
    lines_posted: int
    upstream: str
    e2ee: bool
    privacy_code: str | None
    state: MeetingState


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
    ) -> None:
        self.config = config
        self.storage = storage
        self.guild = guild
        self.voice_channel = voice_channel
        self.text_channel = text_channel
        self.threads = threads
        self.captions = captions
        self._is_opted_out = is_opted_out
        self._confirm_opt_out = confirm_opt_out
        self._on_ended = on_ended
        self.state = MeetingState.STARTING
        self.meeting_id: int = 0
        self.started_at = datetime.now(UTC)
        self._t0 = time.monotonic()
        self.lines = 0
        self.upstream = "idle"
        self._upstream_error: CantobotError | None = None
        self._notices: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Storage writes of committed lines not yet amended by their timestamped twin.
        self._line_writes: dict[tuple[str, str], list[asyncio.Task[int]]] = {}
        self._names: dict[int, str] = {}
        self._old_nick: str | None = None
        self._empty_timer: asyncio.TimerHandle | None = None
        self._stopped = asyncio.Event()
        # Shared backoff of failed first starts (see _start_stream).
        self._start_backoff = 0.0
        self._start_not_before = 0.0
        self._start_lock = asyncio.Lock()
        self.transcriber = Transcriber(config.stt, self._on_stt_event, slots=slots,
                                       on_wait=self._on_capacity_wait)
        self.receiver = VoiceReceiver(
            sample_rate=config.stt.sample_rate,
            on_audio=self._on_audio,
            on_idle=self._on_idle,
            is_ignored=self._ignored,
            jitter_packets=max(1, config.voice.jitter_ms // 20),
            idle_timeout=config.voice.idle_timeout,
        )
        self.listener = VoiceListener(
            self.receiver,
            keepalive_seconds=config.voice.keepalive_seconds,
            watchdog_seconds=config.voice.watchdog_seconds,
            on_stalled=self._on_stalled,
        )
        self.sink = DiscordTranscriptSink(
            channel=text_channel,
            bot_user_name=guild.me.display_name if guild.me else "cantobot",
            threads=threads,
            captions=captions,
            caption_interval=config.transcribe.caption_edit_interval,
        )

    # -- tasks -----------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # -- start / stop ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.meeting_id = await self.storage.start_meeting(
            guild_id=self.guild.id,
            text_channel_id=self.text_channel.id,
            voice_channel_id=self.voice_channel.id,
            title=f"{self.voice_channel.name} meeting",
            started_at=self.started_at,
        )
        await self.sink.start()
        self.sink.post_notice(
            f"\N{STUDIO MICROPHONE} **{self.voice_channel.name}** is now being transcribed "
            f"(meeting #{self.meeting_id}). Lines are posted here"
            + (" and in one caption thread per speaker" if self.threads else "")
            + ". Don't want to be transcribed? Use `/transcribe optout`: your voice is then "
            "never decoded or sent anywhere."
        )
        await self._set_nickname(transcribing=True)
        try:
            await self.voice_channel.connect(cls=self.listener.factory(), timeout=30.0,
                                             self_deaf=False)
        except Exception as exc:
            await self._abort()
            raise MeetingError(f"could not join {self.voice_channel.name}: {exc}") from exc
        self.state = MeetingState.LIVE
        log.info("guild %s: joined %s, transcribing into #%s (meeting %d)", self.guild.id,
                 self.voice_channel.name, self.text_channel.name, self.meeting_id)

    async def _abort(self) -> None:
        await self.listener.aclose()
        await self._set_nickname(transcribing=False)
        await self.sink.aclose(SINK_FLUSH_TIMEOUT)
        await self.storage.end_meeting(self.meeting_id, datetime.now(UTC))
        self.state = MeetingState.ENDED

    async def stop(self, reason: str = "stopped") -> Minutes:
        """Flush every speaker (their last commits), leave, store and post the minutes."""
        if self.state in (MeetingState.STOPPING, MeetingState.ENDED):
            await self._stopped.wait()
            return await self.storage.minutes(self.meeting_id)
        self.state = MeetingState.STOPPING
        log.info("guild %s: stopping meeting %d (%s)", self.guild.id, self.meeting_id, reason)
        if self._empty_timer is not None:
            self._empty_timer.cancel()
        try:
            # Emit what the jitter buffers hold, then stop receiving before the flush.
            self.receiver.tick(time.monotonic() + 3600)
            await self.listener.aclose()
            vc = self.listener.voice_client
            await self.transcriber.finish_all()
            if vc is not None and vc.is_connected():
                await vc.disconnect(force=True)
            # Storage writes of the last lines were spawned by the flush: wait for them.
            pending = [t for t in self._tasks if t.get_name().startswith("store-")]
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            ended = datetime.now(UTC)
            await self.storage.end_meeting(self.meeting_id, ended)
            minutes = await self.storage.minutes(self.meeting_id)
            await self.post_minutes(minutes)
            await self._set_nickname(transcribing=False)
            await self.sink.aclose(SINK_FLUSH_TIMEOUT)
        finally:
            await self.transcriber.aclose()
            # An automatic stop runs in one of our own tasks: never cancel or await ourselves.
            others = [t for t in self._tasks if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            if others:
                await asyncio.gather(*others, return_exceptions=True)
            self.state = MeetingState.ENDED
            self._stopped.set()
            if self._on_ended is not None:
                self._on_ended(self)
        log.info("guild %s: meeting %d ended: %d lines; voice packets: %s", self.guild.id,
                 self.meeting_id, len(minutes.segments), dict(self.receiver.stats))
        return minutes

    async def post_minutes(self, minutes: Minutes) -> None:
        await self.sink.post_minutes(summary=minutes_fmt.summary_text(minutes),
                                     files=minutes_files(minutes))

    async def _set_nickname(self, *, transcribing: bool) -> None:
        me = self.guild.me
        if me is None:
            return
        try:
            if transcribing:
                self._old_nick = me.nick
                await me.edit(nick=nickname_with_notice(me.display_name))
            else:
                await me.edit(nick=self._old_nick)
        except discord.HTTPException as exc:  # Change Nickname missing: the notice suffices
            log.info("guild %s: nickname not changed (%s)", self.guild.id, exc)

    # -- voice side ------------------------------------------------------------------------------

    def _ignored(self, user_id: int) -> bool:
        if self._is_opted_out(user_id):
            return True
        member = self.guild.get_member(user_id)
        return member is not None and member.bot

    def _display(self, user_id: int) -> tuple[str, str | None]:
        member = self.guild.get_member(user_id)
        if member is None:
            return self._names.get(user_id, f"user-{user_id}"), None
        self._names[user_id] = member.display_name
        return member.display_name, member.display_avatar.url

    def _on_audio(self, user_id: int, pcm: np.ndarray) -> None:
        stream = self.transcriber.get(user_id)
        if stream is None:
            if self.state is not MeetingState.LIVE and self.state is not MeetingState.STARTING:
                return
            name, _ = self._display(user_id)
            stream = self.transcriber.open(
                user_id,
                speaker=name,
                speaker_id=user_id,
                in_rate=self.receiver.output_rate,
                stream_offset=time.monotonic() - self._t0 - len(pcm) / self.receiver.output_rate,
            )
            log.info("guild %s: speaker %s started", self.guild.id, name)
            self._spawn(self._start_stream(stream), f"start-stream-{user_id}")
        if self.receiver.output_rate == self.config.stt.sample_rate:
            stream.feed_converted(pcm)
        else:
            stream.feed(pcm)

    async def _start_stream(self, stream: SpeakerStream) -> None:
        """Start a speaker's session; a failed first start is retried, meeting-wide backoff.

        The session retries by itself only after it once streamed; a first start that fails
        (outage, no ``session-started``, ``session-error``, 401) is retried here while the
        session keeps the speaker's audio. All streams share one capped, jittered backoff and,
        while in trouble, try one at a time: a rejected key costs at most one connection per
        backoff period, however many people talk.
        """
        uid, confirm = stream.speaker_id, self._confirm_opt_out
        if uid is not None and confirm is not None and await confirm(uid):
            # Opted out through another process: nothing of this stream is sent anywhere.
            self.receiver.forget_member(uid)
            await self.transcriber.discard(uid)
            return
        while self._startable(stream):
            wait = self._start_not_before - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self._start_backoff > 0:
                async with self._start_lock:
                    if self._start_not_before > time.monotonic() or not self._startable(stream):
                        continue
                    if await self._try_start(stream):
                        return
            elif await self._try_start(stream):
                return

    def _startable(self, stream: SpeakerStream) -> bool:
        live = self.state in (MeetingState.STARTING, MeetingState.LIVE)
        current = stream.speaker_id is None or self.transcriber.get(stream.speaker_id) is stream
        return live and current and stream.session.state in (SttState.IDLE, SttState.FAILED)

    async def _try_start(self, stream: SpeakerStream) -> bool:
        try:
            await stream.start()
        except CantobotError as exc:
            self._upstream_trouble(exc)
            stt = self.config.stt
            self._start_backoff = min(stt.reconnect_max_delay,
                                      max(stt.reconnect_initial_delay, 2 * self._start_backoff))
            jitter = 0.5 + random.random() / 2
            self._start_not_before = time.monotonic() + self._start_backoff * jitter
            log.info("guild %s: STT start for %s failed; next attempt in %.2f s", self.guild.id,
                     stream.speaker, self._start_backoff * jitter)
            return False
        except RuntimeError:  # stopped while connecting: nothing left to start
            return True
        self._start_backoff = 0.0
        self._start_not_before = 0.0
        return True

    def _on_capacity_wait(self, stream: SpeakerStream, position: int) -> None:
        limit = self.config.stt.max_sessions
        log.warning("guild %s: %s waits for an STT session (place %d; %d in use)", self.guild.id,
                    stream.speaker, position, limit)
        self.notice_once("stt-capacity", f"\N{HOURGLASS WITH FLOWING SAND} This bot is at its "
                         f"limit of {limit} simultaneous speakers, so new speakers wait their turn"
                         " and are transcribed as others pause; what they say meanwhile is kept.")

    def _on_idle(self, user_id: int) -> None:
        # A quiet speaker's session may be mid-reconnect (STT outage): keep their unconfirmed
        # audio as long as the buffer bound allows rather than the short stop timeout.
        self.transcriber.finish_in_background(
            user_id, within=max(self.config.stt.stop_timeout, self.config.stt.max_buffer_seconds))

    def _on_stalled(self, why: str) -> None:
        self.notice_once("voice-stalled", f"\N{WARNING SIGN} Voice receive stalled ({why}); "
                                          "reconnecting to the voice channel.")
        self._spawn(self._reconnect_voice(), "voice-reconnect")

    async def _reconnect_voice(self) -> None:
        vc = self.listener.voice_client
        log.warning("guild %s: reconnecting voice", self.guild.id)
        if vc is not None:
            try:
                await vc.disconnect(force=True)
            except Exception:
                log.debug("disconnect before reconnect failed", exc_info=True)
        self.receiver.reset_connection()
        self.listener.reset_watchdog()
        try:
            await self.voice_channel.connect(cls=self.listener.factory(), timeout=30.0)
        except Exception as exc:
            self.notice_once("voice-lost", f"\N{WARNING SIGN} Lost the voice connection and "
                                           f"could not rejoin: {exc}")

    # -- STT side --------------------------------------------------------------------------------

    def _on_stt_event(self, event: SttEvent) -> None:
        if isinstance(event, SegmentCommitted):
            self._commit(event.segment)
        elif isinstance(event, SegmentTimestamped):
            self._spawn(self._store_words(event.segment), f"store-words-{self.lines}")
        elif isinstance(event, PartialText):
            if self.captions and self.state is MeetingState.LIVE:
                stream_key = self._user_key(event.speaker)
                self.sink.update_caption(stream_key, event.text, display_name=event.speaker)
        elif isinstance(event, StateChanged):
            self._on_state(event)

    def _user_key(self, speaker: str) -> int | str:
        for stream in self.transcriber.streams():
            if stream.speaker == speaker and stream.speaker_id is not None:
                return stream.speaker_id
        return speaker

    def _commit(self, segment: Segment) -> None:
        self.lines += 1
        write = self._spawn(self._store_line(segment), f"store-line-{self.lines}")
        self._line_writes.setdefault((segment.speaker, segment.text), []).append(write)
        avatar = None
        name = segment.speaker
        if segment.speaker_id is not None:
            name, avatar = self._display(segment.speaker_id)
        self.sink.post_line(segment, display_name=name, avatar_url=avatar)
        log.info("guild %s: line %d from %s posted", self.guild.id, self.lines, segment.speaker)

    async def _store_line(self, segment: Segment) -> int:
        return await self.storage.add_line(self.meeting_id, segment)

    async def _store_words(self, segment: Segment) -> None:
        # The session emits a sentence's timestamped twin only after the sentence itself, whose
        # write may still be in flight: wait for that write and amend the row it made.
        key = (segment.speaker, segment.text)
        writes = self._line_writes.get(key)
        if not writes:
            await self.storage.add_line(self.meeting_id, segment)
            return
        write = writes.pop(0)
        if not writes:
            del self._line_writes[key]
        await self.storage.update_line_words(await write, segment)

    def _on_state(self, event: StateChanged) -> None:
        self.upstream = event.state.name.lower()
        if event.error is not None:
            self._upstream_trouble(event.error)
        elif event.state is SttState.STREAMING and self._upstream_error is not None:
            self._upstream_error = None
            self.notice_once("stt-recovered", "\N{WHITE HEAVY CHECK MARK} Speech-to-text is "
                                              "back; transcription continues.")

    def _upstream_trouble(self, error: CantobotError) -> None:
        self._upstream_error = error
        kind = "stt-auth" if isinstance(error, SttAuthError) else f"stt-{type(error).__name__}"
        text = (f"\N{WARNING SIGN} {error.user_message}"
                + ("" if error.permanent else " — retrying; nothing said is lost."))
        self.notice_once(kind, text)

    def notice_once(self, kind: str, text: str) -> None:
        now = time.monotonic()
        last = self._notices.get(kind)
        if last is not None and now - last < NOTICE_COOLDOWN:
            return
        self._notices[kind] = now
        log.warning("guild %s: %s", self.guild.id, text)
        self.sink.post_notice(text)

    # -- channel presence ------------------------------------------------------------------------

    def humans_in_channel(self) -> int:
        return sum(1 for m in self.voice_channel.members if not m.bot)

    def follow_move(self) -> None:
        """Discord (or a moderator) moved the bot to another voice channel: transcribe that one
        from now on (status, empty-channel stop, rejoin) and say so once. discord.py follows the
        move by itself (a new voice session; the listener re-binds on its READY and
        SESSION_DESCRIPTION); the bot's own voice state is the first to know the new channel."""
        me = self.guild.me
        voice = me.voice if me is not None else None
        channel = voice.channel if voice is not None else None
        if channel is None:
            vc = self.listener.voice_client
            channel = vc.channel if vc is not None else None
        if not isinstance(channel, discord.VoiceChannel | discord.StageChannel):
            return  # between sessions, or disconnected: not a move
        if channel.id == self.voice_channel.id:
            return
        log.info("guild %s: moved from %s to %s", self.guild.id, self.voice_channel.id, channel.id)
        self.voice_channel = channel
        self.sink.post_notice(f"\N{RIGHTWARDS ARROW} Moved to **{channel.name}**; "
                              "still transcribing.")

    def check_empty(self) -> None:
        """Called on voice state changes: end by itself after a while with no humans."""
        if self.state is not MeetingState.LIVE:
            return
        self.follow_move()
        if self.humans_in_channel() > 0:
            if self._empty_timer is not None:
                self._empty_timer.cancel()
                self._empty_timer = None
            return
        if self._empty_timer is None:
            delay = self.config.transcribe.empty_channel_timeout
            loop = asyncio.get_running_loop()
            self._empty_timer = loop.call_later(
                delay, lambda: self._spawn(self.stop("voice channel empty"), "auto-stop"))

    def forget_member(self, user_id: int) -> None:
        """A member opted out mid-meeting: stop their stream now."""
        self.receiver.forget_member(user_id)
        self.transcriber.finish_in_background(user_id)

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> MeetingStatus:
        vc = self.listener.voice_client
        dave = self.receiver.dave
        speakers = tuple(
            SpeakerStatus(name=s.speaker, user_id=s.speaker_id, seconds=s.seconds_fed,
                          upstream=s.session.state.name.lower())
            for s in self.transcriber.streams()
        )
        upstream = self.upstream
        if self._upstream_error is not None:
            upstream = f"{upstream}: {self._upstream_error.user_message}"
        return MeetingStatus(
            meeting_id=self.meeting_id,
            voice_channel=self.voice_channel.name,
            text_channel=self.text_channel.name,
            started_at=self.started_at,
            duration=time.monotonic() - self._t0,
            speakers=speakers,
            lines_posted=self.lines,
            upstream=upstream,
            e2ee=bool(dave is not None and vc is not None and dave.is_e2ee()),
            privacy_code=dave.privacy_code() if dave is not None and vc is not None else None,
            state=self.state,
        )


def minutes_files(minutes: Minutes) -> dict[str, str]:
    return {
        "minutes.md": minutes_fmt.to_markdown(minutes),
        "minutes.srt": minutes_fmt.to_srt(minutes),
        "minutes.vtt": minutes_fmt.to_vtt(minutes),
        "minutes.json": minutes_fmt.to_json(minutes),
    }


class MeetingManager:
    """The bot's meetings, one per guild, and the opt-out list (kept in storage)."""

    def __init__(self, config: Config, storage: StorageBackend) -> None:
        self.config = config
        self.storage = storage
        self._meetings: dict[int, Meeting] = {}
        self._opted_out: set[int] = set()
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
            files = [discord.File(io.BytesIO(body.encode("utf-8")), filename=name)
                     for name, body in minutes_files(minutes).items()]
            text = (f"\N{WARNING SIGN} The bot restarted during meeting #{info.id}; "
                    "everything said before that was kept. Minutes so far:\n"
                    + minutes_fmt.summary_text(minutes))
            try:
                await channel.send(text[:2000], files=files,
                                   allowed_mentions=discord.AllowedMentions.none())
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
        current = await self.storage.opted_out_users()
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
        await self.storage.set_opt_out(user_id, opted_out)
        if opted_out:
            self._opted_out.add(user_id)
            for meeting in self._meetings.values():
                meeting.forget_member(user_id)
        else:
            self._opted_out.discard(user_id)

    async def start(
        self,
        *,
        guild: discord.Guild,
        voice_channel: discord.VoiceChannel | discord.StageChannel,
        text_channel: discord.TextChannel,
        threads: bool,
        captions: bool,
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

    async def shutdown(self) -> None:
        """Flush every meeting concurrently (SIGTERM): stop-session, last commits, minutes."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        meetings = list(self._meetings.values())
        if meetings:
            log.info("shutting down: flushing %d meeting(s)", len(meetings))
        await asyncio.gather(*(m.stop("bot shutting down") for m in meetings),
                             return_exceptions=True)

    def meetings(self) -> list[Meeting]:
        return list(self._meetings.values())
