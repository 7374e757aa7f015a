"""What both storage backends share: values, errors, migrations, and every operation written once.

Boundary: the backends (:mod:`bot.storage.db` for SQLite, :mod:`bot.storage.postgres` for
PostgreSQL) differ only in how they execute SQL; everything else lives here.

Operations are sans-IO: each is a generator that yields :class:`Query` values (SQL written once,
with SQLite's ``?`` placeholders) and receives each query's result back, then returns the
operation's value. A backend's driver performs the queries on its connection (sqlite3 on the
worker thread, or asyncpg, which gets the placeholders as ``$1``, ``$2`` ... through
:func:`numbered_placeholders`) inside the transaction the operation asks for (:class:`Tx`).
:class:`SqlStorage` is the public surface on top: validation, then one operation per call.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from functools import lru_cache
from importlib import resources
from typing import Any, TypeAlias, TypeVar

from bot.errors import CantobotError, Fault
from bot.transcript.model import Minutes, Segment, Word
from bot.transcript.script import JyutpingMode, ReadabilityChoice, Script

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Where each dialect's numbered migrations live, inside the package.
MIGRATION_DIRS = {"sqlite": "migrations", "postgres": "migrations/postgres"}
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class StorageError(CantobotError):
    """The database failed: it could not be opened, the connection was lost, a statement was
    refused, its schema is newer than this cantobot. ``str`` says what, never any SQL
    parameters. The other side's fault (the database, or what a request named), unless a
    subclass says otherwise."""

    fault = Fault.REMOTE


class StorageMisuse(StorageError):
    """Our code or configuration asked storage for what it cannot do: an unknown dialect or
    URL scheme, a naive datetime, a packaged migration out of sequence or unterminated."""

    fault = Fault.LOCAL
    permanent = True


class StorageClosed(StorageError):
    """A call after ``close()`` (our bug)."""

    fault = Fault.LOCAL
    permanent = True


class MeetingNotFound(StorageError):
    """A request named a meeting that does not exist (a member's number, or one a forget or
    retention deleted meanwhile)."""

    permanent = True


class LineNotFound(StorageError):
    """The line was deleted meanwhile (a forget or retention) before its words were stored."""

    permanent = True


class MeetingForgotten(StorageError):
    """The meeting's lines were deleted by ``/transcribe forget``: it has no minutes any more."""

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
    #: What members see: #1, #2 ... counted per guild (``id`` is internal, across guilds).
    number: int = 0
    #: When ``/transcribe forget`` deleted its lines, or None.
    forgotten_at: datetime | None = None


def load_migrations(dialect: str = "sqlite") -> list[Migration]:
    """The packaged migrations of ``dialect`` in version order (1, 2, 3 ... without gaps).

    SQLite's live in ``migrations/``, PostgreSQL's twins (same numbers, same names) in
    ``migrations/postgres/``.
    """
    if dialect not in MIGRATION_DIRS:
        raise StorageMisuse(f"unknown storage dialect {dialect!r}")
    found = []
    folder = resources.files("bot.storage").joinpath(MIGRATION_DIRS[dialect])
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    check_sequence(found)
    return found


def check_sequence(migrations: Sequence[Migration]) -> None:
    for expected, m in enumerate(migrations, start=1):
        if m.version != expected:
            raise StorageMisuse(
                f"migration {m.version:04d}_{m.name} is out of sequence (expected {expected:04d})")


def ts(value: datetime) -> str:
    """Fixed-layout ISO-8601 UTC, so text order equals time order."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise StorageMisuse(f"datetimes must be timezone-aware, got naive {value!r}")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


def _required_dt(value: str) -> datetime:
    parsed = dt(value)
    assert parsed is not None  # NOT NULL column
    return parsed


# -- queries -------------------------------------------------------------------------------


class Want(Enum):
    """What a driver hands back to the operation for a :class:`Query`."""

    ROW = "row"  # the first row (a tuple-like), or None
    ROWS = "rows"  # every row
    COUNT = "count"  # the number of rows the statement changed
    NOTHING = "nothing"  # nothing back (DDL, or a write whose count does not matter)
    MANY = "many"  # nothing; the statement runs once per parameter tuple in ``params``
    SCRIPT = "script"  # nothing; ``sql`` is a whole migration script, no parameters


@dataclass(frozen=True, slots=True)
class Query:
    want: Want
    sql: str
    params: tuple[Any, ...] = ()


def row(sql: str, *params: Any) -> Query:
    return Query(Want.ROW, sql, params)


def rows(sql: str, *params: Any) -> Query:
    return Query(Want.ROWS, sql, params)


def count(sql: str, *params: Any) -> Query:
    return Query(Want.COUNT, sql, params)


def statement(sql: str, *params: Any) -> Query:
    return Query(Want.NOTHING, sql, params)


#: An operation: yields queries, is sent each one's result, returns its value.
Op: TypeAlias = Generator[Query, Any, T]


class Tx(Enum):
    """The transaction an operation runs in."""

    WRITE = "write"  # atomic, serialised with other writers
    SNAPSHOT = "snapshot"  # several reads that must agree (PostgreSQL: one snapshot)
    NONE = "none"  # each statement on its own


_PLACEHOLDER = re.compile(r"\?")


@lru_cache(maxsize=256)
def numbered_placeholders(sql: str) -> str:
    """``?``, ``?`` ... -> ``$1``, ``$2`` ... (our SQL has no ``?`` inside string literals)."""
    counter = iter(range(1, sql.count("?") + 1))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


# -- operations ----------------------------------------------------------------------------

_SCHEMA_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
)
_SCHEMA_VERSION = "SELECT COALESCE(MAX(version), 0) FROM schema_version"


def migrate(migrations: Sequence[Migration], dialect: str) -> Op[None]:
    """Apply the ``migrations`` newer than the database's version (run it in one transaction)."""
    check_sequence(migrations)
    latest = migrations[-1].version if migrations else 0
    yield statement(_SCHEMA_VERSION_TABLE)
    (current,) = yield row(_SCHEMA_VERSION)
    if current > latest:
        raise StorageError(
            f"database schema version {current} is newer than this cantobot "
            f"(knows up to {latest}); upgrade cantobot",
            permanent=True,
        )
    for m in migrations:
        if m.version <= current:
            continue
        log.info("applying storage migration %04d_%s (%s)", m.version, m.name, dialect)
        yield Query(Want.SCRIPT, m.sql)
        yield statement(
            "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
            m.version,
            m.name,
            ts(datetime.now(UTC)),
        )


def _start_meeting(guild_id: int, text_ch: int, voice_ch: int, title: str, started: str) -> Op[int]:
    # The guild's next number; the counter row outlives deleted meetings, so none is reused.
    (number,) = yield row(
        "INSERT INTO meeting_numbers (guild_id, last_number) VALUES (?, 1)"
        " ON CONFLICT (guild_id) DO UPDATE SET last_number = meeting_numbers.last_number + 1"
        " RETURNING last_number",
        guild_id,
    )
    (meeting_id,) = yield row(
        "INSERT INTO meetings"
        " (guild_id, text_channel_id, voice_channel_id, title, started_at, number)"
        " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        guild_id,
        text_ch,
        voice_ch,
        title,
        started,
        number,
    )
    return int(meeting_id)


def _end_meeting(meeting_id: int, ended: str) -> Op[None]:
    if (yield count("UPDATE meetings SET ended_at = ? WHERE id = ?", ended, meeting_id)) == 0:
        raise MeetingNotFound(f"no meeting with id {meeting_id}")


def _insert_words(line_id: int, words: Sequence[Word]) -> Query:
    return Query(
        Want.MANY,
        "INSERT INTO words (line_id, position, content, start_s, end_s) VALUES (?, ?, ?, ?, ?)",
        tuple((line_id, i, w.text, w.start, w.end) for i, w in enumerate(words)),
    )


def _add_line(meeting_id: int, segment: Segment) -> Op[int]:
    meeting = yield row("SELECT forgotten_at FROM meetings WHERE id = ?", meeting_id)
    if meeting is None:
        raise MeetingNotFound(f"no meeting with id {meeting_id}")
    if meeting[0] is not None:
        raise MeetingForgotten(f"meeting {meeting_id} was forgotten: no lines are stored")
    (line_id,) = yield row(
        "INSERT INTO lines (meeting_id, speaker, speaker_id, content, start_s, end_s)"
        " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        meeting_id,
        segment.speaker,
        segment.speaker_id,
        segment.text,
        segment.start,
        segment.end,
    )
    yield _insert_words(line_id, segment.words)
    return int(line_id)


def _update_line_words(line_id: int, segment: Segment) -> Op[None]:
    changed = yield count(
        "UPDATE lines SET content = ?, start_s = ?, end_s = ? WHERE id = ?",
        segment.text,
        segment.start,
        segment.end,
        line_id,
    )
    if changed == 0:
        raise LineNotFound(f"no line with id {line_id}")
    yield statement("DELETE FROM words WHERE line_id = ?", line_id)
    yield _insert_words(line_id, segment.words)


def _minutes(meeting_id: int) -> Op[Minutes]:
    meeting = yield row(
        "SELECT title, started_at, ended_at, forgotten_at FROM meetings WHERE id = ?", meeting_id
    )
    if meeting is None:
        raise MeetingNotFound(f"no meeting with id {meeting_id}")
    if meeting[3] is not None:
        raise MeetingForgotten(f"meeting {meeting_id} was forgotten: its lines are deleted")
    word_rows = yield rows(
        "SELECT w.line_id, w.content, w.start_s, w.end_s FROM words w"
        " JOIN lines l ON l.id = w.line_id WHERE l.meeting_id = ?"
        " ORDER BY w.line_id, w.position",
        meeting_id,
    )
    words: dict[int, list[Word]] = {}
    for line_id, text, start, end in word_rows:
        words.setdefault(line_id, []).append(Word(text, start, end))
    lines = yield rows(
        "SELECT id, speaker, speaker_id, content, start_s, end_s FROM lines"
        " WHERE meeting_id = ? ORDER BY id",
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
    title, started, ended, _ = meeting
    return Minutes(title, _required_dt(started), dt(ended), segments)


_INFO_SELECT = (
    "SELECT m.id, m.guild_id, m.text_channel_id, m.voice_channel_id, m.title,"
    " m.started_at, m.ended_at, (SELECT COUNT(*) FROM lines l WHERE l.meeting_id = m.id),"
    " m.number, m.forgotten_at"
    " FROM meetings m"
)


def _infos(where: str, *params: Any) -> Op[list[MeetingInfo]]:
    found = yield rows(f"{_INFO_SELECT} {where}", *params)
    return [
        MeetingInfo(
            mid, guild, text_ch, voice_ch, title, _required_dt(started), dt(ended), n,
            number, dt(forgotten),
        )
        for mid, guild, text_ch, voice_ch, title, started, ended, n, number, forgotten in found
    ]


def _forget_meeting(meeting_id: int, at: str) -> Op[int]:
    """Delete the meeting's words and lines now; the row stays, marked forgotten (and ended)."""
    yield statement(
        "DELETE FROM words WHERE line_id IN (SELECT id FROM lines WHERE meeting_id = ?)",
        meeting_id,
    )
    deleted: int = yield count("DELETE FROM lines WHERE meeting_id = ?", meeting_id)
    changed = yield count(
        "UPDATE meetings SET forgotten_at = COALESCE(forgotten_at, ?),"
        " ended_at = COALESCE(ended_at, ?) WHERE id = ?",
        at,
        at,
        meeting_id,
    )
    if changed == 0:
        raise MeetingNotFound(f"no meeting with id {meeting_id}")
    return deleted


def _forget_speaker(guild_id: int, user_id: int) -> Op[int]:
    """Delete every line (and its words) ``user_id`` said in ``guild_id``'s meetings."""
    theirs = (
        "SELECT l.id FROM lines l JOIN meetings m ON m.id = l.meeting_id"
        " WHERE m.guild_id = ? AND l.speaker_id = ?"
    )
    yield statement(f"DELETE FROM words WHERE line_id IN ({theirs})", guild_id, user_id)
    deleted: int = yield count(f"DELETE FROM lines WHERE id IN ({theirs})", guild_id, user_id)
    return deleted


def _set_opt_out(user_id: int, opted_out: bool, at: str) -> Op[None]:
    if opted_out:
        yield statement(
            "INSERT INTO opt_outs (user_id, opted_out_at) VALUES (?, ?)"
            " ON CONFLICT (user_id) DO NOTHING",
            user_id,
            at,
        )
    else:
        yield statement("DELETE FROM opt_outs WHERE user_id = ?", user_id)


def _is_opted_out(user_id: int) -> Op[bool]:
    return (yield row("SELECT 1 FROM opt_outs WHERE user_id = ?", user_id)) is not None


def _opted_out_users() -> Op[set[int]]:
    found = yield rows("SELECT user_id FROM opt_outs")
    return {uid for (uid,) in found}


def _purge(cutoff: str) -> Op[int]:
    old = "SELECT id FROM meetings WHERE COALESCE(ended_at, started_at) < ?"
    # Explicit deletes rather than relying on ON DELETE CASCADE being enabled.
    yield statement(
        f"DELETE FROM words WHERE line_id IN (SELECT id FROM lines WHERE meeting_id IN ({old}))",
        cutoff,
    )
    yield statement(f"DELETE FROM lines WHERE meeting_id IN ({old})", cutoff)
    deleted: int = yield count(f"DELETE FROM meetings WHERE id IN ({old})", cutoff)
    return deleted


def _guild_settings(guild_id: int) -> Op[ReadabilityChoice | None]:
    found = yield row("SELECT script, jyutping FROM guild_settings WHERE guild_id = ?", guild_id)
    if found is None:
        return None
    script, jyutping = found
    return ReadabilityChoice(
        Script(script) if script is not None else None,
        JyutpingMode(jyutping) if jyutping is not None else None,
    )


def _set_guild_settings(guild_id: int, script: str | None, jyutping: str | None,
                        at: str) -> Op[None]:
    # A field not given keeps its stored value (COALESCE with the row already there).
    yield statement(
        "INSERT INTO guild_settings (guild_id, script, jyutping, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (guild_id) DO UPDATE SET"
        " script = COALESCE(excluded.script, guild_settings.script),"
        " jyutping = COALESCE(excluded.jyutping, guild_settings.jyutping),"
        " updated_at = excluded.updated_at",
        guild_id,
        script,
        jyutping,
        at,
    )


def _schema_version() -> Op[int]:
    (version,) = yield row(_SCHEMA_VERSION)
    return int(version)


# -- the public surface --------------------------------------------------------------------


class SqlStorage(ABC):
    """Every :class:`~bot.storage.StorageBackend` method, on top of a backend's :meth:`_execute`.

    Arguments are validated (and datetimes converted) before the call reaches the backend, so a
    misuse fails the same way on both, open or closed.
    """

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock

    @abstractmethod
    async def close(self) -> None:
        """Finish the call in progress, then close the connection; safe to call twice."""

    @abstractmethod
    async def _execute(self, tx: Tx, op: Callable[..., Op[T]], *args: Any) -> T:
        """Run ``op(*args)`` inside ``tx``, performing its queries in order; return its value.

        ``op`` is called again for a fresh generator if the backend retries.
        """

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
        started = ts(started_at)
        return await self._execute(
            Tx.WRITE, _start_meeting, guild_id, text_channel_id, voice_channel_id, title, started
        )

    async def end_meeting(self, meeting_id: int, ended_at: datetime) -> None:
        await self._execute(Tx.WRITE, _end_meeting, meeting_id, ts(ended_at))

    # -- lines ---------------------------------------------------------------------------

    async def add_line(self, meeting_id: int, segment: Segment) -> int:
        """Store a committed line; it is durable when this returns. Returns the line id."""
        return await self._execute(Tx.WRITE, _add_line, meeting_id, segment)

    async def update_line_words(self, line_id: int, segment: Segment) -> None:
        """Replace a line's text, times and words with its timestamped twin from the STT.

        The speaker stays as first stored: the twin describes the same utterance.
        """
        await self._execute(Tx.WRITE, _update_line_words, line_id, segment)

    async def minutes(self, meeting_id: int) -> Minutes:
        """The meeting's minutes as stored, lines in the order they were committed."""
        # One snapshot for the three reads: a line added meanwhile is in all or none.
        return await self._execute(Tx.SNAPSHOT, _minutes, meeting_id)

    # -- listings ------------------------------------------------------------------------

    async def meetings(self, guild_id: int, limit: int = 10) -> list[MeetingInfo]:
        """The guild's meetings, newest first."""
        return await self._execute(
            Tx.NONE,
            _infos,
            "WHERE m.guild_id = ? ORDER BY m.started_at DESC, m.id DESC LIMIT ?",
            guild_id,
            limit,
        )

    async def latest_meeting(self, guild_id: int) -> MeetingInfo | None:
        found = await self.meetings(guild_id, limit=1)
        return found[0] if found else None

    async def meeting_by_number(self, guild_id: int, number: int) -> MeetingInfo | None:
        """The guild's meeting #``number`` (as members name it), or None."""
        found = await self._execute(
            Tx.NONE, _infos, "WHERE m.guild_id = ? AND m.number = ?", guild_id, number
        )
        return found[0] if found else None

    async def meeting_info(self, meeting_id: int) -> MeetingInfo | None:
        """The meeting with internal id ``meeting_id``, or None."""
        found = await self._execute(Tx.NONE, _infos, "WHERE m.id = ?", meeting_id)
        return found[0] if found else None

    # -- forgetting ----------------------------------------------------------------------

    async def forget_meeting(self, meeting_id: int) -> int:
        """Delete the meeting's lines and words now; its minutes can no longer be read
        (:class:`MeetingForgotten`). Returns the number of lines deleted."""
        return await self._execute(Tx.WRITE, _forget_meeting, meeting_id, ts(self._clock()))

    async def forget_speaker(self, guild_id: int, user_id: int) -> int:
        """Delete every stored line of ``user_id`` in ``guild_id``; returns how many."""
        return await self._execute(Tx.WRITE, _forget_speaker, guild_id, user_id)

    async def unfinished_meetings(self) -> list[MeetingInfo]:
        """Meetings never ended (the bot crashed or was killed mid-meeting), oldest first."""
        return await self._execute(
            Tx.NONE, _infos, "WHERE m.ended_at IS NULL ORDER BY m.started_at, m.id"
        )

    # -- opt-outs ------------------------------------------------------------------------

    async def set_opt_out(self, user_id: int, opted_out: bool) -> None:
        """Remember that ``user_id`` must (not) be transcribed."""
        await self._execute(Tx.WRITE, _set_opt_out, user_id, opted_out, ts(self._clock()))

    async def is_opted_out(self, user_id: int) -> bool:
        return await self._execute(Tx.NONE, _is_opted_out, user_id)

    async def opted_out_users(self) -> set[int]:
        return await self._execute(Tx.NONE, _opted_out_users)

    # -- guild settings --------------------------------------------------------------------

    async def guild_settings(self, guild_id: int) -> ReadabilityChoice | None:
        """What ``/transcribe settings`` stored for the guild (``None``: nothing set)."""
        return await self._execute(Tx.NONE, _guild_settings, guild_id)

    async def set_guild_settings(self, guild_id: int, choice: ReadabilityChoice) -> None:
        """Store the guild's defaults; a field left ``None`` keeps what was stored."""
        await self._execute(
            Tx.WRITE,
            _set_guild_settings,
            guild_id,
            choice.script.value if choice.script is not None else None,
            choice.jyutping.value if choice.jyutping is not None else None,
            ts(self._clock()),
        )

    # -- retention -----------------------------------------------------------------------

    async def purge_older_than(self, days: int, now: datetime) -> int:
        """Delete meetings (with their lines and words) older than ``days`` before ``now``.

        A finished meeting is old when it ended before the cutoff; an unfinished one (a crash
        left it open) when it started before the cutoff. Returns the number of meetings deleted.
        """
        if days < 0:
            raise StorageMisuse(f"retention days must be >= 0, got {days}")
        deleted = await self._execute(Tx.WRITE, _purge, ts(now - timedelta(days=days)))
        if deleted:
            log.debug("retention: deleted %d meeting(s) older than %d day(s)", deleted, days)
        return deleted

    async def schema_version(self) -> int:
        """The highest migration applied to this database."""
        return await self._execute(Tx.NONE, _schema_version)
