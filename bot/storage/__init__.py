"""Storage of committed lines, meetings and opt-outs: SQLite or PostgreSQL, one interface.

:class:`StorageBackend` is the small async interface the rest of cantobot uses;
:func:`open_storage` picks the backend from config: ``storage.url: postgresql://...`` selects
PostgreSQL (:mod:`bot.storage.postgres`, shared by every process of a sharded deployment),
otherwise the SQLite file at ``storage.path`` (:mod:`bot.storage.db`, embedded, nothing to
install). Both apply their numbered migrations on open (``cantobot migrate`` does only that).
Both run the same operations (:mod:`bot.storage.common`); they differ only in how they execute.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from bot.config import StorageConfig
from bot.storage.common import MeetingInfo, Migration, StorageMisuse
from bot.storage.db import Storage
from bot.transcript.model import Minutes, Segment
from bot.transcript.script import ReadabilityChoice

__all__ = ["StorageBackend", "describe_target", "open_storage", "open_storage_at"]

#: URL schemes that select PostgreSQL (libpq accepts both spellings).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class StorageBackend(Protocol):
    """What meetings, the cogs and the CLI need from storage (both backends implement it)."""

    async def close(self) -> None: ...

    async def start_meeting(
        self,
        *,
        guild_id: int,
        text_channel_id: int,
        voice_channel_id: int,
        title: str,
        started_at: datetime,
    ) -> int: ...

    async def end_meeting(self, meeting_id: int, ended_at: datetime) -> None: ...

    async def add_line(self, meeting_id: int, segment: Segment) -> int: ...

    async def update_line_words(self, line_id: int, segment: Segment) -> None: ...

    async def minutes(self, meeting_id: int) -> Minutes: ...

    async def meetings(self, guild_id: int, limit: int = 10) -> list[MeetingInfo]: ...

    async def latest_meeting(self, guild_id: int) -> MeetingInfo | None: ...

    async def meeting_by_number(self, guild_id: int, number: int) -> MeetingInfo | None: ...

    async def meeting_info(self, meeting_id: int) -> MeetingInfo | None: ...

    async def forget_meeting(self, meeting_id: int) -> int: ...

    async def forget_speaker(self, guild_id: int, user_id: int) -> int: ...

    async def unfinished_meetings(self) -> list[MeetingInfo]: ...

    async def set_opt_out(self, user_id: int, opted_out: bool) -> None: ...

    async def is_opted_out(self, user_id: int) -> bool: ...

    async def opted_out_users(self) -> set[int]: ...

    async def guild_settings(self, guild_id: int) -> ReadabilityChoice | None: ...

    async def set_guild_settings(self, guild_id: int, choice: ReadabilityChoice) -> None: ...

    async def purge_older_than(self, days: int, now: datetime) -> int: ...

    async def schema_version(self) -> int: ...


def is_postgres_url(target: str) -> bool:
    return target.startswith(POSTGRES_SCHEMES)


async def open_storage_at(
    target: str, *, migrations: Sequence[Migration] | None = None
) -> StorageBackend:
    """Open and migrate ``target``: a ``postgresql://`` URL or a SQLite file path."""
    if is_postgres_url(target):
        from bot.storage.postgres import PostgresStorage  # asyncpg only when asked for

        return await PostgresStorage.open(target, migrations=migrations)
    if "://" in target:
        raise StorageMisuse(
            f"unsupported storage URL scheme in {target.split('://', 1)[0]}://...: "
            "use postgresql://user:password@host:port/database or a SQLite file path")
    return await Storage.open(target, migrations=migrations)


def storage_target(config: StorageConfig) -> str:
    """``storage.url`` (its real value: a secret) when set, else ``storage.path``."""
    return config.url.reveal() if config.url else config.path


def describe_target(target: str) -> str:
    """A log-safe description (no password) of where the data lives."""
    if is_postgres_url(target):
        from bot.storage.postgres import redact

        return f"PostgreSQL {redact(target)}"
    return f"SQLite {target}"


async def open_storage(config: StorageConfig) -> StorageBackend:
    """The configured backend, opened and migrated (see the module docstring)."""
    return await open_storage_at(storage_target(config))
