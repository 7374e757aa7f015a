"""PostgreSQL-only storage behaviour on a real server (the shared spec is in test_storage.py):
processes starting together migrate once, what one process writes the others read, a connection
the server kills is replaced, and no password reaches a message."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from bot.config import StorageConfig
from bot.storage import describe_target, open_storage
from bot.storage.db import StorageError, load_migrations
from bot.storage.postgres import PostgresStorage, redact
from bot.transcript.model import Segment
from tests.pg_support import fresh_database

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 3, 4, 9, 30, tzinfo=UTC)
#: Bound on every test here (seconds): nothing may hang on a server that stopped answering.
TEST_TIMEOUT = 60.0

MIGRATE_AND_WRITE = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import UTC, datetime
    sys.path.insert(0, sys.argv[2])
    from bot.storage.postgres import PostgresStorage

    async def main():
        storage = await PostgresStorage.open(sys.argv[1])
        await storage.set_opt_out(int(sys.argv[3]), True)
        print(await storage.schema_version(), flush=True)
        await storage.close()

    asyncio.run(main())
    """
)


async def test_processes_starting_together_migrate_the_database_once() -> None:
    async with asyncio.timeout(TEST_TIMEOUT), fresh_database() as url:
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", MIGRATE_AND_WRITE, url, str(REPO), str(1000 + i),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            for i in range(4)
        ]
        results = [await p.communicate() for p in procs]
        for proc, (out, err) in zip(procs, results, strict=True):
            assert proc.returncode == 0, err.decode()
            assert out.decode().strip() == str(len(load_migrations("postgres")))
        storage = await PostgresStorage.open(url)
        try:
            assert await storage.opted_out_users() == {1000, 1001, 1002, 1003}
        finally:
            await storage.close()
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT version, name FROM schema_version")
        finally:
            await conn.close()
        assert [tuple(r) for r in rows] == [(m.version, m.name) for m in load_migrations()]


async def test_two_storages_on_one_database_see_each_others_writes_at_once() -> None:
    async with asyncio.timeout(TEST_TIMEOUT), fresh_database() as url:
        config = StorageConfig(path="/nonexistent/unused.sqlite3", url=url)
        a, b = await open_storage(config), await open_storage(config)
        try:
            assert isinstance(a, PostgresStorage)
            meeting = await a.start_meeting(guild_id=1, text_channel_id=2, voice_channel_id=3,
                                            title="shared", started_at=T0)
            await a.add_line(meeting, Segment("阿明", "第一句", 0.0, 1.0, speaker_id=7))
            await b.add_line(meeting, Segment("bob", "第二句", 1.0, 2.0))
            await b.set_opt_out(7, True)
            assert await a.is_opted_out(7)
            assert [s.text for s in (await a.minutes(meeting)).segments] == ["第一句", "第二句"]
            assert [m.id for m in await b.unfinished_meetings()] == [meeting]
        finally:
            await a.close()
            await b.close()


async def test_a_connection_the_server_kills_is_replaced_without_losing_the_call() -> None:
    async with asyncio.timeout(TEST_TIMEOUT), fresh_database() as url:
        storage = await PostgresStorage.open(url)
        admin = await asyncpg.connect(url)
        try:
            meeting = await storage.start_meeting(guild_id=1, text_channel_id=2,
                                                  voice_channel_id=3, title="t", started_at=T0)
            killed = await admin.fetchval(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            assert killed == 1
            line = await storage.add_line(meeting, Segment("a", "still stored", 0.0, 1.0))
            assert (await storage.minutes(meeting)).segments[0].text == "still stored"
            assert await admin.fetchval("SELECT COUNT(*) FROM lines") == 1
            assert line > 0
        finally:
            await admin.close()
            await storage.close()


async def test_an_unreachable_server_fails_fast_and_never_shows_the_password() -> None:
    url = "postgresql://cantobot:hunter2@127.0.0.1:1/cantobot"
    async with asyncio.timeout(TEST_TIMEOUT):
        with pytest.raises(StorageError) as caught:
            await PostgresStorage.open(url)
    assert "hunter2" not in str(caught.value)
    assert "postgresql://cantobot:***@127.0.0.1:1/cantobot" in str(caught.value)
    assert "hunter2" not in describe_target(url)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:p@h:5432/d", "postgresql://u:***@h:5432/d"),
        ("postgresql://u@h/d", "postgresql://u@h/d"),
        ("postgres://h/d", "postgres://h/d"),
        ("postgresql://u:p:q@h/d?sslmode=require", "postgresql://u:***@h/d?sslmode=require"),
    ],
)
def test_redact_hides_only_the_password(url: str, shown: str) -> None:
    assert redact(url) == shown
