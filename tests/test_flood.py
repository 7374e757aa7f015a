"""A flood of commits from the STT server (issue 12 item 6).

The loopback STT fake sends 10,000 commits back to back for one speaker; the real bot runs
against the loopback Discord. Every line is stored; what is queued for Discord and the number of
storage writes running at once stay bounded; the lines reach the channel merged into fewer
messages (none dropped) and the channel is told once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bot.meeting.ledger import STORE_WRITERS
from bot.sinks.discord_sink import BACKLOG_NOTICE
from bot.sinks.outbox import DEFAULT_MAX_ENTRIES, Item, Outbox
from bot.storage.db import Storage
from tests.test_reliability import LINE_PREFIX, notices, rig, track, until

FLOOD = 10_000


async def test_a_flood_of_commits_is_stored_merged_into_few_messages_and_said_once(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path, names=("alice",)) as r:
        r.stt.flood_commits = FLOOD
        # Discord rate limits a webhook past a few posts (5 per 5 s): while the flood arrives
        # it answers 429 with retry_after, as it would, and the lines back up in the bot.
        r.discord.fail_next(10**6, status=429, path_prefix="/webhooks/", retry_after=0.2)
        flood = [f"flood {i:05d}" for i in range(FLOOD)]
        began = time.monotonic()
        await r.speak("alice", track("開會"))
        await until(lambda: len(r.stt.committed_texts) == FLOOD + 1)
        sent_in = time.monotonic() - began
        assert r.stt.flood_seconds is not None
        ledger = r.meeting.ledger
        await until(lambda: ledger.lines == FLOOD + 1, limit=60)
        r.discord.clear_faults()  # the flood is in: Discord takes posts again
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


async def test_past_max_entries_lines_are_not_queued_so_memory_stays_bounded() -> None:
    gate = asyncio.Event()
    sent: list[str] = []

    async def send(item: Item) -> None:
        await gate.wait()  # Discord takes nothing for now
        sent.append(item.text)

    backlog: list[int] = []
    box = Outbox(send, name="t", max_pending=2, max_entries=4, merge_limit=20,
                 on_backlog=lambda: backlog.append(1))
    box.start()
    box.put(Item("head", "k"))
    await asyncio.sleep(0)  # "head" is in flight
    texts = [f"line {i:03d}" for i in range(100)]  # 8 characters: two fit in one message
    for text in texts:
        box.put(Item(text, "k"))
    assert box.stats.peak_entries == 4  # never more messages waiting than max_entries
    assert backlog == [1]  # the sink is told once
    assert box.stats.dropped_backlog == 100 - box.pending + 1
    gate.set()
    await box.flush()
    delivered = "\n".join(sent[1:]).split("\n")
    assert delivered == texts[: len(delivered)]  # the first lines, in order, merged
    assert all(len(s) <= 20 for s in sent)
    await box.aclose()


async def test_a_flood_of_partials_is_coalesced_into_a_few_caption_edits(tmp_path: Path) -> None:
    async with rig(tmp_path, names=("alice",), transcribe={"captions": True}) as r:
        r.stt.flood_partials = FLOOD
        await r.speak("alice", track("開會"))
        await until(lambda: sum(len(rec.partials) for rec in r.stt.records.values()) > FLOOD)
        await r.wait_lines({"alice": ["開會"]})
        in_thread = [m for m in r.discord.messages if m.thread is not None]
        # The caption shows the latest partial at most once per caption_edit_interval: a
        # handful of posts and edits, not one per partial.
        assert 1 <= len(in_thread) <= 20, len(in_thread)
        assert r.meeting.ledger.sink.stats.peak_waiting <= 2  # type: ignore[attr-defined]
