"""Durable storage of meetings, committed lines and opt-outs in PostgreSQL (asyncpg).

Boundary: an adapter with exactly the public surface of the SQLite
:class:`bot.storage.db.Storage` (same methods, same values, same errors: both run the
operations of :mod:`bot.storage.common`, this one on asyncpg), so every process of a sharded
deployment can share one database: lines, minutes and opt-outs written by one process are read
by the others.

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
from datetime import UTC, datetime
from typing import Any, TypeAlias, TypeVar

import asyncpg

from bot.logsafe import redact_url
from bot.storage.common import (
    Migration,
    Op,
    Query,
    SqlStorage,
    StorageClosed,
    StorageError,
    Tx,
    Want,
    load_migrations,
    migrate,
    numbered_placeholders,
)

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
    """``url`` without its password (user-info or ``password=``), for messages and logs."""
    return redact_url(url)


async def _connect(url: str) -> Conn:
    try:
        conn: Conn = await asyncpg.connect(
            url, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StorageError(f"cannot open database {redact(url)}: {exc}") from exc
    return conn


def _rowcount(status: str) -> int:
    """asyncpg returns the command tag ("DELETE 3", "UPDATE 0"); the count is its last word."""
    return int(status.rsplit(" ", 1)[-1])


async def _perform(conn: Conn, query: Query) -> Any:
    sql = numbered_placeholders(query.sql)
    if query.want is Want.SCRIPT:
        await conn.execute(query.sql)  # no arguments: the simple protocol runs every statement
        return None
    if query.want is Want.MANY:
        if query.params:
            await conn.executemany(sql, query.params)
        return None
    if query.want is Want.ROW:
        return await conn.fetchrow(sql, *query.params)
    if query.want is Want.ROWS:
        return await conn.fetch(sql, *query.params)
    status = await conn.execute(sql, *query.params)
    return _rowcount(status) if query.want is Want.COUNT else None


async def _drive(conn: Conn, op: Op[T]) -> T:
    """Run ``op`` to its end, performing each query it yields on ``conn``."""
    result: Any = None
    try:
        while True:
            result = await _perform(conn, op.send(result))
    except StopIteration as done:
        value: T = done.value  # the operation's return value
        return value


async def _transact(conn: Conn, tx: Tx, op: Op[T]) -> T:
    if tx is Tx.NONE:
        return await _drive(conn, op)
    if tx is Tx.SNAPSHOT:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            return await _drive(conn, op)
    async with conn.transaction():
        return await _drive(conn, op)


class PostgresStorage(SqlStorage):
    """PostgreSQL storage; open with :meth:`open`, release with :meth:`close` (idempotent)."""

    def __init__(self, url: str, conn: Conn, clock: Callable[[], datetime]) -> None:
        super().__init__(clock)
        self._url = url
        self._conn: Conn | None = conn
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
            async with conn.transaction():
                # Processes starting together migrate once, one after the other.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
                await _drive(conn, migrate(migrations, "postgres"))
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

    async def _execute(self, tx: Tx, op: Callable[..., Op[T]], *args: Any) -> T:
        return await self._run(lambda conn: _transact(conn, tx, op(*args)))
