"""Durable storage of meetings, committed lines and opt-outs in PostgreSQL (asyncpg).

Boundary: an adapter with exactly the public surface of the SQLite
:class:`bot.storage.db.Storage` (same methods, same values, same errors), so every process of
a sharded deployment can share one database: lines, minutes and opt-outs written by one process
are read by the others.

Connection: one asyncpg connection, used by one call at a time behind a FIFO lock, so calls run
in the order they were made (the SQLite backend's single worker thread gives the same promise,
and ``add_line`` order is the minutes' order). A connection that died (server restart, network)
is replaced and the call retried once (see :meth:`PostgresStorage._run`).

Durability: each :meth:`PostgresStorage.add_line` is its own transaction, committed before it
returns (PostgreSQL's default ``synchronous_commit=on`` flushes the WAL at commit).

Migrations: ``bot/storage/migrations/postgres/NNNN_name.sql`` (twins of the SQLite ones),
applied on open in one transaction holding an advisory lock, so processes starting together
migrate once, one after the other; recorded in ``schema_version`` as in SQLite.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias, TypeVar

import asyncpg

from bot.storage.db import (
    LineNotFound,
    MeetingInfo,
    MeetingNotFound,
    Migration,
    StorageClosed,
    StorageError,
    _check_sequence,
    _dt,
    _ts,
    load_migrations,
)
from bot.transcript.model import Minutes, Segment, Word

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds to wait for the server when connecting (a dead host must not hang start-up).
CONNECT_TIMEOUT = 10.0
#: Seconds a single statement may run before the server cancels it (asyncpg command_timeout).
COMMAND_TIMEOUT = 30.0
#: Advisory lock key serialising migrations across processes ("cantobot" in ASCII, as an int).
MIGRATION_LOCK_KEY = 0x63616E746F626F74

#: Errors meaning the connection itself is gone (not that the statement was wrong).
_CONNECTION_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.InterfaceError,
    # Raised when a query starts while asyncpg is still taking in the server's goodbye.
    asyncpg.InternalClientError,
    ConnectionError,
)

Conn: TypeAlias = "asyncpg.Connection[Any]"


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


async def _connect(url: str) -> Conn:
    try:
        conn: Conn = await asyncpg.connect(
            url, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StorageError(f"cannot open database {redact(url)}: {exc}") from exc
    return conn


async def _migrate(conn: Conn, migrations: Sequence[Migration]) -> None:
    _check_sequence(migrations)
    latest = migrations[-1].version if migrations else 0
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        if current > latest:
            raise StorageError(
                f"database schema version {current} is newer than this cantobot "
                f"(knows up to {latest}); upgrade cantobot",
                permanent=True,
            )
        for m in migrations:
            if m.version <= current:
                continue
            log.info("applying storage migration %04d_%s (postgres)", m.version, m.name)
            await conn.execute(m.sql)  # no arguments: the simple protocol runs every statement
            await conn.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES ($1, $2, $3)",
                m.version,
                m.name,
                _ts(datetime.now(UTC)),
            )


def _rowcount(status: str) -> int:
    """asyncpg returns the command tag ("DELETE 3", "UPDATE 0"); the count is its last word."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresStorage:
    """PostgreSQL storage; open with :meth:`open`, release with :meth:`close` (idempotent)."""

    def __init__(self, url: str, conn: Conn, clock: Callable[[], datetime]) -> None:
        self._url = url
        self._conn: Conn | None = conn
        self._clock = clock
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        migrations: Sequence[Migration] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> PostgresStorage:
        """Connect to ``url`` (``postgresql://user:pass@host:port/db``) and migrate it."""
        migrations = load_migrations("postgres") if migrations is None else migrations
        conn = await _connect(url)
        try:
            await _migrate(conn, migrations)
        except asyncpg.PostgresError as exc:
            await conn.close()
            raise StorageError(f"migrating {redact(url)} failed: {exc}") from exc
        except BaseException:
            await conn.close()
            raise
        log.info("storage: PostgreSQL at %s", redact(url))
        return cls(url, conn, clock)

    async def close(self) -> None:
        """Wait for the call in progress, then close the connection; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and not conn.is_closed():
                await conn.close()

    async def _run(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        if self._closed:
            raise StorageClosed("storage is closed", permanent=True)
        async with self._lock:
            if self._closed:
                raise StorageClosed("storage is closed", permanent=True)
            for attempt in (1, 2):
                if self._conn is None or self._conn.is_closed():
                    log.warning("storage: reconnecting to %s", redact(self._url))
                    self._conn = await _connect(self._url)
                try:
                    return await fn(self._conn)
                except _CONNECTION_LOST as exc:
                    # The server went away (restart, failover, idle kill). Every call is one
                    # transaction that was rolled back unless it committed as the link broke,
                    # so one retry on a new connection loses nothing; the rare cost is a line
                    # stored twice, which beats a line lost.
                    broken = self._conn.is_closed() or isinstance(exc, asyncpg.InternalClientError)
                    if attempt == 2 or not broken:
                        raise StorageError(f"database connection lost: {exc}") from exc
                    self._conn.terminate()  # whatever state it is in, it is not used again
                    log.warning("storage: connection lost (%s); retrying once", exc)
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                    raise StorageError(f"database error: {exc}") from exc
            raise AssertionError("unreachable")  # the loop returns or raises

    # -- meetings ------------------------------------------------------------------------

    async def start_meeting(
        self,
        *,
        guild_id: int,
        text_channel_id: int,
        voice_channel_id: int,
        title: str,
        started_at: datetime,
    ) -> int:
        """Record a new meeting and return its id."""
        started = _ts(started_at)

        async def run(conn: Conn) -> int:
            meeting_id = await conn.fetchval(
                "INSERT INTO meetings (guild_id, text_channel_id, voice_channel_id, title,"
                " started_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
                guild_id, text_channel_id, voice_channel_id, title, started,
            )
            return int(meeting_id)

        return await self._run(run)

    async def end_meeting(self, meeting_id: int, ended_at: datetime) -> None:
        ended = _ts(ended_at)

        async def run(conn: Conn) -> None:
            status = await conn.execute(
                "UPDATE meetings SET ended_at = $1 WHERE id = $2", ended, meeting_id
            )
            if _rowcount(status) == 0:
                raise MeetingNotFound(f"no meeting with id {meeting_id}")

        await self._run(run)

    # -- lines ---------------------------------------------------------------------------

    @staticmethod
    async def _insert_words(conn: Conn, line_id: int, words: Sequence[Word]) -> None:
        if words:
            await conn.executemany(
                "INSERT INTO words (line_id, position, content, start_s, end_s)"
                " VALUES ($1, $2, $3, $4, $5)",
                [(line_id, i, w.text, w.start, w.end) for i, w in enumerate(words)],
            )

    async def add_line(self, meeting_id: int, segment: Segment) -> int:
        """Store a committed line; it is durable when this returns. Returns the line id."""

        async def run(conn: Conn) -> int:
            async with conn.transaction():
                if await conn.fetchval("SELECT 1 FROM meetings WHERE id = $1", meeting_id) is None:
                    raise MeetingNotFound(f"no meeting with id {meeting_id}")
                line_id = await conn.fetchval(
                    "INSERT INTO lines (meeting_id, speaker, speaker_id, content, start_s, end_s)"
                    " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                    meeting_id, segment.speaker, segment.speaker_id, segment.text,
                    segment.start, segment.end,
                )
                await self._insert_words(conn, line_id, segment.words)
            return int(line_id)

        return await self._run(run)

    async def update_line_words(self, line_id: int, segment: Segment) -> None:
        """Replace a line's text, times and words with its timestamped twin from the STT.

        The speaker stays as first stored: the twin describes the same utterance.
        """

        async def run(conn: Conn) -> None:
            async with conn.transaction():
                status = await conn.execute(
                    "UPDATE lines SET content = $1, start_s = $2, end_s = $3 WHERE id = $4",
                    segment.text, segment.start, segment.end, line_id,
                )
                if _rowcount(status) == 0:
                    raise LineNotFound(f"no line with id {line_id}")
                await conn.execute("DELETE FROM words WHERE line_id = $1", line_id)
                await self._insert_words(conn, line_id, segment.words)

        await self._run(run)

    async def minutes(self, meeting_id: int) -> Minutes:
        """The meeting's minutes as stored, lines in the order they were committed."""

        async def run(conn: Conn) -> Minutes:
            # One snapshot for the three reads: a line added meanwhile is in all or none.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                row = await conn.fetchrow(
                    "SELECT title, started_at, ended_at FROM meetings WHERE id = $1", meeting_id
                )
                if row is None:
                    raise MeetingNotFound(f"no meeting with id {meeting_id}")
                words: dict[int, list[Word]] = {}
                for w in await conn.fetch(
                    "SELECT w.line_id, w.content, w.start_s, w.end_s FROM words w"
                    " JOIN lines l ON l.id = w.line_id WHERE l.meeting_id = $1"
                    " ORDER BY w.line_id, w.position",
                    meeting_id,
                ):
                    words.setdefault(w[0], []).append(Word(w[1], w[2], w[3]))
                lines = await conn.fetch(
                    "SELECT id, speaker, speaker_id, content, start_s, end_s FROM lines"
                    " WHERE meeting_id = $1 ORDER BY id",
                    meeting_id,
                )
            segments = tuple(
                Segment(
                    speaker=speaker,
                    text=text,
                    start=start,
                    end=end,
                    words=tuple(words.get(line_id, ())),
                    speaker_id=speaker_id,
                )
                for line_id, speaker, speaker_id, text, start, end in lines
            )
            started = _dt(row[1])
            assert started is not None  # NOT NULL column
            return Minutes(row[0], started, _dt(row[2]), segments)

        return await self._run(run)

    # -- listings ------------------------------------------------------------------------

    _INFO_SELECT = (
        "SELECT m.id, m.guild_id, m.text_channel_id, m.voice_channel_id, m.title,"
        " m.started_at, m.ended_at, (SELECT COUNT(*) FROM lines l WHERE l.meeting_id = m.id)"
        " FROM meetings m"
    )

    async def _infos(self, where: str, *params: Any) -> list[MeetingInfo]:
        async def run(conn: Conn) -> list[MeetingInfo]:
            rows = await conn.fetch(f"{self._INFO_SELECT} {where}", *params)
            infos = []
            for mid, guild, text_ch, voice_ch, title, started, ended, count in rows:
                start_dt = _dt(started)
                assert start_dt is not None
                infos.append(
                    MeetingInfo(mid, guild, text_ch, voice_ch, title, start_dt, _dt(ended), count)
                )
            return infos

        return await self._run(run)

    async def meetings(self, guild_id: int, limit: int = 10) -> list[MeetingInfo]:
        """The guild's meetings, newest first."""
        return await self._infos(
            "WHERE m.guild_id = $1 ORDER BY m.started_at DESC, m.id DESC LIMIT $2", guild_id, limit
        )

    async def latest_meeting(self, guild_id: int) -> MeetingInfo | None:
        found = await self.meetings(guild_id, limit=1)
        return found[0] if found else None

    async def unfinished_meetings(self) -> list[MeetingInfo]:
        """Meetings never ended (the bot crashed or was killed mid-meeting), oldest first."""
        return await self._infos("WHERE m.ended_at IS NULL ORDER BY m.started_at, m.id")

    # -- opt-outs ------------------------------------------------------------------------

    async def set_opt_out(self, user_id: int, opted_out: bool) -> None:
        """Remember that ``user_id`` must (not) be transcribed."""
        at = _ts(self._clock())

        async def run(conn: Conn) -> None:
            if opted_out:
                await conn.execute(
                    "INSERT INTO opt_outs (user_id, opted_out_at) VALUES ($1, $2)"
                    " ON CONFLICT (user_id) DO NOTHING",
                    user_id, at,
                )
            else:
                await conn.execute("DELETE FROM opt_outs WHERE user_id = $1", user_id)

        await self._run(run)

    async def is_opted_out(self, user_id: int) -> bool:
        async def run(conn: Conn) -> bool:
            found = await conn.fetchval("SELECT 1 FROM opt_outs WHERE user_id = $1", user_id)
            return found is not None

        return await self._run(run)

    async def opted_out_users(self) -> set[int]:
        async def run(conn: Conn) -> set[int]:
            return {r[0] for r in await conn.fetch("SELECT user_id FROM opt_outs")}

        return await self._run(run)

    # -- retention -----------------------------------------------------------------------

    async def purge_older_than(self, days: int, now: datetime) -> int:
        """Delete meetings (with their lines and words) older than ``days`` before ``now``.

        A finished meeting is old when it ended before the cutoff; an unfinished one (a crash
        left it open) when it started before the cutoff. Returns the number of meetings deleted.
        """
        if days < 0:
            raise StorageError(f"retention days must be >= 0, got {days}", permanent=True)
        cutoff = _ts(now - timedelta(days=days))
        old = "SELECT id FROM meetings WHERE COALESCE(ended_at, started_at) < $1"

        async def run(conn: Conn) -> int:
            async with conn.transaction():
                # Explicit deletes, as in SQLite (the schema's ON DELETE CASCADE would also do).
                await conn.execute(
                    "DELETE FROM words WHERE line_id IN"
                    f" (SELECT id FROM lines WHERE meeting_id IN ({old}))",
                    cutoff,
                )
                await conn.execute(f"DELETE FROM lines WHERE meeting_id IN ({old})", cutoff)
                status = await conn.execute(f"DELETE FROM meetings WHERE id IN ({old})", cutoff)
            return _rowcount(status)

        deleted = await self._run(run)
        if deleted:
            log.debug("retention: deleted %d meeting(s) older than %d day(s)", deleted, days)
        return deleted

    async def schema_version(self) -> int:
        """The highest migration applied to this database."""

        async def run(conn: Conn) -> int:
            return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))

        return await self._run(run)
