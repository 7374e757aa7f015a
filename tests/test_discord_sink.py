"""Spec for bot/sinks/discord_sink.py, run with unmodified discord.py against LocalDiscord.

Everything goes over real sockets (TLS REST + gateway on 127.0.0.1); what "users see" is
``LocalDiscord.messages``. Bursts may be merged into one message, so line-level assertions
flatten messages into their lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot.sim.discord.server import LocalDiscord
from bot.sim.discord.state import ApiError, PostedMessage, RecordedRequest
from bot.sim.discord.tls import ssl_context_trusting
from bot.sinks.discord_sink import WEBHOOK_NAME, DiscordTranscriptSink, SinkMode
from bot.transcript.format import ZWSP, format_line
from bot.transcript.model import Segment

BOT_NAME = "Cantobot"


@dataclass
class Setup:
    discord: LocalDiscord
    client: discord.Client
    channel: discord.TextChannel

    def sink(self, **kwargs: object) -> DiscordTranscriptSink:
        defaults: dict[str, object] = {"threads": False, "captions": False}
        defaults.update(kwargs)
        return DiscordTranscriptSink(
            channel=self.channel, bot_user_name=BOT_NAME, **defaults  # type: ignore[arg-type]
        )

    def requests(self, method: str, path_part: str) -> list[RecordedRequest]:
        return [
            r for r in self.discord.requests if r.method == method and path_part in r.path
        ]


@contextlib.asynccontextmanager
async def local_discord(
    *, deny_webhooks: bool = False, deny_threads: bool = False
) -> AsyncIterator[Setup]:
    """A LocalDiscord with a logged-in discord.Client; optionally without Manage Webhooks or
    Create Public Threads."""
    fake = LocalDiscord()

    # LocalDiscord does not check the bot's permissions (and fail_next only injects 429/5xx),
    # so answer the guarded routes the way Discord does without the permission.
    async def missing_permissions(request: object) -> object:
        raise ApiError(403, 50013, "Missing Permissions")

    rest: Any = fake.rest
    if deny_webhooks:
        rest.post_webhook = rest.get_channel_webhooks = missing_permissions
    if deny_threads:
        rest.post_thread = missing_permissions
    saved = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    async with fake:
        Route.BASE = fake.api_base
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
        connector = aiohttp.TCPConnector(ssl=ssl_context_trusting(fake.ca_file))
        # on_ready waits guild_ready_timeout (2 s by default) after the last GUILD_CREATE.
        client = discord.Client(
            intents=discord.Intents.default(), connector=connector, guild_ready_timeout=0.05
        )
        ready = asyncio.Event()

        @client.event
        async def on_ready() -> None:
            ready.set()

        runner: asyncio.Task[None] | None = None
        try:
            await client.login(fake.token)
            runner = asyncio.create_task(client.connect(reconnect=False), name="test-client")
            await asyncio.wait_for(ready.wait(), 10)
            channel = client.get_channel(fake.text_channel_id)
            assert isinstance(channel, discord.TextChannel)
            yield Setup(fake, client, channel)
        finally:
            await client.close()
            if runner is not None:
                # connect() returns once the client is closed; any error it ended with fails
                # the test instead of vanishing here.
                async with asyncio.timeout(10):
                    await runner
            Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = saved


def seg(text: str, *, speaker: str = "alice", start: float = 83.0, uid: int = 1) -> Segment:
    return Segment(speaker=speaker, text=text, start=start, end=start + 1.0, speaker_id=uid)


def lines_of(messages: list[PostedMessage]) -> list[str]:
    return [line for m in messages for line in m.content.split("\n")]


def assert_nobody_pinged(messages: list[PostedMessage]) -> None:
    assert messages, "nothing was posted"
    for m in messages:
        assert m.allowed_mentions == {"parse": []}, m


async def wait_until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait for what the local Discord recorded (``limit`` guards hangs; no speed assertion)."""
    async with asyncio.timeout(limit):
        # The sink posts through aiohttp to the local Discord: no one event covers both.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


# -- webhook and fallback ------------------------------------------------------------------------


async def test_lines_appear_under_the_speakers_name_through_the_captions_webhook() -> None:
    async with local_discord() as s:
        sink = s.sink()
        await sink.start()
        assert sink.mode is SinkMode.WEBHOOK
        alice = seg("今日開會", uid=1)
        sink.post_line(alice, display_name="alice", avatar_url=None)
        await sink.aclose()
        (msg,) = s.discord.messages
        assert (msg.author, msg.thread, msg.edit) == ("alice", None, False)
        assert msg.content == format_line(alice, with_speaker=False) == "`[01:23]` 今日開會"
        assert_nobody_pinged(s.discord.messages)
        assert sink.stats.lines_posted == 1 and sink.stats.messages_sent == 1


async def test_the_webhook_is_created_once_and_reused_by_the_next_meeting() -> None:
    async with local_discord() as s:
        for _ in range(2):
            sink = s.sink()
            await sink.start()
            sink.post_line(seg("hi"), display_name="alice", avatar_url=None)
            await sink.aclose()
        hooks = s.requests("POST", "/webhooks")
        assert [r.json["name"] for r in hooks if r.path.startswith("/channels/")] == [WEBHOOK_NAME]
        assert [m.author for m in s.discord.messages] == ["alice", "alice"]


async def test_without_manage_webhooks_the_bot_posts_with_the_name_in_bold_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with local_discord(deny_webhooks=True) as s:
        sink = s.sink()
        with caplog.at_level(logging.WARNING, logger="bot.sinks.discord_sink"):
            await sink.start()
        assert sink.mode is SinkMode.FALLBACK
        sink.post_line(seg("今日開會"), display_name="alice", avatar_url=None)
        sink.post_line(seg("好", speaker="bob", uid=2), display_name="bob", avatar_url=None)
        await sink.aclose()
        assert {m.author for m in s.discord.messages} == {BOT_NAME}
        assert lines_of(s.discord.messages) == [
            "**alice** `[01:23]` 今日開會",
            "**bob** `[01:23]` 好",
        ]
        assert_nobody_pinged(s.discord.messages)
        assert sum("Manage Webhooks" in r.getMessage() for r in caplog.records) == 1


async def test_a_2500_character_line_becomes_two_messages_split_at_a_word_boundary() -> None:
    async with local_discord() as s:
        sink = s.sink()
        await sink.start()
        words = [f"w{i:03d}" for i in range(500)]  # 500 x 5 chars = 2499 with spaces
        segment = seg(" ".join(words))
        sink.post_line(segment, display_name="alice", avatar_url=None)
        await sink.aclose()
        first, second = s.discord.messages
        assert len(first.content) <= 2000 and len(second.content) <= 2000
        full = format_line(segment, with_speaker=False)
        assert first.content + " " + second.content == full
        assert first.content.split()[-1] in words and second.content.split()[0] in words


# -- faults: nothing lost, order kept --------------------------------------------------------------


async def test_a_429_in_the_middle_of_20_lines_loses_nothing_and_keeps_order() -> None:
    async with local_discord() as s:
        sink = s.sink()
        await sink.start()
        texts = [f"line {i:02d}" for i in range(20)]
        for i, text in enumerate(texts):
            sink.post_line(seg(text, start=float(i)), display_name="alice", avatar_url=None)
            if i == 9:
                await wait_until(lambda: len(s.discord.messages) >= 1)
                s.discord.fail_next(1, status=429, path_prefix="/webhooks/", retry_after=0.2)
        await sink.aclose()
        posts = s.requests("POST", "/webhooks/")
        assert [r.status for r in posts].count(429) == 1
        limited = next(i for i, r in enumerate(posts) if r.status == 429)
        assert posts[limited + 1].at - posts[limited].at >= 0.2  # waited the header's delay
        shown = lines_of(s.discord.messages)
        assert [line.split("` ", 1)[1] for line in shown] == texts
        assert_nobody_pinged(s.discord.messages)


async def test_server_errors_are_retried_until_the_line_lands_once() -> None:
    async with local_discord(deny_webhooks=True) as s:
        sink = s.sink()
        await sink.start()
        prefix = f"/channels/{s.channel.id}/messages"
        # 503 reaches our outbox directly (discord.py only retries 500/502/504/524 itself);
        # the 500 is retried inside discord.py. Either way the line lands exactly once.
        s.discord.fail_next(1, status=503, path_prefix=prefix)
        sink.post_line(seg("first"), display_name="alice", avatar_url=None)
        await wait_until(lambda: len(s.discord.messages) == 1)
        s.discord.fail_next(1, status=500, path_prefix=prefix)
        sink.post_line(seg("second"), display_name="alice", avatar_url=None)
        await sink.aclose()
        assert lines_of(s.discord.messages) == [
            "**alice** `[01:23]` first",
            "**alice** `[01:23]` second",
        ]
        assert [r.status for r in s.requests("POST", prefix)] == [503, 200, 500, 200]
        assert sink.stats.retries == 1 and sink.stats.permanent_failures == 0


# -- threads and captions ------------------------------------------------------------------------


async def test_each_speaker_gets_one_thread_created_on_their_first_line() -> None:
    async with local_discord() as s:
        sink = s.sink(threads=True)
        await sink.start()
        sink.post_line(seg("one", uid=1), display_name="alice", avatar_url=None)
        sink.post_line(seg("two", uid=1), display_name="alice", avatar_url=None)
        sink.post_line(seg("hey", speaker="bob", uid=2), display_name="bob", avatar_url=None)
        await sink.aclose()
        created = s.requests("POST", "/threads")
        assert sorted(r.json["name"] for r in created) == ["Captions · alice", "Captions · bob"]
        in_alice = [m for m in s.discord.messages if m.thread == "Captions · alice"]
        in_bob = [m for m in s.discord.messages if m.thread == "Captions · bob"]
        in_channel = [m for m in s.discord.messages if m.thread is None]
        assert lines_of(in_alice) == ["`[01:23]` one", "`[01:23]` two"]
        assert lines_of(in_bob) == ["`[01:23]` hey"]
        assert lines_of(in_channel) == ["`[01:23]` one", "`[01:23]` two", "`[01:23]` hey"]
        assert_nobody_pinged(s.discord.messages)


async def test_captions_are_throttled_show_the_latest_text_and_become_the_committed_line() -> None:
    async with local_discord() as s:
        sink = s.sink(captions=True, caption_interval=1.0)
        await sink.start()
        partials = [f"今日{'開' * i}" for i in range(1, 11)]
        sink.update_caption(1, partials[0], display_name="alice")
        await wait_until(lambda: len(s.discord.messages) == 1)  # the caption message exists
        for text in partials[1:]:  # nine more within a fraction of the interval
            sink.update_caption(1, text, display_name="alice")
            await asyncio.sleep(0.02)
        await wait_until(lambda: len(s.discord.messages) == 2)  # one throttled edit
        caption, edit = s.discord.messages
        assert caption.thread == "Captions · alice" and not caption.edit
        assert edit.edit and edit.message_id == caption.message_id
        assert edit.content.startswith(partials[-1])
        committed = seg("今日開會，大家好")
        sink.post_line(committed, display_name="alice", avatar_url=None)
        await wait_until(lambda: len(s.discord.messages) == 4)  # channel line + caption edit
        sink.update_caption(1, "下一句", display_name="alice")
        await wait_until(lambda: len(s.discord.messages) == 5)  # a new caption message
        await sink.aclose()
        patches = s.requests("PATCH", "/messages/")
        assert len(patches) == 2  # one throttled caption edit, one replacement by the line
        replaced = [m for m in s.discord.messages if m.message_id == caption.message_id][-1]
        assert replaced.content == format_line(committed, with_speaker=False)
        last = s.discord.messages[-1]
        assert last.thread == "Captions · alice" and not last.edit
        assert last.message_id != caption.message_id and last.content.startswith("下一句")
        assert_nobody_pinged(s.discord.messages)


async def test_without_thread_permission_lines_still_reach_the_channel_and_it_is_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with local_discord(deny_threads=True) as s:
        sink = s.sink(threads=True, captions=True)
        await sink.start()
        with caplog.at_level(logging.WARNING, logger="bot.sinks.discord_sink"):
            sink.post_line(seg("one"), display_name="alice", avatar_url=None)
            await wait_until(lambda: len(s.discord.messages) == 1)
            await wait_until(lambda: sink.stats.permanent_failures == 1)
            sink.update_caption(1, "partial", display_name="alice")
            sink.post_line(seg("two"), display_name="alice", avatar_url=None)
            await sink.aclose()
        assert lines_of(s.discord.messages) == ["`[01:23]` one", "`[01:23]` two"]
        assert len(s.requests("POST", "/threads")) == 1  # tried once, then threads are off
        assert sum("Create Public Threads" in r.getMessage() for r in caplog.records) == 1


# -- safety and minutes --------------------------------------------------------------------------


async def test_everyone_and_role_mentions_in_speech_never_ping() -> None:
    async with local_discord() as s:
        sink = s.sink(threads=True)
        await sink.start()
        sink.post_notice("Transcribing Meeting Room")
        speech = seg("@everyone look <@&123> and @here")
        sink.post_line(speech, display_name="alice", avatar_url=None)
        await sink.aclose()
        assert_nobody_pinged(s.discord.messages)
        for m in s.discord.messages:
            assert "@everyone" not in m.content and "<@&123>" not in m.content
            assert "@here" not in m.content
        assert any(f"@{ZWSP}everyone" in m.content for m in s.discord.messages)


async def test_minutes_come_after_the_last_line_with_their_files_attached() -> None:
    async with local_discord() as s:
        sink = s.sink()
        await sink.start()
        for i in range(5):
            sink.post_line(seg(f"line {i}", start=float(i)), display_name="alice", avatar_url=None)
        files = {
            "minutes.md": "# Meeting\n",
            "minutes.srt": "1\n00:00:00,000 --> 00:00:01,000\nline 0\n",
            "minutes.vtt": "WEBVTT\n",
            "minutes.json": "{}",
        }
        await sink.post_minutes(summary="Meeting ended: 5 lines", files=files)
        minutes = s.discord.messages[-1]
        assert minutes.content == "Meeting ended: 5 lines"
        assert sorted(minutes.attachments) == sorted(files)
        assert len(lines_of(s.discord.messages[:-1])) == 5
        await sink.aclose()
        await sink.aclose()  # idempotent
        assert_nobody_pinged(s.discord.messages)


async def test_using_the_sink_before_start_is_a_bug_and_after_close_is_ignored() -> None:
    from bot.sinks.discord_sink import SinkStateError

    async with local_discord() as s:
        sink = s.sink()
        with pytest.raises(SinkStateError):
            sink.post_notice("too early")
        await sink.start()
        await sink.aclose()
        sink.post_line(seg("late"), display_name="alice", avatar_url=None)
        assert s.discord.messages == []


async def test_a_sink_given_a_readability_posts_converted_lines_with_their_jyutping() -> None:
    from bot.transcript.script import JyutpingMode, Readability, Script

    readability = Readability(Script.SIMPLIFIED, JyutpingMode.LINE)
    async with local_discord() as s:
        sink = s.sink(threads=True, readability=readability)
        await sink.start()
        sink.post_line(seg("我哋今日開會", uid=1), display_name="alice", avatar_url=None)
        long_line = seg(("佢畀咗份文件我，冇問題。" * 200)[:1990], uid=2, speaker="bob")
        sink.post_line(long_line, display_name="bob", avatar_url=None)
        await sink.aclose()
        channel = [m for m in s.discord.messages if m.thread is None]
        threads = [m for m in s.discord.messages if m.thread is not None]
        assert channel[0].content == "`[01:23]` 我哋今日开会\n-# ngo5dei6 gam1jat6 hoi1wui2"
        # The thread gets the same messages; every message of the long line has its own
        # Jyutping line and stays within Discord's limit.
        assert [m.content for m in threads] == [m.content for m in channel]
        bob = [m.content for m in channel if m.author == "bob"]
        assert len(bob) > 1
        assert all(c.count("\n-# ") == 1 and len(c) <= 2000 for c in bob)
        assert_nobody_pinged(s.discord.messages)
