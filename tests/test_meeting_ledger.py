"""The meeting's ledger against real SQLite and a small fake sink: rows keyed by LineRef."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import discord
import pytest

from bot.errors import SttAuthError, SttUnavailable
from bot.meeting.ledger import Ledger, MinutesPost
from bot.meeting.tasks import TaskOwner
from bot.storage import StorageBackend, open_storage_at
from bot.stt.events import LineRef, SttState
from bot.transcript.model import Minutes, Segment, Word


@dataclass
class FakeSink:
    notices: list[str] = field(default_factory=list)
    lines: list[tuple[str, str]] = field(default_factory=list)
    minutes: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    closed: bool = False

    async def start(self) -> None:
        pass

    async def aclose(self, flush_timeout: float = 10.0) -> None:
        self.closed = True

    def post_notice(self, text: str) -> None:
        self.notices.append(text)

    def post_line(self, segment: Segment, *, display_name: str, avatar_url: str | None) -> None:
        self.lines.append((display_name, segment.text))

    def update_caption(self, user_key: int | str, text: str, *, display_name: str) -> None:
        pass

    async def post_minutes(self, *, summary: str, files: dict[str, str],
                           nonce: str | None = None) -> None:
        self.minutes.append((summary, files))


@dataclass
class FakeGuild:
    id: int = 1
    me: Any = None


@dataclass
class FakeChannel:
    id: int
    name: str


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[StorageBackend]:
    store = await open_storage_at(str(tmp_path / "t.db"))
    yield store
    await store.close()


async def open_ledger(storage: StorageBackend) -> tuple[Ledger, FakeSink, TaskOwner]:
    sink, tasks = FakeSink(), TaskOwner()
    ledger = Ledger(storage=storage, sink=sink, guild=cast(discord.Guild, FakeGuild()),
                    tasks=tasks)
    await ledger.open(text_channel=cast(discord.TextChannel, FakeChannel(2, "minutes")),
                      voice_channel=cast(discord.VoiceChannel, FakeChannel(3, "Standup")),
                      started_at=datetime.now(UTC), threads=False)
    return ledger, sink, tasks


def line(text: str, start: float, words: tuple[Word, ...] = ()) -> Segment:
    return Segment("alice", text, start, start + 1.0, words, 42)


async def test_an_amend_finds_its_row_by_ref_even_when_the_text_repeats(
    storage: StorageBackend,
) -> None:
    ledger, sink, _ = await open_ledger(storage)
    # Two lines with the same words; only the second gets its timestamped twin (the first
    # one's was lost with a connection). Matching by (speaker, text) amended the first row.
    ledger.commit(LineRef(42, 1), line("好", 1.0), display_name="Alice", avatar_url=None)
    ledger.commit(LineRef(42, 2), line("好", 5.0), display_name="Alice", avatar_url=None)
    ledger.amend(LineRef(42, 2), line("好", 5.2, (Word("好", 5.2, 5.6),)))
    await ledger.flush()
    minutes = await ledger.close()
    assert [(s.start, bool(s.words)) for s in minutes.segments] == [(1.0, False), (5.2, True)]
    assert sink.lines == [("Alice", "好"), ("Alice", "好")] and ledger.lines == 2
    assert len(sink.minutes) == 1 and "minutes.json" in sink.minutes[0][1] and sink.closed


async def test_upstream_trouble_is_said_once_per_kind_and_its_end_once(
    storage: StorageBackend,
) -> None:
    ledger, sink, _ = await open_ledger(storage)
    start = len(sink.notices)
    for _ in range(3):
        ledger.upstream_state(SttState.FAILED, SttAuthError("cantonese.ai rejected the API key"))
        ledger.upstream_state(SttState.RECONNECTING, SttUnavailable("down"))
    assert ledger.upstream_text().startswith("reconnecting: down")
    ledger.upstream_state(SttState.STREAMING, None)
    ledger.upstream_state(SttState.STREAMING, None)
    said = sink.notices[start:]
    assert len(said) == 3, said
    assert "rejected the API key" in said[0] and "retrying" in said[1] and "back" in said[2]
    assert ledger.upstream_text() == "streaming"
    await ledger.close()


async def test_minutes_are_put_into_words_one_way_for_every_path() -> None:
    minutes = Minutes(title="Standup", started_at=datetime(2026, 1, 1, tzinfo=UTC),
                      ended_at=None, segments=(Segment("alice", "早晨", 0.0, 1.0),))
    post = MinutesPost.of(minutes, preface="restarted:\n")
    assert post.text.startswith("restarted:\n") and set(post.files) == {
        "minutes.md", "minutes.srt", "minutes.vtt", "minutes.json"}
    sent: list[tuple[str, int]] = []

    async def send(text: str, *, files: list[discord.File], allowed_mentions: Any) -> None:
        sent.append((text, len(files)))

    await post.send(send)
    assert sent == [(post.text[:2000], 4)]


async def test_the_task_owner_waits_for_writes_and_cancels_the_rest() -> None:
    tasks = TaskOwner()
    done: list[str] = []

    async def write() -> None:
        await asyncio.sleep(0.01)
        done.append("write")

    async def forever() -> None:
        await asyncio.Event().wait()

    tasks.spawn(write(), "store-line-1")
    other = tasks.spawn(forever(), "voice-reconnect")
    await tasks.wait_for("store-")
    assert done == ["write"] and not other.done()
    await tasks.cancel_all()
    assert other.cancelled()
