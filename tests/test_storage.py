"""Storage, the same spec for both backends: real SQLite files in tmp_path and a fresh database
on a real PostgreSQL server (see tests/pg_support.py), a real subprocess killed mid-meeting."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.storage import StorageBackend, open_storage_at
from bot.storage.db import (
    LineNotFound,
    MeetingNotFound,
    Migration,
    StorageClosed,
    StorageError,
    load_migrations,
    split_statements,
)
from bot.transcript.model import Segment, Word
from bot.transcript.script import JyutpingMode, ReadabilityChoice, Script
from tests.pg_support import fresh_database, with_database

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 3, 4, 9, 30, tzinfo=UTC)
GUILD = 1_234_567_890_123_456_789  # a real-sized snowflake: needs 64 bits


@dataclass(frozen=True)
class Backend:
    """One storage backend under test: where its data lives and a raw look inside."""

    kind: str  # "sqlite" or "postgres"
    target: str  # a file path or a postgresql:// URL

    async def open(self, migrations: Sequence[Migration] | None = None) -> StorageBackend:
        return await open_storage_at(self.target, migrations=migrations)

    def migrations(self) -> list[Migration]:
        return load_migrations(self.kind)

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run ``sql`` with the backend's own client, outside cantobot."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.target) as raw:
                return raw.execute(sql).fetchall()
        import asyncpg

        conn = await asyncpg.connect(self.target)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    async def tables(self) -> set[str]:
        sql = ("SELECT name FROM sqlite_master WHERE type = 'table'" if self.kind == "sqlite"
               else "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r[0] for r in await self.query(sql)}


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", str(tmp_path / "cantobot.sqlite3"))
    else:
        async with fresh_database() as url:
            yield Backend("postgres", url)


async def start(
    storage: StorageBackend, *, guild: int = GUILD, at: datetime = T0, title: str = "週會"
) -> int:
    return await storage.start_meeting(
        guild_id=guild, text_channel_id=11, voice_channel_id=22, title=title, started_at=at
    )


SEGMENTS = (
    Segment(
        "阿明",
        "今日開會，討論預算。",
        1.0,
        4.25,
        (Word("今日", 1.0, 1.5), Word("開會", 1.5, 2.0), Word("討論預算", 2.5, 4.25)),
        speaker_id=987_654_321_987_654_321,
    ),
    Segment("bob", "OK 冇問題", 3.5, 5.0),
    Segment("carol", "", 6.0, 6.0, speaker_id=None),
)


async def test_segments_round_trip_with_words_speaker_ids_and_cantonese(backend: Backend) -> None:
    storage = await backend.open()
    try:
        meeting = await start(storage)
        for s in SEGMENTS:
            await storage.add_line(meeting, s)
        minutes = await storage.minutes(meeting)
    finally:
        await storage.close()
    assert minutes.title == "週會"
    assert minutes.started_at == T0 and minutes.ended_at is None
    assert minutes.segments == SEGMENTS


async def test_minutes_survive_closing_and_reopening(backend: Backend) -> None:
    storage = await backend.open()
    meeting = await start(storage)
    for s in SEGMENTS:
        await storage.add_line(meeting, s)
    await storage.end_meeting(meeting, T0 + timedelta(minutes=30))
    await storage.close()

    reopened = await backend.open()
    try:
        minutes = await reopened.minutes(meeting)
        assert minutes.segments == SEGMENTS
        assert minutes.ended_at == T0 + timedelta(minutes=30)
        assert await reopened.unfinished_meetings() == []
    finally:
        await reopened.close()


async def test_the_timestamped_twin_replaces_a_lines_text_times_and_words(backend: Backend) -> None:
    storage = await backend.open()
    try:
        meeting = await start(storage)
        first = await storage.add_line(meeting, Segment("阿明", "今日開會", 1.0, 3.0))
        second = await storage.add_line(meeting, Segment("bob", "好", 4.0, 5.0))
        twin_words = (Word("今日", 1.2, 1.9), Word("開會", 2.0, 2.8))
        twin = Segment("ignored", "今日 開會", 1.2, 2.8, twin_words)
        await storage.update_line_words(first, twin)
        await storage.update_line_words(first, twin)  # a repeat does not duplicate words
        minutes = await storage.minutes(meeting)
        assert minutes.segments[0] == Segment("阿明", "今日 開會", 1.2, 2.8, twin.words)
        assert minutes.segments[1] == Segment("bob", "好", 4.0, 5.0)
        assert second > first
        with pytest.raises(LineNotFound):
            await storage.update_line_words(second + 100, twin)
    finally:
        await storage.close()


KILLED_WRITER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from datetime import UTC, datetime
    sys.path.insert(0, sys.argv[2])
    from bot.storage import open_storage_at
    from bot.transcript.model import Segment, Word

    async def main():
        storage = await open_storage_at(sys.argv[1])
        meeting = await storage.start_meeting(guild_id=1, text_channel_id=2,
            voice_channel_id=3, title="crash", started_at=datetime.now(UTC))
        print("meeting", meeting, flush=True)
        for i in range(1000):
            seg = Segment(f"speaker{i % 3}", f"第{i}句", i, i + 0.5, (Word(f"第{i}", i, i + 0.2),))
            line = await storage.add_line(meeting, seg)
            print("line", line, i, flush=True)
            if i == 120:
                # More lines in flight, then die without closing anything.
                for _ in range(5):
                    asyncio.ensure_future(storage.add_line(meeting, seg))
                await asyncio.sleep(0)
                os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


async def test_a_process_killed_mid_meeting_keeps_every_line_it_was_told_was_stored(
    backend: Backend,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_WRITER, backend.target, str(REPO),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == -9, err.decode()
    lines = out.decode().split("\n")
    meeting = int(lines[0].split()[1])
    acknowledged = [(int(ln.split()[1]), int(ln.split()[2])) for ln in lines[1:] if ln]
    assert len(acknowledged) == 121

    storage = await backend.open()
    try:
        minutes = await storage.minutes(meeting)
        unfinished = await storage.unfinished_meetings()
    finally:
        await storage.close()
    stored = {s.text: s for s in minutes.segments}
    for _, i in acknowledged:
        assert stored[f"第{i}句"].words == (Word(f"第{i}", i, i + 0.2),)
    assert [m.id for m in unfinished] == [meeting]
    assert unfinished[0].line_count == len(minutes.segments) >= 121


async def test_opt_outs_persist_and_can_be_withdrawn(backend: Backend) -> None:
    storage = await backend.open()
    await storage.set_opt_out(111, True)
    await storage.set_opt_out(111, True)  # idempotent
    await storage.set_opt_out(2**63 - 1, True)
    await storage.set_opt_out(333, False)  # withdrawing an absent opt-out is fine
    await storage.close()

    storage = await backend.open()
    try:
        assert await storage.is_opted_out(111)
        assert not await storage.is_opted_out(333)
        assert await storage.opted_out_users() == {111, 2**63 - 1}
        await storage.set_opt_out(111, False)
        assert await storage.opted_out_users() == {2**63 - 1}
    finally:
        await storage.close()


async def test_retention_deletes_only_old_meetings_and_their_lines(backend: Backend) -> None:
    now = datetime(2026, 6, 1, tzinfo=UTC)
    storage = await backend.open()
    try:
        old = await start(storage, at=now - timedelta(days=40), title="old")
        await storage.end_meeting(old, now - timedelta(days=40) + timedelta(hours=1))
        crashed = await start(storage, at=now - timedelta(days=35), title="crashed, never ended")
        recent = await start(storage, at=now - timedelta(days=29, hours=23), title="recent")
        await storage.end_meeting(recent, now - timedelta(days=29))
        running = await start(storage, at=now - timedelta(hours=1), title="running")
        for meeting in (old, crashed, recent, running):
            for s in SEGMENTS:
                await storage.add_line(meeting, s)

        assert await storage.purge_older_than(30, now) == 2
        assert await storage.purge_older_than(30, now) == 0
        assert [m.title for m in await storage.meetings(GUILD)] == ["running", "recent"]
        assert (await storage.minutes(recent)).segments == SEGMENTS
        assert (await storage.minutes(running)).segments == SEGMENTS
        with pytest.raises(MeetingNotFound):
            await storage.minutes(old)
    finally:
        await storage.close()
    # No orphaned lines or words.
    assert await backend.query("SELECT COUNT(*) FROM lines") == [(2 * len(SEGMENTS),)]
    assert await backend.query("SELECT COUNT(*) FROM words") == [(2 * len(SEGMENTS[0].words),)]


async def test_meetings_are_listed_newest_first_per_guild(backend: Backend) -> None:
    storage = await backend.open()
    try:
        assert await storage.latest_meeting(GUILD) is None
        ids = [await start(storage, at=T0 + timedelta(hours=h), title=f"m{h}") for h in range(5)]
        await start(storage, guild=42, at=T0 + timedelta(days=1), title="other guild")
        listed = await storage.meetings(GUILD, limit=3)
        assert [m.id for m in listed] == ids[::-1][:3]
        assert listed[0].guild_id == GUILD and listed[0].voice_channel_id == 22
        latest = await storage.latest_meeting(GUILD)
        assert latest is not None and latest.title == "m4" and latest.line_count == 0
    finally:
        await storage.close()


async def test_migrations_are_applied_once_and_the_version_is_recorded(backend: Backend) -> None:
    for _ in range(2):
        storage = await backend.open()
        assert await storage.schema_version() == len(backend.migrations()) >= 1
        await storage.close()
    versions = await backend.query("SELECT version, name FROM schema_version ORDER BY version")
    assert versions[0] == (1, "initial")
    assert versions == [(m.version, m.name) for m in backend.migrations()]
    if backend.kind == "sqlite":
        assert await backend.query("PRAGMA journal_mode") == [("wal",)]


async def test_a_failing_migration_changes_nothing(backend: Backend) -> None:
    good = backend.migrations()
    broken = Migration(len(good) + 1, "broken",
                       "CREATE TABLE extra (id INTEGER);\nCREATE TABLE oops (;\n")
    storage = await backend.open()  # the database exists at the current version
    await storage.close()
    with pytest.raises(StorageError):
        await backend.open(migrations=[*good, broken])
    assert await backend.query("SELECT MAX(version) FROM schema_version") == [(len(good),)]
    tables = await backend.tables()
    assert "extra" not in tables and {"meetings", "lines", "words", "opt_outs"} <= tables


async def test_a_database_from_a_newer_cantobot_is_refused(backend: Backend) -> None:
    current = backend.migrations()
    newer = [*current, Migration(len(current) + 1, "future", "CREATE TABLE future (id INTEGER);")]
    storage = await backend.open(migrations=newer)
    await storage.close()
    with pytest.raises(StorageError, match="newer"):
        await backend.open()


def test_migration_scripts_split_into_statements_ignoring_comments() -> None:
    sql = (
        "-- a; comment\nCREATE TABLE a (x TEXT DEFAULT ';');\n\n"
        "CREATE INDEX i ON a (x);\n-- end\n"
    )
    assert split_statements(sql) == [
        "-- a; comment\nCREATE TABLE a (x TEXT DEFAULT ';');",
        "CREATE INDEX i ON a (x);",
    ]
    with pytest.raises(StorageError):
        split_statements("CREATE TABLE b (x TEXT)")


async def test_concurrent_add_line_calls_keep_their_order_and_count(backend: Backend) -> None:
    storage = await backend.open()
    try:
        meeting = await start(storage)
        called: list[str] = []
        returned: dict[str, int] = {}

        async def speaker(name: str) -> None:
            for i in range(10):
                text = f"{name}-{i}"
                called.append(text)
                returned[text] = await storage.add_line(meeting, Segment(name, text, i, i + 1))

        async with asyncio.TaskGroup() as tg:
            for n in range(40):
                tg.create_task(speaker(f"s{n}"), name=f"speaker-{n}")
        minutes = await storage.minutes(meeting)
    finally:
        await storage.close()
    assert len(minutes.segments) == 400
    assert [s.text for s in minutes.segments] == called
    assert sorted(returned.values()) == [returned[t] for t in called]


async def test_misuse_is_reported_as_storage_errors(backend: Backend) -> None:
    storage = await backend.open()
    with pytest.raises(MeetingNotFound):
        await storage.add_line(999, SEGMENTS[0])
    with pytest.raises(MeetingNotFound):
        await storage.end_meeting(999, T0)
    with pytest.raises(StorageError):
        await start(storage, at=datetime(2026, 1, 1))  # naive
    await storage.close()
    await storage.close()  # idempotent
    with pytest.raises(StorageClosed):
        await storage.minutes(1)


async def test_an_unopenable_target_is_a_storage_error(backend: Backend, tmp_path: Path) -> None:
    if backend.kind == "sqlite":
        target = str(tmp_path / "missing-dir" / "db.sqlite3")
    else:
        target = with_database(backend.target, "no_such_database_here")
    with pytest.raises(StorageError):
        await open_storage_at(target)


async def test_an_unknown_url_scheme_is_refused_before_anything_opens() -> None:
    with pytest.raises(StorageError, match="postgresql://"):
        await open_storage_at("mysql://db.example/cantobot")


async def test_guild_settings_survive_a_restart_and_unset_fields_keep_their_value(
    backend: Backend,
) -> None:
    storage = await backend.open()
    try:
        assert await storage.guild_settings(GUILD) is None
        await storage.set_guild_settings(GUILD, ReadabilityChoice(script=Script.SIMPLIFIED))
        await storage.set_guild_settings(GUILD, ReadabilityChoice(jyutping=JyutpingMode.LINE))
        await storage.set_guild_settings(GUILD + 1, ReadabilityChoice(Script.HK, JyutpingMode.OFF))
    finally:
        await storage.close()
    storage = await backend.open()  # a restart: a new connection, migrations already applied
    try:
        assert await storage.guild_settings(GUILD) == ReadabilityChoice(Script.SIMPLIFIED,
                                                                        JyutpingMode.LINE)
        assert await storage.guild_settings(GUILD + 1) == ReadabilityChoice(Script.HK,
                                                                            JyutpingMode.OFF)
        assert await storage.guild_settings(GUILD + 2) is None
        await storage.set_guild_settings(GUILD, ReadabilityChoice(script=Script.AS_IS))
        assert await storage.guild_settings(GUILD) == ReadabilityChoice(Script.AS_IS,
                                                                        JyutpingMode.LINE)
    finally:
        await storage.close()
    assert await backend.query("SELECT guild_id, script, jyutping FROM guild_settings"
                               " ORDER BY guild_id") == [
        (GUILD, "as-is", "line"), (GUILD + 1, "hk", "off")]
