"""What a queued outbox item asks a destination's ``send()`` to do, shared by the channel
(:mod:`bot.sinks.discord_sink`) and the caption threads (:mod:`bot.sinks.threads`).

Pure values plus the one mention policy; no sending happens here.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import discord

#: Never ping anyone: users, roles, @everyone/@here, replies.
NO_MENTIONS = discord.AllowedMentions.none()

#: A speaker: their Discord user id, or their name when the id is unknown.
UserKey = int | str


@dataclass(frozen=True, slots=True)
class Author:
    """Who a message appears from: a webhook persona, or the bot itself (username None)."""

    username: str | None = None
    avatar_url: str | None = None


#: The bot itself (fallback mode, notices, minutes).
BOT = Author()


@dataclass(frozen=True, slots=True)
class Post:
    """Send the item's text as a new message."""

    author: Author
    nonce: str  # enforced by Discord for bot messages, so a retried POST is not duplicated


def new_nonce() -> str:
    """A fresh message nonce (Discord accepts up to 25 characters; 63 bits is 19 digits)."""
    return str(secrets.randbits(63))


def minutes_nonce(meeting_id: int) -> str:
    """The nonce of a meeting's minutes message, the same every time they are posted: a post
    Discord took but answered too late (at shutdown) and the next start's recovery post are
    then one message, as Discord returns the first for a nonce it saw in the past minutes."""
    return f"minutes-{meeting_id}"


#: Send ``text`` as ``author`` into a thread (the sink knows the webhook, if any): returns the
#: message, so a live caption can be edited later.
ThreadPost = Callable[
    [discord.Thread, str, Author, str], Awaitable[discord.Message | discord.WebhookMessage]
]
#: Who a speaker's messages appear from, given their display name and avatar.
AuthorOf = Callable[[str, str | None], Author]
