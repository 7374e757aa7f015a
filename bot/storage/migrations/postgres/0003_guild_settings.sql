-- 0002 (PostgreSQL): per-guild defaults set with /transcribe settings.
--
-- The twin of ../0002_guild_settings.sql, column for column (no dialect differences here).

CREATE TABLE guild_settings (
    guild_id BIGINT PRIMARY KEY,
    script TEXT,
    jyutping TEXT,
    updated_at TEXT NOT NULL
);
