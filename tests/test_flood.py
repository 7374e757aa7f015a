"""A flood of commits from the STT server (issue 12 item 6).

The loopback STT fake sends 10,000 commits back to back for one speaker; the real bot runs
against the loopback Discord. Every line is stored; what is queued for Discord and the number of
storage writes running at once stay bounded; the lines reach the channel merged into fewer
messages (none dropped) and the channel is told once.
"""

from __future__ import annotations

import time
from pathlib import Path

from bot.meeting.ledger import STORE_WRITERS
from bot.sinks.discord_sink import BACKLOG_NOTICE
from bot.sinks.outbox import DEFAULT_MAX_ENTRIES
from bot.storage.db import Storage
from tests.test_reliability import LINE_PREFIX, notices, rig, track, until

FLOOD = 10_000
#: 429s in a row at the start of the flood (one second each).
RATE_LIMITED = 8


async def test_a_flood_of_commits_is_stored_merged_into_few_messages_and_said_once(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path, names=("alice",)) as r:
        r.stt.flood_commits = FLOOD
        # Discord rate limits a webhook past a few posts (5 per 5 s): while the flood arrives
        # it answers 429 with retry_after, as it would, and the lines back up in the bot.
        r.discord.fail_next(RATE_LIMITED, status=429, path_prefix="/webhooks/", retry_after=1.0)
        flood = [f"flood {i:05d}" for i in range(FLOOD)]
        began = time.monotonic()
        await r.speak("alice", track("開會"))
        await until(lambda: len(r.stt.committed_texts) == FLOOD + 1)
        sent_in = time.monotonic() - began
        assert r.stt.flood_seconds is not None
        ledger = r.meeting.ledger
        await until(lambda: ledger.lines == FLOOD + 1, limit=60)
        await ledger.flush()

        def posted() -> list[str]:
            return [LINE_PREFIX.sub("", line)
                    for m in r.discord.messages
                    if m.author == "alice" and not m.edit and m.thread is None
                    for line in m.content.split("\n")]

        await until(lambda: len(posted()) >= FLOOD + 1, limit=60)
        assert posted() == ["開會", *flood]  # every line, in order, none dropped
        messages = [m for m in r.discord.messages if m.author == "alice" and not m.edit]
        assert len(messages) <= FLOOD // 20, len(messages)  # merged into fewer messages
        assert len(notices(r.discord.messages, BACKLOG_NOTICE[:40])) == 1
        stats = ledger.sink.stats  # type: ignore[attr-defined]
        assert stats.dropped_backlog == 0
        # Bounded: what waited for Discord, and the storage writes running at once.
        assert 0 < stats.peak_waiting <= DEFAULT_MAX_ENTRIES < FLOOD
        assert 1 <= ledger.peak_writers <= STORE_WRITERS
        await r.stop_meeting()
    storage = await Storage.open(str(tmp_path / "bot.sqlite3"))
    try:
        stored = await storage.minutes(1)
    finally:
        await storage.close()
    assert sorted(s.text for s in stored.segments) == sorted(["開會", *flood])
    print(f"{FLOOD} commits sent by the fake in {r.stt.flood_seconds:.2f} s, all committed "
          f"{sent_in:.2f} s after the speech began; {len(messages)} messages; peak "
          f"{stats.peak_waiting} waiting; {ledger.peak_writers} writers at once")
