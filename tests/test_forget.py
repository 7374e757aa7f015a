"""Forgetting and per-guild numbers in storage, the same spec for SQLite and PostgreSQL (issue 11,
items 1 and 3): the migration numbers existing meetings per guild, forgetting deletes lines and
words at once and leaves no minutes, forget-me deletes one member's lines in one guild only."""

from __future__ import annotations

from datetime import timedelta

import pytest

from bot.storage.common import MeetingForgotten
from bot.transcript.model import Segment, Word
from tests.test_storage import GUILD, T0, Backend, backend, start

__all__ = ["backend"]  # the fixture, shared with tests/test_storage.py

ALICE, BOB = 111_111_111_111_111_111, 222_222_222_222_222_222
OTHER_GUILD = 42


def line(speaker_id: int, text: str) -> Segment:
    return Segment("x", text, 0.0, 1.0, (Word(text, 0.0, 1.0),), speaker_id=speaker_id)


async def test_existing_meetings_are_numbered_per_guild_by_the_migration(backend: Backend) -> None:
    first = backend.migrations()[:1]
    old = await backend.open(migrations=first)  # a database of cantobot before numbers
    await old.close()
    values = ", ".join(f"({g}, 11, 22, 't', '{(T0 + timedelta(hours=i)).isoformat()}')"
                       for i, g in enumerate((GUILD, OTHER_GUILD, GUILD, GUILD, OTHER_GUILD)))
    await backend.query("INSERT INTO meetings (guild_id, text_channel_id, voice_channel_id,"
                        f" title, started_at) VALUES {values} RETURNING id")
    storage = await backend.open()
    try:
        assert [m.number for m in await storage.meetings(GUILD)] == [3, 2, 1]
        assert [m.number for m in await storage.meetings(OTHER_GUILD)] == [2, 1]
        new = await start(storage, at=T0 + timedelta(days=1))
        info = await storage.meeting_info(new)
        assert info is not None and info.number == 4 and info.guild_id == GUILD
        found = await storage.meeting_by_number(OTHER_GUILD, 2)
        assert found is not None and found.guild_id == OTHER_GUILD
        assert await storage.meeting_by_number(OTHER_GUILD, 3) is None
    finally:
        await storage.close()


async def test_a_forgotten_meeting_has_no_lines_words_or_minutes(backend: Backend) -> None:
    storage = await backend.open()
    try:
        gone = await start(storage)
        kept = await start(storage, at=T0 + timedelta(hours=1))
        for text in ("一", "二"):
            await storage.add_line(gone, line(ALICE, text))
        await storage.add_line(kept, line(ALICE, "三"))
        assert await storage.forget_meeting(gone) == 2
        with pytest.raises(MeetingForgotten):
            await storage.minutes(gone)
        with pytest.raises(MeetingForgotten):
            await storage.add_line(gone, line(ALICE, "late"))
        info = await storage.meeting_info(gone)
        assert info is not None and info.forgotten_at is not None and info.line_count == 0
        assert info.ended_at is not None, "a forgotten meeting is never recovered as unfinished"
        assert [w for (w,) in await backend.query("SELECT content FROM words")] == ["三"]
        assert [s.text for s in (await storage.minutes(kept)).segments] == ["三"]
        assert gone not in [m.id for m in await storage.unfinished_meetings()]
    finally:
        await storage.close()


async def test_forget_me_deletes_one_members_lines_in_one_guild(backend: Backend) -> None:
    storage = await backend.open()
    try:
        here = await start(storage)
        there = await start(storage, guild=OTHER_GUILD)
        await storage.add_line(here, line(ALICE, "alice"))
        await storage.add_line(here, line(BOB, "bob 1"))
        await storage.add_line(here, line(BOB, "bob 2"))
        await storage.add_line(there, line(BOB, "bob elsewhere"))
        assert await storage.forget_speaker(GUILD, BOB) == 2
        assert await storage.forget_speaker(GUILD, BOB) == 0
        assert [s.text for s in (await storage.minutes(here)).segments] == ["alice"]
        assert [s.text for s in (await storage.minutes(there)).segments] == ["bob elsewhere"]
        words = sorted(w for (w,) in await backend.query("SELECT content FROM words"))
        assert words == ["alice", "bob elsewhere"]
    finally:
        await storage.close()
