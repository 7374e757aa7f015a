"""Durable storage of meetings, committed lines and opt-outs (SQLite).

Boundary: an adapter. The public surface is :class:`Storage`; its methods, validation, SQL and
row mapping are shared with the PostgreSQL backend (:mod:`bot.storage.common`), and this module
only runs them: callers see only transcript values (:class:`~bot.transcript.model.Segment`,
:class:`Minutes`) and :class:`MeetingInfo`, never rows or SQL.

Threading: one ``sqlite3`` connection lives on one dedicated worker thread (a single-thread
executor), so the event loop never blocks on disk and calls run in the order they were made.
Each call runs its whole operation on that thread, so a transaction is never interleaved.

Durability: each :meth:`Storage.add_line` commits before it returns; WAL journaling keeps
that cheap and ``synchronous=FULL`` makes a returned line survive a crash or power loss.

Migrations: ``bot/storage/migrations/NNNN_name.sql``, applied on open inside one transaction
and recorded in ``schema_version``; opening an up-to-date database changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from bot.storage.common import (
    MIGRATION_DIRS,
    LineNotFound,
    MeetingForgotten,
    MeetingInfo,
    MeetingNotFound,
    Migration,
    Op,
    Query,
    SqlStorage,
    StorageClosed,
    StorageError,
    StorageMisuse,
    Tx,
    Want,
    load_migrations,
    migrate,
)

__all__ = [
    "MIGRATION_DIRS",
    "LineNotFound",
    "MeetingForgotten",
    "MeetingInfo",
    "MeetingNotFound",
    "Migration",
    "Storage",
    "StorageClosed",
    "StorageError",
    "StorageMisuse",
    "load_migrations",
    "split_statements",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Milliseconds a writer waits for another connection's lock before failing (SQLite
#: ``PRAGMA busy_timeout`` takes milliseconds).
BUSY_TIMEOUT_MS = 5000


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
        raise StorageMisuse(f"migration has an unterminated statement: {rest.strip()[:60]!r}")
    return statements


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


#: The database holds what people said: only the bot's own user may read it.
FILE_MODE = 0o600


def _restrict_files(path: str) -> None:
    """Create ``path`` as 0600 if new, and make it and its -wal/-shm 0600 if they exist.

    SQLite creates -wal and -shm with the database file's mode, so they follow it.
    """
    if path == ":memory:" or path.startswith("file:"):
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        try:
            os.chmod(path + suffix, FILE_MODE)
        except FileNotFoundError:
            pass


def _connect(path: str, migrations: Sequence[Migration]) -> sqlite3.Connection:
    try:
        _restrict_files(path)
    except OSError as exc:
        raise sqlite3.OperationalError(f"cannot create {path}: {exc.strerror}") from exc
    conn = sqlite3.connect(path, isolation_level=None)  # we issue BEGIN/COMMIT ourselves
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        with _transaction(conn):
            _drive(conn, migrate(migrations, "sqlite"))
    except BaseException:
        conn.close()
        raise
    return conn


def _perform(conn: sqlite3.Connection, query: Query) -> Any:
    if query.want is Want.SCRIPT:
        for statement in split_statements(query.sql):
            conn.execute(statement)
        return None
    if query.want is Want.MANY:
        conn.executemany(query.sql, query.params)
        return None
    cur = conn.execute(query.sql, query.params)
    if query.want is Want.ROW:
        return cur.fetchone()
    if query.want is Want.ROWS:
        return cur.fetchall()
    return cur.rowcount if query.want is Want.COUNT else None


def _drive(conn: sqlite3.Connection, op: Op[T]) -> T:
    """Run ``op`` to its end, performing each query it yields (on the calling thread)."""
    result: Any = None
    try:
        while True:
            result = _perform(conn, op.send(result))
    except StopIteration as done:
        value: T = done.value  # the operation's return value
        return value


class Storage(SqlStorage):
    """SQLite storage; open with :meth:`open`, release with :meth:`close` (idempotent)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        clock: Callable[[], datetime],
    ) -> None:
        super().__init__(clock)
        self._conn = conn
        self._executor = executor
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

    async def _execute(self, tx: Tx, op: Callable[..., Op[T]], *args: Any) -> T:
        if self._closed:
            raise StorageClosed("storage is closed", permanent=True)

        def run() -> T:  # on the worker thread, start to end
            if tx is not Tx.WRITE:
                return _drive(self._conn, op(*args))
            with _transaction(self._conn):
                return _drive(self._conn, op(*args))

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, run)
        except sqlite3.Error as exc:
            raise StorageError(f"database error: {exc}") from exc
