"""Spec for who may see and send transcripts (issue 11, items 1-3), against the loopback Discord.

Three members: alice holds Manage Channels (a manager), bob and carol do not; #secret is a text
channel only bob (and the bot) may view. Meetings are seeded in storage through the running bot,
so each test costs one bot start-up.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.sim.discord.rest import InteractionRecord
from bot.storage import StorageBackend
from bot.storage.common import MeetingForgotten, load_migrations
from bot.storage.db import Storage
from bot.transcript.model import Segment
from tests.test_transcribe import STEP_TIMEOUT, Harness, harness, minutes_uploads

OTHER_GUILD = 4242


async def invoke_in(h: Harness, command: str, options: dict[str, Any] | None = None, *,
                    by: str, channel_id: int | None = None) -> InteractionRecord:
    """``/command`` typed by ``by`` in ``channel_id`` (default #general); waits for the answer."""
    record = await h.discord.invoke(command, options or {}, user_id=h.ids[by],
                                    channel_id=channel_id)
    h.records.append(record)
    async with asyncio.timeout(STEP_TIMEOUT):
        await record.wait_until(
            lambda r: bool(r.followup_message_ids) or bool(r.response_content))
    return record


async def seed(storage: StorageBackend, guild_id: int, text_channel_id: int,
               lines: list[tuple[str, int, str]], *, days_ago: float = 1.0) -> int:
    """A finished meeting with ``lines`` of (speaker, speaker id, text); returns its id."""
    started = datetime.now(UTC) - timedelta(days=days_ago)
    meeting_id = await storage.start_meeting(guild_id=guild_id, text_channel_id=text_channel_id,
                                             voice_channel_id=2, title="Seeded meeting",
                                             started_at=started)
    for i, (speaker, speaker_id, text) in enumerate(lines):
        await storage.add_line(meeting_id, Segment(speaker=speaker, text=text, start=float(i),
                                                   end=i + 0.5, speaker_id=speaker_id))
    await storage.end_meeting(meeting_id, started + timedelta(minutes=5))
    return meeting_id


def uploaded_markdown(h: Harness) -> str:
    request = minutes_uploads(h)[-1]
    return dict(zip(request.files, request.file_contents, strict=True))["minutes.md"].decode()


async def test_minutes_only_for_those_who_can_read_the_meeting_channel_numbered_per_guild(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path, humans=("alice", "bob", "carol")) as h:
        async with h.running(h.config()) as bot:
            secret = await h.discord.add_private_text_channel("secret", ("bob",))
            general = h.discord.text_channel_id
            guild = bot.get_guild(h.discord.guild_id)
            assert guild is not None
            await h.wait_for(lambda: guild.get_channel(secret) is not None, "#secret to exist")
            ids = h.ids
            # Another server's meeting first: its activity must not show in this guild's numbers.
            await seed(bot.storage, OTHER_GUILD, 1, [("zed", 9, "外面")], days_ago=3)
            private = await seed(bot.storage, h.discord.guild_id, secret,
                                 [("bob", ids["bob"], "秘密")], days_ago=2)
            public = await seed(bot.storage, h.discord.guild_id, general,
                                [("carol", ids["carol"], "公開")])
            numbers = [(m.id, m.number) for m in await bot.storage.meetings(h.discord.guild_id)]
            assert numbers == [(public, 2), (private, 1)], "numbered #1, #2 in this guild"

            # carol cannot view #secret: meeting #1 is refused as if it did not exist.
            refused = await invoke_in(h, "transcribe minutes", {"session": 1}, by="carol")
            assert refused.ephemeral
            assert h.answer(refused) == "No meeting #1 in this server that you can read."
            assert minutes_uploads(h) == []
            # Her "latest" is the latest she can read, posted for all in its own channel.
            latest = await invoke_in(h, "transcribe minutes", by="carol")
            assert not latest.ephemeral
            await h.wait_for(lambda: len(minutes_uploads(h)) == 1, "#2's minutes")
            assert "公開" in uploaded_markdown(h) and "秘密" not in uploaded_markdown(h)

            # bob can read #secret: asked in #general, the answer is only for him.
            elsewhere = await invoke_in(h, "transcribe minutes", {"session": 1}, by="bob")
            assert elsewhere.ephemeral
            await h.wait_for(lambda: len(minutes_uploads(h)) == 2, "#1's minutes for bob")
            assert "秘密" in uploaded_markdown(h)
            # ... asked in #secret itself, it is posted there for everyone who can see it.
            inside = await invoke_in(h, "transcribe minutes", {"session": 1}, by="bob",
                                     channel_id=secret)
            assert not inside.ephemeral
            await h.wait_for(lambda: len(minutes_uploads(h)) == 3, "#1's minutes in #secret")

            # A manager may read any meeting; outside its channel only for herself.
            managed = await invoke_in(h, "transcribe minutes", {"session": 1}, by="alice")
            assert managed.ephemeral
            await h.wait_for(lambda: len(minutes_uploads(h)) == 4, "#1's minutes for alice")

            # The global id of a meeting is never a number here.
            other = await invoke_in(h, "transcribe minutes", {"session": 3}, by="alice")
            assert h.answer(other) == "No meeting #3 in this server that you can read."


async def test_start_refuses_a_channel_the_invoker_cannot_view_or_send_in(tmp_path: Path) -> None:
    async with harness(tmp_path, humans=("alice", "bob")) as h:
        # #secret is bob's; alice manages but cannot see it (no overwrite for her).
        async with h.running(h.config()) as bot:
            secret = await h.discord.add_private_text_channel("secret", ("bob",))
            guild = bot.get_guild(h.discord.guild_id)
            assert guild is not None
            await h.wait_for(lambda: guild.get_channel(secret) is not None, "#secret to exist")
            await h.discord.member_join_voice(h.ids["alice"])
            refused = await invoke_in(h, "transcribe start", {"channel": secret}, by="alice")
            assert refused.ephemeral
            assert "You cannot view and send messages in" in h.answer(refused), h.answer(refused)
            assert h.meeting is None and h.discord.world.bot.voice_channel_id is None
            assert not [m for m in h.posted() if m.channel == "secret"], "nothing went there"
            # Where she can post, it starts; the reply names the guild's meeting number.
            start = await h.start()
            assert "(meeting #1)" in h.answer(start), h.answer(start)
            status = await invoke_in(h, "transcribe status", by="alice")
            assert "**Meeting #1**" in h.answer(status), h.answer(status)
            await invoke_in(h, "transcribe stop", by="alice")


async def test_forget_deletes_lines_now_and_the_minutes_can_no_longer_be_posted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cogs.transcribe")
    async with harness(tmp_path, humans=("alice", "bob")) as h:
        async with h.running(h.config()) as bot:
            general, ids = h.discord.text_channel_id, h.ids
            first = await seed(bot.storage, h.discord.guild_id, general,
                               [("alice", ids["alice"], "第一"), ("bob", ids["bob"], "鮑勃一")],
                               days_ago=2)
            second = await seed(bot.storage, h.discord.guild_id, general,
                                [("bob", ids["bob"], "鮑勃二"), ("bob", ids["bob"], "鮑勃三"),
                                 ("alice", ids["alice"], "第二")])
            await seed(bot.storage, OTHER_GUILD, 1, [("bob", ids["bob"], "別處")])

            # Only managers may forget a meeting.
            refused = await invoke_in(h, "transcribe forget", {"meeting": 1}, by="bob")
            assert refused.ephemeral and "can forget a meeting" in h.answer(refused)
            assert (await bot.storage.minutes(first)).segments

            forgot = await invoke_in(h, "transcribe forget", {"meeting": 1}, by="alice")
            assert forgot.ephemeral
            assert h.answer(forgot).startswith("Forgot meeting #1: 2 stored line(s) deleted")
            with pytest.raises(MeetingForgotten):
                await bot.storage.minutes(first)
            gone = await invoke_in(h, "transcribe minutes", {"session": 1}, by="alice")
            assert gone.ephemeral and "was forgotten" in h.answer(gone)
            assert minutes_uploads(h) == []

            # forget-me: every line of bob's in this guild, not elsewhere, and says how many.
            mine = await invoke_in(h, "transcribe forget-me", by="bob")
            assert mine.ephemeral
            assert h.answer(mine).startswith("Deleted 2 stored line(s) of yours in this server.")
            left = await bot.storage.minutes(second)
            assert [seg.text for seg in left.segments] == ["第二"]
            other = await bot.storage.meetings(OTHER_GUILD)
            assert other[0].line_count == 1, "another server's lines are not this guild's to drop"

        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "forgotten by user" in logged and "had their stored lines forgotten" in logged
        for text in ("第一", "鮑勃", "第二", "alice", "bob"):
            assert text not in logged, f"the log holds content or a name: {text!r}"


async def test_per_guild_numbers_are_given_to_existing_meetings_by_the_migration(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "old.sqlite3")
    first_only = load_migrations()[:1]
    old = await Storage.open(path, migrations=first_only)  # a database of cantobot before it
    await old.close()
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT INTO meetings (guild_id, text_channel_id, voice_channel_id,"
                         " title, started_at) VALUES (?, 5, 6, 't', ?)",
                         [(guild, datetime.now(UTC).isoformat()) for guild in (1, 2, 1, 1, 2)])
    conn.close()
    new = await Storage.open(path)
    try:
        assert [(m.id, m.number) for m in await new.meetings(1)] == [(4, 3), (3, 2), (1, 1)]
        assert [(m.id, m.number) for m in await new.meetings(2)] == [(5, 2), (2, 1)]
        # Numbers continue after the migrated ones and are never reused after a purge.
        nxt = await new.start_meeting(guild_id=2, text_channel_id=5, voice_channel_id=6,
                                      title="t", started_at=datetime.now(UTC))
        info = await new.meeting_info(nxt)
        assert info is not None and info.number == 3
        await new.purge_older_than(0, datetime.now(UTC) + timedelta(days=1))
        again = await new.start_meeting(guild_id=2, text_channel_id=5, voice_channel_id=6,
                                        title="t", started_at=datetime.now(UTC))
        info = await new.meeting_info(again)
        assert info is not None and info.number == 4
    finally:
        await new.close()
