-- 0002: per-guild defaults set with /transcribe settings (how posts and minutes are shown).
--
-- One row per guild that set anything; a NULL column means "not set here": the config default
-- (transcribe.script / transcribe.jyutping) applies. Values are the command's choices
-- (script: hk | simplified | as-is; jyutping: off | line). Only how speech is shown is kept
-- here; what was said stays as transcribed in lines.content.

CREATE TABLE guild_settings (
    guild_id BIGINT PRIMARY KEY,
    script TEXT,
    jyutping TEXT,
    updated_at TEXT NOT NULL
);
