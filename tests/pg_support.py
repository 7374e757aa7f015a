"""A real PostgreSQL for tests: a fresh database per test on the server CI starts.

The server comes from ``CANTOBOT_TEST_POSTGRES_URL`` (``bash .ci/run`` starts a throwaway
cluster under /tmp and exports it). Without it the PostgreSQL tests are skipped with that
reason, except in CI (``CI=true``), where a missing or unreachable server fails them: CI must
never pass by skipping.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import pytest

PG_URL_ENV = "CANTOBOT_TEST_POSTGRES_URL"
#: Seconds to wait for the test server before calling it unreachable.
CONNECT_TIMEOUT = 10.0


def admin_url() -> str:
    """The test server's URL, or skip (fail in CI) with the reason."""
    url = os.environ.get(PG_URL_ENV, "")
    if not url:
        reason = (f"no PostgreSQL for tests: set {PG_URL_ENV}=postgresql://user@host:port/db "
                  "(bash .ci/run starts a throwaway server and sets it)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the PostgreSQL tests, but {reason}")
        pytest.skip(reason)
    return url


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """CREATE a uniquely named database, yield its URL, DROP it (even if still connected)."""
    import asyncpg

    url = admin_url()
    name = f"cantobot_test_{secrets.token_hex(6)}"
    try:
        admin = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"{PG_URL_ENV} is set but the server is unreachable: {exc}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(url, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
