"""Post one meeting's transcript into a Discord text channel: lines, captions, minutes.

Job: turn committed segments, live partials and the final minutes into Discord messages,
in order, shown as the speaker when possible, never pinging anyone.

Boundary: an adapter over discord.py. Formatting (escaping, splitting, names) is
:mod:`bot.transcript.format`; ordering, retries and burst merging are :mod:`bot.sinks.outbox`.
This module decides *what* to send *where*, and owns one :class:`~bot.sinks.outbox.Outbox` per
destination: the channel, and each speaker's caption thread. A slow or rate-limited thread
therefore never delays the channel, while order within each destination stays strict.

Modes (decided once in :meth:`DiscordTranscriptSink.start`):

* webhook: the channel webhook ``cantobot captions`` posts each line under the speaker's display
  name and avatar (needs Manage Webhooks);
* fallback: without that permission the bot posts ``**alice** `[01:23]` text`` itself.

Every send carries ``allowed_mentions=AllowedMentions.none()`` and all user text is escaped by
:func:`bot.transcript.format.escape` (defence in depth: neither alone may ping).

Captions (``captions=True``): the speaker's live partial is one message in their thread, edited
at most once per ``caption_interval`` (the latest text wins; pending edits coalesce). When the
committed line arrives the caption message is edited into the committed text, and the next
partial starts a new caption message.

Known limits: Discord has no idempotency key for webhook executions or thread creation, so a
5xx after Discord already acted can duplicate that one message or thread on retry. Plain bot
messages carry an enforced ``nonce``, which Discord uses to drop such duplicates.
"""

from __future__ import annotations

import asyncio
import enum
import io
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import discord

from bot.errors import LocalError
from bot.sinks.outbox import Item, Outbox
from bot.transcript.escape import inert
from bot.transcript.format import (
    ELLIPSIS,
    MAX_MESSAGE_CHARS,
    escape,
    line_messages,
    message_length,
    split_message,
    thread_name,
    webhook_username,
)
from bot.transcript.model import Segment
from bot.transcript.script import PLAIN, Readability, convert

log = logging.getLogger(__name__)

#: The channel webhook we create once and reuse across meetings (a name without
#: "discord"/"clyde", which Discord rejects in webhook names).
WEBHOOK_NAME = "cantobot captions"
#: Caption threads hide after a day of inactivity (one of Discord's allowed values, minutes).
THREAD_AUTO_ARCHIVE_MINUTES: Literal[60, 1440, 4320, 10080] = 1440
#: Shown after a live partial so readers can tell it from a committed line.
CAPTION_MARK = " " + ELLIPSIS
#: Never ping anyone: users, roles, @everyone/@here, replies.
NO_MENTIONS = discord.AllowedMentions.none()

UserKey = int | str


class SinkStateError(LocalError):
    """The sink was used before ``start()`` (our bug)."""

    permanent = True


class SinkMode(enum.Enum):
    NEW = "new"
    WEBHOOK = "webhook"  # lines shown as the speaker
    FALLBACK = "fallback"  # lines posted by the bot with the speaker's name in bold
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SinkStats:
    lines_posted: int  # committed lines accepted by post_line
    messages_sent: int  # successful sends and edits, all destinations
    rate_limited: int  # 429s that reached the outboxes (discord.py retries most by itself)
    retries: int
    permanent_failures: int  # items dropped after a permanent failure


# -- outbox payloads: what a queued item asks the destination's send() to do -------------------


@dataclass(frozen=True, slots=True)
class _Author:
    """Who a message appears from: a webhook persona, or the bot itself (username None)."""

    username: str | None = None
    avatar_url: str | None = None


_BOT = _Author()


@dataclass(frozen=True, slots=True)
class _Post:
    author: _Author
    nonce: str  # enforced by Discord for bot messages, so a retried POST is not duplicated


@dataclass(frozen=True, slots=True)
class _Attachments:
    files: tuple[tuple[str, str], ...]  # (file name, text content)
    nonce: str


@dataclass(frozen=True, slots=True)
class _LinePost:
    """A committed line as it is posted, built once: whose line (``key``), as whom
    (``author``), and its messages (each an :class:`Item` already split to the limit and
    measured). The same value goes to the channel's outbox and to the speaker's thread's."""

    key: UserKey
    author: _Author
    items: tuple[Item, ...]
    label: str


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
    author: _Author


@dataclass(frozen=True, slots=True)
class _CaptionCommit:
    caption: _Caption
    author: _Author
    nonce: str


@dataclass(eq=False)
class _Speaker:
    key: UserKey
    display_name: str
    avatar_url: str | None = None
    thread: discord.Thread | None = None
    outbox: Outbox | None = None
    caption: _Caption | None = None


def _nonce() -> str:
    """A fresh message nonce (Discord accepts up to 25 characters; 63 bits is 19 digits)."""
    return str(secrets.randbits(63))


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


class DiscordTranscriptSink:
    """Everything one meeting posts into one text channel (see the module docstring)."""

    def __init__(
        self,
        *,
        channel: discord.TextChannel,
        bot_user_name: str,
        threads: bool,
        captions: bool,
        caption_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        readability: Readability = PLAIN,
    ) -> None:
        #: Script and Jyutping of posted lines (and the script of live captions).
        self._readability = readability
        self._channel = channel
        self._bot_user_name = bot_user_name
        self._threads = threads
        self._captions = captions
        self._caption_interval = caption_interval
        self._clock = clock
        self._mode = SinkMode.NEW
        self._webhook: discord.Webhook | None = None
        self._speakers: dict[UserKey, _Speaker] = {}
        self._threads_disabled = False
        self._lines_posted = 0
        self._outbox = Outbox(self._send_channel, name=f"#{channel.name}", clock=clock)
        self._close_lock = asyncio.Lock()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def mode(self) -> SinkMode:
        return self._mode

    def _set_mode(self, mode: SinkMode) -> None:
        log.info("sink for #%s: %s -> %s", self._channel.name, self._mode.value, mode.value)
        self._mode = mode

    async def start(self) -> None:
        """Find or create the captions webhook; without Manage Webhooks, post as the bot."""
        if self._mode is not SinkMode.NEW:
            raise SinkStateError(f"sink for #{self._channel.name} already started")
        try:
            self._webhook = await self._find_or_create_webhook()
        except discord.Forbidden as exc:
            log.warning(
                "cannot use a webhook in #%s (Manage Webhooks missing: %s); lines will be "
                "posted by %s with the speaker's name in bold",
                self._channel.name,
                exc.text or exc.status,
                self._bot_user_name,
            )
        except discord.HTTPException as exc:
            log.warning(
                "cannot use a webhook in #%s (%s %s); posting as %s instead",
                self._channel.name,
                exc.status,
                exc.text,
                self._bot_user_name,
            )
        self._set_mode(SinkMode.WEBHOOK if self._webhook is not None else SinkMode.FALLBACK)
        self._outbox.start()

    async def _find_or_create_webhook(self) -> discord.Webhook:
        for hook in await self._channel.webhooks():
            # Only webhooks our application created carry a token we can post with.
            if hook.name == WEBHOOK_NAME and hook.token:
                return hook
        return await self._channel.create_webhook(
            name=WEBHOOK_NAME, reason="cantobot: show transcript lines under each speaker's name"
        )

    async def aclose(self, flush_timeout: float = 10.0) -> None:
        """Deliver what can be delivered within ``flush_timeout`` (all destinations at once),
        then stop every worker. Idempotent."""
        async with self._close_lock:
            if self._mode is SinkMode.CLOSED:
                return
            self._mode = SinkMode.CLOSED
            boxes = [self._outbox] + [s.outbox for s in self._speakers.values() if s.outbox]
            for speaker in self._speakers.values():
                if speaker.caption is not None:
                    speaker.caption.closed.set()
            await asyncio.gather(*(box.aclose(flush_timeout) for box in boxes))
            log.info("sink for #%s closed: %s", self._channel.name, self.stats)

    @property
    def stats(self) -> SinkStats:
        boxes = [self._outbox] + [s.outbox for s in self._speakers.values() if s.outbox]
        each = [b.stats for b in boxes]
        return SinkStats(
            lines_posted=self._lines_posted,
            messages_sent=sum(s.sent for s in each),
            rate_limited=sum(s.rate_limited for s in each),
            retries=sum(s.retried for s in each),
            permanent_failures=sum(s.dropped_permanent for s in each),
        )

    def _accepting(self, what: str) -> bool:
        if self._mode is SinkMode.NEW:
            raise SinkStateError(f"sink for #{self._channel.name} used before start() ({what})")
        if self._mode is SinkMode.CLOSED:
            log.warning(
                "sink for #%s is closed; %s not posted (kept in storage)", self._channel.name, what
            )
            return False
        return True

    # -- public posting API -------------------------------------------------------------------

    def post_notice(self, text: str) -> None:
        """A plain bot message in the channel (start/stop notices), ordered with the lines.

        ``text`` is ours, not speech, so it is not escaped; values from outside in it (names,
        STT error text) must come through :func:`bot.transcript.escape.outside`. Whatever
        slipped through, no mention, masked link or link survives :func:`inert`.
        """
        if not self._accepting("notice"):
            return
        for part in split_message(inert(text)):
            self._outbox.put(
                Item(part, merge_key=_BOT, payload=_Post(_BOT, _nonce()), label="notice")
            )

    async def post_notice_and_wait(self, text: str) -> bool:
        """:meth:`post_notice`, returning once Discord has accepted it (True) or it was dropped
        (False): the consent notice, which must be in the channel before any audio is sent."""
        if not self._accepting("notice"):
            return False
        parts = split_message(inert(text))
        for part in parts[:-1]:
            self._outbox.put(
                Item(part, merge_key=_BOT, payload=_Post(_BOT, _nonce()), label="notice")
            )
        return await self._outbox.put_and_wait(
            Item(parts[-1], payload=_Post(_BOT, _nonce()), label="consent notice"))

    def post_line(
        self, segment: Segment, *, display_name: str, avatar_url: str | None
    ) -> None:
        """A committed line: in the channel as the speaker, and in their thread if enabled.

        The speaker is keyed by ``segment.speaker_id`` (or ``segment.speaker`` when unknown);
        :meth:`update_caption` must use the same key.
        """
        if not self._accepting("line"):
            return
        self._lines_posted += 1
        post = self._line_post(segment, display_name, avatar_url)
        for item in post.items:
            self._outbox.put(item)
        speaker = self._speaker(post.key, display_name, avatar_url)
        caption = speaker.caption
        if self._threads_disabled or not (self._threads or caption is not None):
            return
        box = self._thread_outbox(speaker)
        rest = post.items
        if caption is not None:
            # The committed text replaces the live caption; the next partial starts afresh.
            speaker.caption = None
            caption.closed.set()
            first, rest = post.items[0], post.items[1:]
            box.put(replace(first, merge_key=None,
                            payload=_CaptionCommit(caption, post.author, _nonce())))
        for item in rest:
            # A nonce per destination: Discord drops a repeated nonce as a duplicate.
            box.put(replace(item, payload=_Post(post.author, _nonce())))

    def _line_post(self, segment: Segment, display_name: str,
                   avatar_url: str | None) -> _LinePost:
        author = self._author(display_name, avatar_url)
        label = f"line by {display_name}"
        parts = line_messages(segment, with_speaker=author.username is None,
                              readability=self._readability)
        items = tuple(Item(part, merge_key=author, payload=_Post(author, _nonce()), label=label)
                      for part in parts)
        key: UserKey = segment.speaker_id if segment.speaker_id is not None else segment.speaker
        return _LinePost(key, author, items, label)

    def update_caption(self, user_key: UserKey, text: str, *, display_name: str) -> None:
        """Show ``text`` as the speaker's live partial (throttled; latest text wins)."""
        if not self._accepting("caption"):
            return
        if not self._captions or self._threads_disabled or not text.strip():
            return
        speaker = self._speaker(user_key, display_name, None)
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

    def silence(self, user_key: UserKey) -> None:
        """A member opted out: their live caption is not edited any more (a queued edit is
        dropped); their next words would start a new one, but none come."""
        speaker = self._speakers.get(user_key)
        if speaker is not None and speaker.caption is not None:
            speaker.caption.closed.set()
            speaker.caption = None

    async def post_minutes(self, *, summary: str, files: dict[str, str]) -> None:
        """The summary with the minutes files attached, after every line queued before it.

        Returns once it is delivered (or dropped after a permanent failure, which is logged).
        """
        if not self._accepting("minutes"):
            return
        parts = split_message(summary) or ["Minutes"]
        for part in parts[:-1]:
            self._outbox.put(Item(part, payload=_Post(_BOT, _nonce()), label="minutes summary"))
        item = Item(
            parts[-1],
            payload=_Attachments(tuple(files.items()), _nonce()),
            label="minutes with attachments",
        )
        if not await self._outbox.put_and_wait(item):
            log.error("minutes for #%s were not posted; they are in storage", self._channel.name)

    # -- helpers ------------------------------------------------------------------------------

    def _author(self, display_name: str, avatar_url: str | None) -> _Author:
        if self._webhook is None:
            return _BOT
        return _Author(webhook_username(display_name), avatar_url)

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
                await self._send_thread(speaker, item)

            speaker.outbox = Outbox(
                send, name=f"#{self._channel.name}/{speaker.display_name}", clock=self._clock
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
                if not self._threads_disabled:
                    self._threads_disabled = True
                    log.warning(
                        "cannot create threads in #%s (Create Public Threads missing); "
                        "caption threads are off for this meeting",
                        self._channel.name,
                    )
                raise
            log.info("created caption thread %r", speaker.thread.name)
        return speaker.thread

    # -- the send functions the outboxes call ---------------------------------------------------

    async def _send_channel(self, item: Item) -> None:
        payload = item.payload
        if isinstance(payload, _Post):
            await self._post(self._channel, None, item.text, payload.author, payload.nonce)
        elif isinstance(payload, _Attachments):
            files = [
                discord.File(io.BytesIO(content.encode("utf-8")), filename=name)
                for name, content in payload.files
            ]
            await self._channel.send(
                item.text, files=files, allowed_mentions=NO_MENTIONS, nonce=payload.nonce
            )
        else:  # pragma: no cover - a bug in this module
            raise TypeError(f"unexpected channel item {payload!r}")

    async def _send_thread(self, speaker: _Speaker, item: Item) -> None:
        payload = item.payload
        if self._threads_disabled and speaker.thread is None:
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
            await self._post(thread, thread, item.text, payload.author, payload.nonce)
        elif isinstance(payload, _Post):
            await self._post(thread, thread, item.text, payload.author, payload.nonce)
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
            caption.message = await self._post(thread, thread, text, edit.author, _nonce())
        elif text != caption.shown:
            await caption.message.edit(content=text, allowed_mentions=NO_MENTIONS)
        caption.shown = text
        caption.last_sent = self._clock()

    async def _post(
        self,
        dest: discord.TextChannel | discord.Thread,
        thread: discord.Thread | None,
        text: str,
        author: _Author,
        nonce: str,
    ) -> discord.Message | discord.WebhookMessage:
        if author.username is not None and self._webhook is not None:
            kwargs: dict[str, Any] = {}
            if thread is not None:
                kwargs["thread"] = thread
            if author.avatar_url is not None:
                kwargs["avatar_url"] = author.avatar_url
            return await self._webhook.send(
                text,
                username=author.username,
                allowed_mentions=NO_MENTIONS,
                wait=True,
                **kwargs,
            )
        return await dest.send(text, allowed_mentions=NO_MENTIONS, nonce=nonce)

