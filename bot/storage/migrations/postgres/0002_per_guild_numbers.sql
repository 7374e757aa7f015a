-- 0002 (PostgreSQL): meetings are numbered per guild (#1, #2 ... in each guild), and can be forgotten.
--
-- The twin of ../0002_per_guild_numbers.sql, statement for statement.
-- A global id shown to members would reveal how busy other servers are, so members see
-- "number", counted per guild; the id stays the internal key. meeting_numbers holds each
-- guild's last number, so a number is never given twice, even after retention deleted the
-- meeting that had it. Existing meetings are numbered in the order they were created.
-- forgotten_at: when /transcribe forget deleted the meeting's lines (the row stays, so the
-- number is not reused and /transcribe minutes can say it was forgotten).

ALTER TABLE meetings ADD COLUMN number BIGINT NOT NULL DEFAULT 0;

ALTER TABLE meetings ADD COLUMN forgotten_at TEXT;

UPDATE meetings SET number = (
    SELECT COUNT(*) FROM meetings AS earlier
    WHERE earlier.guild_id = meetings.guild_id AND earlier.id <= meetings.id
);

CREATE UNIQUE INDEX meetings_by_number ON meetings (guild_id, number);

CREATE TABLE meeting_numbers (
    guild_id BIGINT PRIMARY KEY,
    last_number BIGINT NOT NULL
);

INSERT INTO meeting_numbers (guild_id, last_number)
SELECT guild_id, MAX(number) FROM meetings GROUP BY guild_id;

CREATE INDEX lines_by_speaker ON lines (speaker_id);
