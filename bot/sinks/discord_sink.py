"""Post one meeting's transcript into a Discord text channel: lines, captions, minutes.

Job: turn committed segments, live partials and the final minutes into Discord messages,
in order, shown as the speaker when possible, never pinging anyone.

Boundary: an adapter over discord.py. Formatting (escaping, splitting, names) is
:mod:`bot.transcript.format`; ordering, retries and burst merging are :mod:`bot.sinks.outbox`.
This module decides *what* to send *where*, and owns the channel's
:class:`~bot.sinks.outbox.Outbox`; each speaker's caption thread, with its own outbox, is
:class:`~bot.sinks.threads.CaptionThreads`. A slow or rate-limited thread therefore never delays
the channel, while order within each destination stays strict.

Modes (decided once in :meth:`DiscordTranscriptSink.start`):

* webhook: the channel webhook ``cantobot captions`` posts each line under the speaker's display
  name and avatar (needs Manage Webhooks);
* fallback: without that permission the bot posts ``**alice** `[01:23]` text`` itself.

Every send carries ``allowed_mentions=AllowedMentions.none()`` and all user text is escaped by
:func:`bot.transcript.format.escape` (defence in depth: neither alone may ping).

Captions (``captions=True``): the speaker's live partial is one message in their thread, edited
into the committed line when it arrives (see :mod:`bot.sinks.threads`).

Known limits: Discord has no idempotency key for webhook executions or thread creation, so a
5xx after Discord already acted can duplicate that one message or thread on retry. Plain bot
messages carry an enforced ``nonce``, which Discord uses to drop such duplicates.
"""

from __future__ import annotations

import asyncio
import enum
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import discord

from bot.errors import LocalError
from bot.sinks.outbox import Item, Outbox
from bot.sinks.payloads import BOT as _BOT
from bot.sinks.payloads import NO_MENTIONS as NO_MENTIONS
from bot.sinks.payloads import Author as _Author
from bot.sinks.payloads import Post as _Post
from bot.sinks.payloads import UserKey as UserKey
from bot.sinks.payloads import new_nonce as _nonce
from bot.sinks.threads import CAPTION_MARK as CAPTION_MARK
from bot.sinks.threads import THREAD_AUTO_ARCHIVE_MINUTES as THREAD_AUTO_ARCHIVE_MINUTES
from bot.sinks.threads import CaptionThreads
from bot.transcript.escape import inert
from bot.transcript.format import line_messages, split_message, webhook_username
from bot.transcript.model import Segment
from bot.transcript.script import PLAIN, Readability

log = logging.getLogger(__name__)

#: The channel webhook we create once and reuse across meetings (a name without
#: "discord"/"clyde", which Discord rejects in webhook names).
WEBHOOK_NAME = "cantobot captions"
#: Said once per meeting when lines back up (a flood from speech-to-text, or Discord slow).
BACKLOG_NOTICE = (
    "\N{WARNING SIGN} Lines are coming faster than Discord takes them: they are merged into "
    "fewer messages from now on. Every line is kept in the minutes."
)


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
    dropped_backlog: int = 0  # lines not queued for Discord past the bound (still stored)
    peak_waiting: int = 0  # most messages waiting at once in any one destination


# -- channel payloads (the shared ones are in bot.sinks.payloads) ------------------------------


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


async def _post(
    webhook: discord.Webhook | None,
    dest: discord.TextChannel | discord.Thread,
    thread: discord.Thread | None,
    text: str,
    author: _Author,
    nonce: str,
) -> discord.Message | discord.WebhookMessage:
    """Send ``text`` into ``dest`` as ``author``: through the webhook under the speaker's name
    when there is one, else as the bot (with ``nonce``). Never pings."""
    if author.username is not None and webhook is not None:
        kwargs: dict[str, Any] = {}
        if thread is not None:
            kwargs["thread"] = thread
        if author.avatar_url is not None:
            kwargs["avatar_url"] = author.avatar_url
        return await webhook.send(
            text,
            username=author.username,
            allowed_mentions=NO_MENTIONS,
            wait=True,
            **kwargs,
        )
    return await dest.send(text, allowed_mentions=NO_MENTIONS, nonce=nonce)


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
        self._mode = SinkMode.NEW
        self._webhook: discord.Webhook | None = None
        self._lines_posted = 0
        self._backlog_noticed = False
        self._outbox = Outbox(self._send_channel, name=f"#{channel.name}", clock=clock,
                              on_backlog=self._on_backlog)
        self._threads = CaptionThreads(
            channel=channel, threads=threads, captions=captions, post=self._post_in_thread,
            author=self._author, caption_interval=caption_interval, clock=clock,
            readability=readability, on_backlog=self._on_backlog,
        )
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
            boxes = [self._outbox, *self._threads.outboxes]
            self._threads.close_captions()
            await asyncio.gather(*(box.aclose(flush_timeout) for box in boxes))
            log.info("sink for #%s closed: %s", self._channel.name, self.stats)

    @property
    def stats(self) -> SinkStats:
        boxes = [self._outbox, *self._threads.outboxes]
        each = [b.stats for b in boxes]
        return SinkStats(
            lines_posted=self._lines_posted,
            messages_sent=sum(s.sent for s in each),
            rate_limited=sum(s.rate_limited for s in each),
            retries=sum(s.retried for s in each),
            permanent_failures=sum(s.dropped_permanent for s in each),
            dropped_backlog=sum(s.dropped_backlog for s in each),
            peak_waiting=max(s.peak_entries for s in each),
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
        self._threads.commit(post.key, display_name, avatar_url, post.author, post.items)

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
        self._threads.update_caption(user_key, text, display_name=display_name)

    def silence(self, user_key: UserKey) -> None:
        """A member opted out: their live caption is not edited any more (a queued edit is
        dropped); their next words would start a new one, but none come."""
        self._threads.silence(user_key)

    async def post_minutes(self, *, summary: str, files: dict[str, str],
                           nonce: str | None = None) -> None:
        """The summary with the minutes files attached, after every line queued before it;
        ``nonce`` (:func:`~bot.sinks.payloads.minutes_nonce`) for the message with the files.

        Returns once it is delivered (or dropped after a permanent failure, which is logged).
        """
        if not self._accepting("minutes"):
            return
        parts = split_message(summary) or ["Minutes"]
        for part in parts[:-1]:
            self._outbox.put(Item(part, payload=_Post(_BOT, _nonce()), label="minutes summary"))
        item = Item(
            parts[-1],
            payload=_Attachments(tuple(files.items()), nonce or _nonce()),
            label="minutes with attachments",
        )
        if not await self._outbox.put_and_wait(item):
            log.error("minutes for #%s were not posted; they are in storage", self._channel.name)

    # -- helpers ------------------------------------------------------------------------------

    def _on_backlog(self) -> None:
        """An outbox started merging lines under a backlog: say so once in the channel."""
        if self._backlog_noticed:
            return
        self._backlog_noticed = True
        self.post_notice(BACKLOG_NOTICE)

    def _author(self, display_name: str, avatar_url: str | None) -> _Author:
        if self._webhook is None:
            return _BOT
        return _Author(webhook_username(display_name), avatar_url)

    # -- the send functions the outboxes call ---------------------------------------------------

    async def _send_channel(self, item: Item) -> None:
        payload = item.payload
        if isinstance(payload, _Post):
            await _post(self._webhook, self._channel, None, item.text, payload.author,
                        payload.nonce)
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

    async def _post_in_thread(self, thread: discord.Thread, text: str, author: _Author,
                              nonce: str) -> discord.Message | discord.WebhookMessage:
        return await _post(self._webhook, thread, thread, text, author, nonce)
