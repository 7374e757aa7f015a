"""Each speaker's caption thread in one channel: their committed lines and live captions.

Job: keep one Discord thread per speaker, created on first use, and one
:class:`~bot.sinks.outbox.Outbox` per thread, so a slow or rate-limited thread never delays the
channel or another speaker, while order within each thread stays strict.

Captions (``captions=True``): the speaker's live partial is one message in their thread, edited
at most once per ``caption_interval`` (the latest text wins; pending edits coalesce). When the
committed line arrives the caption message is edited into the committed text, and the next
partial starts a new caption message. Without Create Public Threads, threads are off for the
rest of the meeting (said once); lines still reach the channel.

Boundary: composed by :class:`~bot.sinks.discord_sink.DiscordTranscriptSink`, which posts to the
channel, decides the mode and hands in how to post as a speaker (``post``, ``author``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import discord

from bot.sinks.outbox import Item, Outbox
from bot.sinks.payloads import (
    NO_MENTIONS,
    Author,
    AuthorOf,
    Post,
    ThreadPost,
    UserKey,
    new_nonce,
)
from bot.transcript.format import (
    ELLIPSIS,
    MAX_MESSAGE_CHARS,
    escape,
    message_length,
    thread_name,
)
from bot.transcript.script import PLAIN, Readability, convert

log = logging.getLogger(__name__)

#: Caption threads hide after a day of inactivity (one of Discord's allowed values, minutes).
THREAD_AUTO_ARCHIVE_MINUTES: Literal[60, 1440, 4320, 10080] = 1440
#: Shown after a live partial so readers can tell it from a committed line.
CAPTION_MARK = " " + ELLIPSIS


@dataclass(eq=False)
class _Caption:
    """One live caption message and the text it should show."""

    latest: str = ""
    message: discord.Message | discord.WebhookMessage | None = None
    shown: str | None = None
    last_sent: float | None = None
    queued: bool = False  # an edit item is waiting in the thread's outbox
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # the committed line arrived


@dataclass(frozen=True, slots=True)
class _CaptionEdit:
    caption: _Caption
    author: Author


@dataclass(frozen=True, slots=True)
class _CaptionCommit:
    caption: _Caption
    author: Author
    nonce: str


@dataclass(eq=False)
class _Speaker:
    key: UserKey
    display_name: str
    avatar_url: str | None = None
    thread: discord.Thread | None = None
    outbox: Outbox | None = None
    caption: _Caption | None = None


def _caption_text(text: str) -> str:
    """A partial as shown: one line, escaped, a trailing mark; when too long, the newest
    words are kept (cut before escaping, so an escape is never torn in half)."""
    raw = " ".join(text.split())
    room = MAX_MESSAGE_CHARS - len(CAPTION_MARK) - len(ELLIPSIS)
    shown = escape(raw)
    if message_length(shown) > room:
        while message_length(shown) > room:
            excess = message_length(shown) - room
            raw = raw[max(1, excess // 2) :]
            shown = escape(raw)
        shown = ELLIPSIS + shown
    return shown + CAPTION_MARK


class CaptionThreads:
    """The per-speaker caption threads of one channel (see the module docstring)."""

    def __init__(
        self,
        *,
        channel: discord.TextChannel,
        threads: bool,
        captions: bool,
        post: ThreadPost,
        author: AuthorOf,
        caption_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        readability: Readability = PLAIN,
        on_backlog: Callable[[], None] | None = None,
    ) -> None:
        self._channel = channel
        self._threads = threads
        self._captions = captions
        self._post = post
        self._author = author
        self._caption_interval = caption_interval
        self._clock = clock
        self._readability = readability
        self._on_backlog = on_backlog
        self._speakers: dict[UserKey, _Speaker] = {}
        self._disabled = False  # Create Public Threads is missing: off for this meeting

    @property
    def outboxes(self) -> list[Outbox]:
        """The thread outboxes started so far (for closing and stats)."""
        return [s.outbox for s in self._speakers.values() if s.outbox]

    def close_captions(self) -> None:
        """Stop every live caption's edits (on close: waiting edits end at once)."""
        for speaker in self._speakers.values():
            if speaker.caption is not None:
                speaker.caption.closed.set()

    def commit(self, key: UserKey, display_name: str, avatar_url: str | None,
               author: Author, items: tuple[Item, ...]) -> None:
        """A committed line (``items``, already split and measured) in the speaker's thread:
        it replaces their live caption, if any, else it is posted when threads are on."""
        speaker = self._speaker(key, display_name, avatar_url)
        caption = speaker.caption
        if self._disabled or not (self._threads or caption is not None):
            return
        box = self._thread_outbox(speaker)
        rest = items
        if caption is not None:
            # The committed text replaces the live caption; the next partial starts afresh.
            speaker.caption = None
            caption.closed.set()
            first, rest = items[0], items[1:]
            box.put(replace(first, merge_key=None,
                            payload=_CaptionCommit(caption, author, new_nonce())))
        for item in rest:
            # A nonce per destination: Discord drops a repeated nonce as a duplicate.
            box.put(replace(item, payload=Post(author, new_nonce())))

    def update_caption(self, key: UserKey, text: str, *, display_name: str) -> None:
        """Show ``text`` as the speaker's live partial (throttled; latest text wins)."""
        if not self._captions or self._disabled or not text.strip():
            return
        speaker = self._speaker(key, display_name, None)
        caption = speaker.caption
        if caption is None:
            caption = speaker.caption = _Caption()
        caption.latest = text
        if not caption.queued:
            caption.queued = True
            author = self._author(speaker.display_name, speaker.avatar_url)
            self._thread_outbox(speaker).put(
                Item(payload=_CaptionEdit(caption, author), label=f"caption of {display_name}")
            )

    def silence(self, key: UserKey) -> None:
        """A member opted out: their live caption is not edited any more (a queued edit is
        dropped); their next words would start a new one, but none come."""
        speaker = self._speakers.get(key)
        if speaker is not None and speaker.caption is not None:
            speaker.caption.closed.set()
            speaker.caption = None

    # -- helpers ------------------------------------------------------------------------------

    def _speaker(self, key: UserKey, display_name: str, avatar_url: str | None) -> _Speaker:
        speaker = self._speakers.get(key)
        if speaker is None:
            speaker = self._speakers[key] = _Speaker(key, display_name, avatar_url)
        else:
            speaker.display_name = display_name
            if avatar_url is not None:
                speaker.avatar_url = avatar_url
        return speaker

    def _thread_outbox(self, speaker: _Speaker) -> Outbox:
        if speaker.outbox is None:

            async def send(item: Item) -> None:
                await self._send(speaker, item)

            speaker.outbox = Outbox(
                send, name=f"#{self._channel.name}/{speaker.display_name}", clock=self._clock,
                on_backlog=self._on_backlog,
            )
            speaker.outbox.start()
        return speaker.outbox

    async def _ensure_thread(self, speaker: _Speaker) -> discord.Thread:
        """The speaker's caption thread, created on first use (inside its outbox, so once)."""
        if speaker.thread is None:
            try:
                speaker.thread = await self._channel.create_thread(
                    name=thread_name(speaker.display_name),
                    type=discord.ChannelType.public_thread,
                    auto_archive_duration=THREAD_AUTO_ARCHIVE_MINUTES,
                    reason="cantobot: live captions for one speaker",
                )
            except discord.Forbidden:
                if not self._disabled:
                    self._disabled = True
                    log.warning(
                        "cannot create threads in #%s (Create Public Threads missing); "
                        "caption threads are off for this meeting",
                        self._channel.name,
                    )
                raise
            log.info("created caption thread %r", speaker.thread.name)
        return speaker.thread

    # -- the send function the thread outboxes call ---------------------------------------------

    async def _send(self, speaker: _Speaker, item: Item) -> None:
        payload = item.payload
        if self._disabled and speaker.thread is None:
            return  # already reported once; lines are in the channel and in storage
        if isinstance(payload, _CaptionEdit):
            await self._send_caption(speaker, payload)
            return
        thread = await self._ensure_thread(speaker)
        if isinstance(payload, _CaptionCommit):
            caption = payload.caption
            if caption.message is not None:
                await caption.message.edit(content=item.text, allowed_mentions=NO_MENTIONS)
                caption.shown = item.text
                return
            await self._post(thread, item.text, payload.author, payload.nonce)
        elif isinstance(payload, Post):
            await self._post(thread, item.text, payload.author, payload.nonce)
        else:  # pragma: no cover - a bug in this module
            raise TypeError(f"unexpected thread item {payload!r}")

    async def _send_caption(self, speaker: _Speaker, edit: _CaptionEdit) -> None:
        caption = edit.caption
        if caption.closed.is_set():
            return  # the committed line replaces it
        if caption.message is not None and caption.last_sent is not None:
            due = caption.last_sent + self._caption_interval - self._clock()
            if due > 0:
                # Wait out the throttle, but stop at once if the committed line arrives.
                try:
                    await asyncio.wait_for(caption.closed.wait(), due)
                except TimeoutError:
                    pass
                if caption.closed.is_set():
                    return
        thread = await self._ensure_thread(speaker)
        caption.queued = False  # partials from now on need another edit
        text = _caption_text(convert(caption.latest, self._readability.script))
        if caption.message is None:
            caption.message = await self._post(thread, text, edit.author, new_nonce())
        elif text != caption.shown:
            await caption.message.edit(content=text, allowed_mentions=NO_MENTIONS)
        caption.shown = text
        caption.last_sent = self._clock()
