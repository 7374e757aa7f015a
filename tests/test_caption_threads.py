"""Spec for bot/sinks/threads.py: each speaker's caption thread, driven through the real Outbox.

The destination is a small fake of the three things CaptionThreads touches (a channel that
creates threads, a post into a thread, a message that can be edited), recording what Discord
would show; the Discord wire protocol itself is covered by tests/test_discord_sink.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from bot.sinks.outbox import Item
from bot.sinks.payloads import NO_MENTIONS, Author, Post, new_nonce
from bot.sinks.threads import CAPTION_MARK, CaptionThreads
from bot.transcript.format import thread_name


@dataclass(eq=False)
class FakeMessage:
    content: str
    author: Author
    edits: list[str] = field(default_factory=list)

    async def edit(self, *, content: str, allowed_mentions: Any) -> None:
        assert allowed_mentions is NO_MENTIONS
        self.content = content
        self.edits.append(content)


@dataclass(eq=False)
class FakeThread:
    name: str
    messages: list[FakeMessage] = field(default_factory=list)


class FakeChannel:
    """Creates threads on demand and records every post into them."""

    def __init__(self) -> None:
        self.name = "meeting"
        self.threads: list[FakeThread] = []

    async def create_thread(self, *, name: str, **_: Any) -> FakeThread:
        thread = FakeThread(name)
        self.threads.append(thread)
        return thread

    async def post(self, thread: FakeThread, text: str, author: Author,
                   nonce: str) -> FakeMessage:
        message = FakeMessage(text, author)
        thread.messages.append(message)
        return message

    def shown(self) -> dict[str, list[str]]:
        return {t.name: [m.content for m in t.messages] for t in self.threads}


def make(channel: FakeChannel, *, threads: bool = True, captions: bool = True,
         interval: float = 0.0) -> CaptionThreads:
    return CaptionThreads(
        channel=channel,  # type: ignore[arg-type]
        threads=threads,
        captions=captions,
        post=channel.post,  # type: ignore[arg-type]
        author=lambda name, avatar: Author(name, avatar),
        caption_interval=interval,
        clock=lambda: 1000.0,  # never moves: every edit after the first is throttled
    )


def line(name: str, *texts: str) -> tuple[Author, tuple[Item, ...]]:
    author = Author(name, None)
    return author, tuple(Item(t, merge_key=author, payload=Post(author, new_nonce()),
                              label=f"line by {name}") for t in texts)


async def flush(threads: CaptionThreads) -> None:
    async with asyncio.timeout(5):
        await asyncio.gather(*(box.flush() for box in threads.outboxes))


async def close(threads: CaptionThreads) -> None:
    threads.close_captions()
    await asyncio.gather(*(box.aclose(5) for box in threads.outboxes))


async def test_each_speakers_lines_go_in_order_to_their_own_thread_created_once() -> None:
    channel = FakeChannel()
    threads = make(channel, captions=False)
    threads.commit(1, "alice", None, *line("alice", "one"))
    threads.commit(2, "bob", None, *line("bob", "hi"))
    threads.commit(1, "alice", None, *line("alice", "two", "three"))
    await flush(threads)
    shown = channel.shown()
    assert list(shown) == [thread_name("alice"), thread_name("bob")]
    assert "\n".join(shown[thread_name("alice")]).split("\n") == ["one", "two", "three"]
    assert shown[thread_name("bob")] == ["hi"]
    await close(threads)


async def test_a_caption_is_one_message_edited_into_the_committed_line() -> None:
    channel = FakeChannel()
    threads = make(channel)
    threads.update_caption(1, "hel", display_name="alice")
    threads.update_caption(1, "hello  there", display_name="alice")  # coalesced: latest wins
    await flush(threads)
    (thread,) = channel.threads
    (caption,) = thread.messages
    assert caption.content == "hello there" + CAPTION_MARK
    assert caption.author == Author("alice", None)

    threads.commit(1, "alice", None, *line("alice", "hello there, all"))
    threads.update_caption(1, "next", display_name="alice")  # starts a new caption message
    await flush(threads)
    assert [m.content for m in thread.messages] == ["hello there, all", "next" + CAPTION_MARK]
    assert caption.edits == ["hello there, all"]
    await close(threads)


async def test_the_committed_line_ends_a_throttled_caption_edit_at_once() -> None:
    channel = FakeChannel()
    threads = make(channel, interval=3600.0)  # a waiting edit would outlast the test's timeout
    threads.update_caption(1, "first", display_name="alice")
    await flush(threads)
    threads.update_caption(1, "first words", display_name="alice")  # waits out the throttle
    await asyncio.sleep(0.05)
    threads.commit(1, "alice", None, *line("alice", "first words said"))
    await flush(threads)
    (caption,) = channel.threads[0].messages
    assert caption.edits == ["first words said"]  # the throttled edit never went out
    await close(threads)


async def test_silence_drops_a_queued_caption_edit() -> None:
    channel = FakeChannel()
    threads = make(channel)
    threads.update_caption(1, "something private", display_name="alice")
    threads.silence(1)
    await flush(threads)
    assert channel.threads == []  # nothing shown, not even a thread
    await close(threads)


async def test_with_threads_off_only_a_line_that_ends_a_caption_reaches_a_thread() -> None:
    channel = FakeChannel()
    threads = make(channel, threads=False)
    threads.commit(1, "alice", None, *line("alice", "not in a thread"))
    assert threads.outboxes == []
    threads.update_caption(1, "live", display_name="alice")
    threads.commit(1, "alice", None, *line("alice", "live words"))
    await flush(threads)
    assert channel.shown() == {thread_name("alice"): ["live words"]}
    await close(threads)
