"""The ledger: what a meeting keeps and what its channel is told.

Owns the storage rows of the meeting (every committed line is written the moment it arrives, so
a crash loses nothing, and amended in place when its timestamped twin comes), the
:class:`~bot.sinks.discord_sink.DiscordTranscriptSink` (lines, captions, notices; any
:class:`TranscriptSink`), the notices
about upstream trouble (said once per kind per :data:`NOTICE_COOLDOWN`, not once per speaker per
second), the bot's nickname notice, and :class:`MinutesPost`: the one way minutes are put into
words and files, used by a stop, by crash recovery and by ``/transcribe minutes``.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import discord

from bot.errors import CantobotError, SttAuthError
from bot.meeting.consent import ConsentNotices
from bot.meeting.tasks import TaskOwner
from bot.sinks.payloads import minutes_nonce
from bot.storage import StorageBackend
from bot.stt.session import LineRef, SttState
from bot.transcript import minutes as minutes_fmt
from bot.transcript.escape import ERROR_BUDGET, inert, outside
from bot.transcript.format import cut_message, nickname_with_notice
from bot.transcript.model import Minutes, Segment
from bot.transcript.script import PLAIN, Readability

log = logging.getLogger(__name__)

#: Seconds a stop waits for Discord to take the last queued messages before giving up.
SINK_FLUSH_TIMEOUT = 15.0
#: The same kind of upstream trouble is said in the channel at most once per this many seconds.
NOTICE_COOLDOWN = 300.0
#: Longest Discord message (characters) when minutes are sent in one message.
MESSAGE_LIMIT = 2000
#: Task name prefix of storage writes (a stop awaits them all).
STORE_TASK = "store-"
#: Storage writes running at once. A flood of commits queues the rest in order (every line is
#: still stored) instead of starting one task per line.
STORE_WRITERS = 4
#: Committed lines remembered for their timestamped twin, which comes right after its line; a
#: flood of commits without twins must not grow this map for ever.
LINE_REFS_KEPT = 1024


class TranscriptSink(Protocol):
    """What the ledger needs of the Discord side (:class:`DiscordTranscriptSink`; tests give a
    small fake)."""

    async def start(self) -> None: ...

    async def aclose(self, flush_timeout: float = ...) -> None: ...

    def post_notice(self, text: str) -> None: ...

    async def post_notice_and_wait(self, text: str) -> bool: ...

    def silence(self, user_key: int | str) -> None: ...

    def post_line(self, segment: Segment, *, display_name: str,
                  avatar_url: str | None) -> None: ...

    def update_caption(self, user_key: int | str, text: str, *, display_name: str) -> None: ...

    async def post_minutes(self, *, summary: str, files: dict[str, str],
                           nonce: str | None = None) -> None: ...


@dataclass(frozen=True)
class MinutesPost:
    """Minutes as posted: the summary (after an optional preface) and the files."""

    text: str
    files: dict[str, str]

    @classmethod
    def of(cls, minutes: Minutes, preface: str = "",
           readability: Readability = PLAIN) -> MinutesPost:
        # The summary quotes outside text (channel and display names): no link or ping survives.
        return cls(inert(preface + minutes_fmt.summary_text(minutes)),
                   minutes_fmt.minutes_files(minutes, readability))

    def discord_files(self) -> list[discord.File]:
        return [discord.File(io.BytesIO(body.encode("utf-8")), filename=name)
                for name, body in self.files.items()]

    async def send(self, send: Callable[..., Awaitable[Any]]) -> None:
        """Post as one message through ``send`` (``channel.send``, ``followup.send``), the
        text cut to what Discord takes (UTF-16 units, :func:`cut_message`)."""
        await send(cut_message(self.text, MESSAGE_LIMIT), files=self.discord_files(),
                   allowed_mentions=discord.AllowedMentions.none())


class Ledger:
    """Storage rows, Discord sink and notices of one meeting; see the module docstring."""

    def __init__(self, *, storage: StorageBackend, sink: TranscriptSink,
                 guild: discord.Guild, tasks: TaskOwner,
                 readability: Readability = PLAIN) -> None:
        self.storage = storage
        self.readability = readability
        self.sink = sink
        self.guild = guild
        self._tasks = tasks
        self.meeting_id = 0
        self.number = 0
        self.lines = 0
        self.upstream = "idle"
        self.upstream_error: CantobotError | None = None
        self._notices: dict[str, float] = {}
        #: Row ids (once written) of committed lines not yet amended by their timestamped twin.
        self._line_writes: dict[LineRef, asyncio.Future[int]] = {}
        #: Storage writes waiting for one of at most STORE_WRITERS writer tasks.
        self._store_queue: deque[Callable[[], Awaitable[None]]] = deque()
        self._writers = 0
        #: Most writer tasks ever running at once (the bound at work; read by tests).
        self.peak_writers = 0
        self._old_nick: str | None = None
        #: Set at shutdown (``loop.time()`` value): :meth:`close` gives Discord until then and
        #: leaves what it could not post (the minutes) for the next start.
        self.deadline: float | None = None

    # -- opening and closing ---------------------------------------------------------------------

    async def open(self, *, text_channel: discord.TextChannel,
                   voice_channel: discord.VoiceChannel | discord.StageChannel,
                   started_at: datetime, threads: bool, title: str | None = None) -> int:
        """Create the meeting's row, start the sink, mark the nickname. The consent notice comes
        once the voice call is joined and its encryption known (:meth:`post_consent`)."""
        self.meeting_id = await self.storage.start_meeting(
            guild_id=self.guild.id,
            text_channel_id=text_channel.id,
            voice_channel_id=voice_channel.id,
            title=minutes_fmt.meeting_title(voice_channel.name, started_at, title),
            started_at=started_at,
        )
        info = await self.storage.meeting_info(self.meeting_id)
        #: What members see (#1, #2 ... per guild); ``meeting_id`` is the row, across guilds.
        self.number = info.number if info is not None and info.number else self.meeting_id
        await self.sink.start()
        await self._set_nickname(transcribing=True)
        return self.meeting_id

    async def abort(self) -> None:
        """The meeting never went live: end its row, no minutes."""
        await self._set_nickname(transcribing=False)
        await self.sink.aclose(SINK_FLUSH_TIMEOUT)
        await self.storage.end_meeting(self.meeting_id, datetime.now(UTC))

    async def flush(self) -> None:
        """Wait for every storage write spawned so far (the last lines come with the flush)."""
        await self._tasks.wait_for(STORE_TASK)

    async def close(self) -> Minutes:
        """End the row, post the minutes, give the nickname back, flush Discord."""
        if self.deadline is not None:
            return await self._close_by(self.deadline)
        await self.storage.end_meeting(self.meeting_id, datetime.now(UTC))
        minutes = await self.storage.minutes(self.meeting_id)
        await self.post_minutes(minutes)
        await self._set_nickname(transcribing=False)
        await self.sink.aclose(SINK_FLUSH_TIMEOUT)
        return minutes

    async def _close_by(self, deadline: float) -> Minutes:
        """Shutdown's close: Discord gets until ``deadline``. The row is ended only once the
        minutes are posted; otherwise it stays open and the next start's crash recovery
        (:meth:`~bot.meeting.manager.MeetingManager.recover_unfinished`) posts them. Every
        line is already stored, so nothing said is lost either way."""
        ended_at = datetime.now(UTC)
        minutes = replace(await self.storage.minutes(self.meeting_id), ended_at=ended_at)
        if await self._before(deadline, self.post_minutes(minutes), "posting the minutes"):
            await self.storage.end_meeting(self.meeting_id, ended_at)
        else:
            log.warning("guild %s: meeting #%d left open: Discord did not take its minutes in "
                        "time; the next start posts them", self.guild.id, self.number)
        await self._before(deadline, self._set_nickname(transcribing=False),
                           "restoring the nickname")
        await self.sink.aclose(max(0.0, deadline - asyncio.get_running_loop().time()))
        return minutes

    async def _before(self, deadline: float, step: Awaitable[None], what: str) -> bool:
        """Run ``step`` until ``deadline``; False (logged) if it ran out of time or failed."""
        try:
            async with asyncio.timeout_at(deadline):
                await step
        except TimeoutError:
            log.warning("guild %s: shutting down: gave up %s (Discord unreachable?)",
                        self.guild.id, what)
            return False
        except Exception as exc:  # e.g. discord.py giving up on a refused connection
            log.warning("guild %s: shutting down: %s failed: %s", self.guild.id, what, exc)
            return False
        return True

    async def post_minutes(self, minutes: Minutes) -> None:
        post = MinutesPost.of(minutes, readability=self.readability)
        await self.sink.post_minutes(summary=post.text, files=post.files,
                                     nonce=minutes_nonce(self.meeting_id))

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

    # -- lines -----------------------------------------------------------------------------------

    def commit(self, ref: LineRef, segment: Segment, *, display_name: str,
               avatar_url: str | None) -> None:
        """A new line: stored now, posted in order."""
        self.lines += 1
        row: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._line_writes[ref] = row
        if len(self._line_writes) > LINE_REFS_KEPT:
            del self._line_writes[next(iter(self._line_writes))]
        self._store(functools.partial(self._store_line, segment, row))
        self.sink.post_line(segment, display_name=display_name, avatar_url=avatar_url)
        log.info("guild %s: line %d from %s posted", self.guild.id, self.lines, segment.speaker)

    def amend(self, ref: LineRef, segment: Segment) -> None:
        """The timestamped twin of line ``ref``: its words and better times replace the row's."""
        self._store(functools.partial(self._store_words, ref, segment))

    def _store(self, write: Callable[[], Awaitable[None]]) -> None:
        """Queue a storage write; at most :data:`STORE_WRITERS` tasks run the queue."""
        self._store_queue.append(write)
        if self._writers < STORE_WRITERS:
            self._writers += 1
            self.peak_writers = max(self.peak_writers, self._writers)
            self._tasks.spawn(self._writer(), f"{STORE_TASK}writer-{self.lines}")

    async def _writer(self) -> None:
        try:
            while self._store_queue:
                write = self._store_queue.popleft()
                try:
                    await write()
                except Exception:
                    log.exception("guild %s: a storage write failed", self.guild.id)
        finally:
            self._writers -= 1

    async def _store_line(self, segment: Segment, row: asyncio.Future[int]) -> None:
        try:
            row.set_result(await self.storage.add_line(self.meeting_id, segment))
        except BaseException:
            row.cancel()  # its twin's words are then not stored (logged there)
            raise

    async def _store_words(self, ref: LineRef, segment: Segment) -> None:
        # The session emits a sentence's timestamped twin only after the sentence itself, whose
        # write may still be in flight: wait for that write and amend the row it made.
        write = self._line_writes.pop(ref, None)
        if write is None:  # not ours (cannot happen with one session per ref): keep the words
            log.warning("guild %s: an amend of unknown line %s stored as a line", self.guild.id,
                        ref)
            await self.storage.add_line(self.meeting_id, segment)
            return
        await asyncio.wait([write])
        if write.cancelled():
            log.warning("guild %s: words of line %s not stored: storing the line failed",
                        self.guild.id, ref)
            return
        await self.storage.update_line_words(write.result(), segment)

    # -- notices ---------------------------------------------------------------------------------

    async def post_consent(self, voice_channel: discord.VoiceChannel | discord.StageChannel,
                           notices: ConsentNotices) -> str | None:
        """The consent notice in the transcript channel, then in the voice channel's own chat;
        returns once Discord accepted both (None), else what failed, said to members."""
        if not await self.sink.post_notice_and_wait(notices.transcript_channel):
            return "Could not post the consent notice in the transcript channel."
        try:
            await voice_channel.send(inert(notices.voice_chat),
                                     allowed_mentions=discord.AllowedMentions.none())
        except discord.HTTPException as exc:
            log.warning("guild %s: consent notice not accepted in the chat of voice channel %s: "
                        "%s", self.guild.id, voice_channel.id, exc)
            return (f"Could not post the consent notice in the chat of the voice channel "
                    f"{voice_channel.name} ({exc}); grant me Send Messages there.")
        return None

    def say(self, text: str) -> None:
        self.sink.post_notice(text)

    def notice_once(self, kind: str, text: str) -> None:
        now = time.monotonic()
        last = self._notices.get(kind)
        if last is not None and now - last < NOTICE_COOLDOWN:
            return
        self._notices[kind] = now
        log.warning("guild %s: %s", self.guild.id, text)
        self.sink.post_notice(text)

    def upstream_state(self, state: SttState, error: CantobotError | None) -> None:
        """A session changed state: report trouble once, and its end once."""
        self.upstream = state.name.lower()
        if error is not None:
            self.upstream_trouble(error)
        elif state is SttState.STREAMING and self.upstream_error is not None:
            self.upstream_error = None
            self.notice_once("stt-recovered", "\N{WHITE HEAVY CHECK MARK} Speech-to-text is "
                                              "back; transcription continues.")

    def upstream_trouble(self, error: CantobotError) -> None:
        self.upstream_error = error
        kind = "stt-auth" if isinstance(error, SttAuthError) else f"stt-{type(error).__name__}"
        kind += getattr(error, "notice_key", "")  # a loss is said per speaker (SttAudioLost)
        # The STT server's words are outside text: one line, cut, no link or ping survives.
        text = (f"\N{WARNING SIGN} {outside(error.user_message, ERROR_BUDGET)}"
                + ("" if error.permanent else " — retrying; nothing said is lost."))
        self.notice_once(kind, text)

    def upstream_text(self) -> str:
        if self.upstream_error is None:
            return self.upstream
        return f"{self.upstream}: {self.upstream_error.user_message}"
