"""Durable storage of meetings, committed lines and opt-outs (SQLite).

Boundary: an adapter. The public surface is :class:`Storage`, a small async interface that a
PostgreSQL backend (asyncpg) will implement later with the same migrations; callers see only
transcript values (:class:`~bot.transcript.model.Segment`, :class:`Minutes`) and
:class:`MeetingInfo`, never rows or SQL.

Threading: one ``sqlite3`` connection lives on one dedicated worker thread (a single-thread
executor), so the event loop never blocks on disk and calls run in the order they were made.

Durability: each :meth:`Storage.add_line` commits before it returns; WAL journaling keeps
that cheap and ``synchronous=FULL`` makes a returned line survive a crash or power loss.

Migrations: ``bot/storage/migrations/NNNN_name.sql``, applied on open inside one transaction
and recorded in ``schema_version``; opening an up-to-date database changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, TypeVar

from bot.errors import CantobotError
from bot.transcript.model import Minutes, Segment, Word

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a writer waits for another connection's lock before failing (SQLite busy_timeout).
BUSY_TIMEOUT_MS = 5000
#: Where each dialect's numbered migrations live, inside the package.
MIGRATION_DIRS = {"sqlite": "migrations", "postgres": "migrations/postgres"}
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class StorageError(CantobotError):
    """The database failed or was misused; ``str`` says what, never any SQL parameters."""


class StorageClosed(StorageError):
    """A call after :meth:`Storage.close` (our bug)."""

    permanent = True


class MeetingNotFound(StorageError):
    permanent = True


class LineNotFound(StorageError):
    permanent = True


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered schema step; ``sql`` holds one or more statements."""

    version: int
    name: str
    sql: str


@dataclass(frozen=True, slots=True)
class MeetingInfo:
    """A meeting's row without its lines (for listings and crash recovery)."""

    id: int
    guild_id: int
    text_channel_id: int
    voice_channel_id: int
    title: str
    started_at: datetime
    ended_at: datetime | None
    line_count: int


def load_migrations(dialect: str = "sqlite") -> list[Migration]:
    """The packaged migrations of ``dialect`` in version order (1, 2, 3 ... without gaps).

    SQLite's live in ``migrations/``, PostgreSQL's twins (same numbers, same names) in
    ``migrations/postgres/``.
    """
    if dialect not in MIGRATION_DIRS:
        raise StorageError(f"unknown storage dialect {dialect!r}", permanent=True)
    found = []
    folder = resources.files("bot.storage").joinpath(MIGRATION_DIRS[dialect])
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    _check_sequence(found)
    return found


def _check_sequence(migrations: Sequence[Migration]) -> None:
    for expected, m in enumerate(migrations, start=1):
        if m.version != expected:
            raise StorageError(
                f"migration {m.version:04d}_{m.name} is out of sequence (expected {expected:04d})",
                permanent=True,
            )


def split_statements(sql: str) -> list[str]:
    """Split a migration script into statements (``executescript`` would commit mid-way)."""
    statements, buf = [], ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            statements.append(buf.strip())
            buf = ""
    rest = "\n".join(ln for ln in buf.splitlines() if not ln.strip().startswith("--"))
    if rest.strip():
        raise StorageError(f"migration has an unterminated statement: {rest.strip()[:60]!r}")
    return statements


def _ts(value: datetime) -> str:
    """Fixed-layout ISO-8601 UTC, so text order equals time order."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise StorageError(f"datetimes must be timezone-aware, got naive {value!r}", permanent=True)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so two processes migrating at once serialise.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _connect(path: str, migrations: Sequence[Migration]) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)  # we issue BEGIN/COMMIT ourselves
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn, migrations)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, migrations: Sequence[Migration]) -> None:
    _check_sequence(migrations)
    latest = migrations[-1].version if migrations else 0
    with _transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        (current,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
        if current > latest:
            raise StorageError(
                f"database schema version {current} is newer than this cantobot "
                f"(knows up to {latest}); upgrade cantobot",
                permanent=True,
            )
        for m in migrations:
            if m.version <= current:
                continue
            log.info("applying storage migration %04d_%s", m.version, m.name)
            for statement in split_statements(m.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (m.version, m.name, _ts(datetime.now(UTC))),
            )


class Storage:
    """SQLite storage; open with :meth:`open`, release with :meth:`close` (idempotent)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        clock: Callable[[], datetime],
    ) -> None:
        self._conn = conn
        self._executor = executor
        self._clock = clock
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        migrations: Sequence[Migration] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> Storage:
        """Open (creating if needed) and migrate the database at ``path``."""
        migrations = load_migrations() if migrations is None else migrations
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cantobot-sqlite")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _connect, path, migrations)
        except sqlite3.Error as exc:
            executor.shutdown(wait=False)
            raise StorageError(f"cannot open database {path}: {exc}") from exc
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(conn, executor, clock)

    async def close(self) -> None:
        """Finish queued calls, then close the connection; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._conn.close)
        finally:
            self._executor.shutdown(wait=False)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise StorageClosed("storage is closed", permanent=True)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StorageError(f"database error: {exc}") from exc

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

        def run() -> int:
            with _transaction(self._conn):
                (meeting_id,) = self._conn.execute(
                    "INSERT INTO meetings (guild_id, text_channel_id, voice_channel_id, title,"
                    " started_at) VALUES (?, ?, ?, ?, ?) RETURNING id",
                    (guild_id, text_channel_id, voice_channel_id, title, started),
                ).fetchone()
            return int(meeting_id)

        return await self._run(run)

    async def end_meeting(self, meeting_id: int, ended_at: datetime) -> None:
        ended = _ts(ended_at)

        def run() -> None:
            with _transaction(self._conn):
                cur = self._conn.execute(
                    "UPDATE meetings SET ended_at = ? WHERE id = ?", (ended, meeting_id)
                )
                if cur.rowcount == 0:
                    raise MeetingNotFound(f"no meeting with id {meeting_id}")

        await self._run(run)

    # -- lines ---------------------------------------------------------------------------

    def _insert_words(self, line_id: int, words: Sequence[Word]) -> None:
        self._conn.executemany(
            "INSERT INTO words (line_id, position, content, start_s, end_s) VALUES (?, ?, ?, ?, ?)",
            [(line_id, i, w.text, w.start, w.end) for i, w in enumerate(words)],
        )

    async def add_line(self, meeting_id: int, segment: Segment) -> int:
        """Store a committed line; it is durable when this returns. Returns the line id."""

        def run() -> int:
            with _transaction(self._conn):
                if not self._conn.execute(
                    "SELECT 1 FROM meetings WHERE id = ?", (meeting_id,)
                ).fetchone():
                    raise MeetingNotFound(f"no meeting with id {meeting_id}")
                (line_id,) = self._conn.execute(
                    "INSERT INTO lines (meeting_id, speaker, speaker_id, content, start_s, end_s)"
                    " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                    (
                        meeting_id,
                        segment.speaker,
                        segment.speaker_id,
                        segment.text,
                        segment.start,
                        segment.end,
                    ),
                ).fetchone()
                self._insert_words(line_id, segment.words)
            return int(line_id)

        return await self._run(run)

    async def update_line_words(self, line_id: int, segment: Segment) -> None:
        """Replace a line's text, times and words with its timestamped twin from the STT.

        The speaker stays as first stored: the twin describes the same utterance.
        """

        def run() -> None:
            with _transaction(self._conn):
                cur = self._conn.execute(
                    "UPDATE lines SET content = ?, start_s = ?, end_s = ? WHERE id = ?",
                    (segment.text, segment.start, segment.end, line_id),
                )
                if cur.rowcount == 0:
                    raise LineNotFound(f"no line with id {line_id}")
                self._conn.execute("DELETE FROM words WHERE line_id = ?", (line_id,))
                self._insert_words(line_id, segment.words)

        await self._run(run)

    async def minutes(self, meeting_id: int) -> Minutes:
        """The meeting's minutes as stored, lines in the order they were committed."""

        def run() -> Minutes:
            row = self._conn.execute(
                "SELECT title, started_at, ended_at FROM meetings WHERE id = ?", (meeting_id,)
            ).fetchone()
            if row is None:
                raise MeetingNotFound(f"no meeting with id {meeting_id}")
            words: dict[int, list[Word]] = {}
            for line_id, text, start, end in self._conn.execute(
                "SELECT w.line_id, w.content, w.start_s, w.end_s FROM words w"
                " JOIN lines l ON l.id = w.line_id WHERE l.meeting_id = ?"
                " ORDER BY w.line_id, w.position",
                (meeting_id,),
            ):
                words.setdefault(line_id, []).append(Word(text, start, end))
            segments = tuple(
                Segment(
                    speaker=speaker,
                    text=text,
                    start=start,
                    end=end,
                    words=tuple(words.get(line_id, ())),
                    speaker_id=speaker_id,
                )
                for line_id, speaker, speaker_id, text, start, end in self._conn.execute(
                    "SELECT id, speaker, speaker_id, content, start_s, end_s FROM lines"
                    " WHERE meeting_id = ? ORDER BY id",
                    (meeting_id,),
                )
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

    def _infos(self, where: str, params: tuple[Any, ...]) -> list[MeetingInfo]:
        rows = self._conn.execute(f"{self._INFO_SELECT} {where}", params).fetchall()
        infos = []
        for mid, guild, text_ch, voice_ch, title, started, ended, count in rows:
            start_dt = _dt(started)
            assert start_dt is not None
            infos.append(
                MeetingInfo(mid, guild, text_ch, voice_ch, title, start_dt, _dt(ended), count)
            )
        return infos

    async def meetings(self, guild_id: int, limit: int = 10) -> list[MeetingInfo]:
        """The guild's meetings, newest first."""
        return await self._run(
            self._infos,
            "WHERE m.guild_id = ? ORDER BY m.started_at DESC, m.id DESC LIMIT ?",
            (guild_id, limit),
        )

    async def latest_meeting(self, guild_id: int) -> MeetingInfo | None:
        found = await self.meetings(guild_id, limit=1)
        return found[0] if found else None

    async def unfinished_meetings(self) -> list[MeetingInfo]:
        """Meetings never ended (the bot crashed or was killed mid-meeting), oldest first."""
        return await self._run(
            self._infos, "WHERE m.ended_at IS NULL ORDER BY m.started_at, m.id", ()
        )

    # -- opt-outs ------------------------------------------------------------------------

    async def set_opt_out(self, user_id: int, opted_out: bool) -> None:
        """Remember that ``user_id`` must (not) be transcribed."""
        at = _ts(self._clock())

        def run() -> None:
            with _transaction(self._conn):
                if opted_out:
                    self._conn.execute(
                        "INSERT INTO opt_outs (user_id, opted_out_at) VALUES (?, ?)"
                        " ON CONFLICT (user_id) DO NOTHING",
                        (user_id, at),
                    )
                else:
                    self._conn.execute("DELETE FROM opt_outs WHERE user_id = ?", (user_id,))

        await self._run(run)

    async def is_opted_out(self, user_id: int) -> bool:
        def run() -> bool:
            row = self._conn.execute(
                "SELECT 1 FROM opt_outs WHERE user_id = ?", (user_id,)
            ).fetchone()
            return row is not None

        return await self._run(run)

    async def opted_out_users(self) -> set[int]:
        def run() -> set[int]:
            return {uid for (uid,) in self._conn.execute("SELECT user_id FROM opt_outs")}

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
        old = "SELECT id FROM meetings WHERE COALESCE(ended_at, started_at) < ?"

        def run() -> int:
            with _transaction(self._conn):
                # Explicit deletes rather than relying on ON DELETE CASCADE being enabled.
                self._conn.execute(
                    "DELETE FROM words WHERE line_id IN"
                    f" (SELECT id FROM lines WHERE meeting_id IN ({old}))",
                    (cutoff,),
                )
                self._conn.execute(f"DELETE FROM lines WHERE meeting_id IN ({old})", (cutoff,))
                cur = self._conn.execute(f"DELETE FROM meetings WHERE id IN ({old})", (cutoff,))
                return cur.rowcount

        deleted = await self._run(run)
        if deleted:
            log.debug("retention: deleted %d meeting(s) older than %d day(s)", deleted, days)
        return deleted

    async def schema_version(self) -> int:
        """The highest migration applied to this database."""

        def run() -> int:
            (version,) = self._conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM schema_version"
            ).fetchone()
            return int(version)

        return await self._run(run)
