"""The voice UDP socket read on the event loop (bot.voice.inbox.DatagramInbox.read_from), and
the reader thread leaving it alone: real loopback UDP sockets, no thread in between."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from bot.voice.client import VoiceListener, _WakingSocketReader
from bot.voice.counters import ReceiveCounters
from bot.voice.inbox import INBOX_BATCH, DatagramInbox
from bot.voice.receiver import VoiceReceiver


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(bot's socket, Discord's): non-blocking as discord.py makes it, connected both ways."""
    bot, discord = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    bot.bind(("127.0.0.1", 0))
    discord.bind(("127.0.0.1", 0))
    bot.connect(discord.getsockname())
    discord.connect(bot.getsockname())
    bot.setblocking(False)
    yield bot, discord
    bot.close()
    discord.close()


class Seen:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def __call__(self, data: bytes, _at: float) -> None:
        self.data.append(data)


def reading(sock: socket.socket) -> tuple[DatagramInbox, Seen]:
    """An inbox reading ``sock`` on the running loop, and what it hands on."""
    seen = Seen()
    inbox = DatagramInbox(seen, time.monotonic)
    inbox.bind(asyncio.get_running_loop())
    assert inbox.read_from(sock) and inbox.reading
    return inbox, seen


async def until(condition: object, limit: float = 2.0) -> None:
    async with asyncio.timeout(limit):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_datagrams_are_read_on_the_loop_a_batch_per_step_in_order(
        pair: tuple[socket.socket, socket.socket]) -> None:
    bot, discord = pair
    loop = asyncio.get_running_loop()
    inbox, seen = reading(bot)
    total = 3 * INBOX_BATCH
    for i in range(total):  # loopback delivers at once: the whole burst waits in the socket
        discord.send(i.to_bytes(2, "big"))
    # A burst is worked off in steps, so what became ready meanwhile runs between them: a
    # callback that looks once per loop step never sees more than a batch arrive at once.
    looks: list[int] = []

    def look() -> None:
        looks.append(len(seen.data))
        if len(seen.data) < total:
            loop.call_soon(look)

    look()
    await until(lambda: len(seen.data) == total)
    steps = [b - a for a, b in zip(looks, looks[1:], strict=False)]
    assert max(steps) == INBOX_BATCH and len([s for s in steps if s]) >= 3
    assert [int.from_bytes(d, "big") for d in seen.data] == list(range(total))
    assert inbox.dropped == 0


async def test_drain_all_takes_what_the_socket_holds_before_a_voice_op_acts(
        pair: tuple[socket.socket, socket.socket]) -> None:
    bot, discord = pair
    inbox, seen = reading(bot)
    for i in range(5):
        discord.send(bytes([i]))
    await asyncio.to_thread(time.sleep, 0.05)  # arrived, but no loop step has read them
    inbox.drain_all()  # no await: read now
    assert seen.data == [bytes([i]) for i in range(5)]


async def test_a_closed_socket_ends_the_reading_and_a_new_one_is_read_even_on_its_number(
        pair: tuple[socket.socket, socket.socket]) -> None:
    # discord.py replaces the socket on a reconnect; the new one often gets the old number.
    bot, discord = pair
    inbox, seen = reading(bot)
    number = bot.fileno()
    bot.close()
    inbox.drain_all()  # reading a closed socket: stop, do not raise
    assert not inbox.reading
    fresh = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        fresh.bind(("127.0.0.1", 0))
        fresh.setblocking(False)
        assert fresh.fileno() == number  # the case that matters: the same number
        assert inbox.read_from(fresh)
        discord.sendto(b"new", fresh.getsockname())
        await until(lambda: seen.data == [b"new"])
    finally:
        inbox.stop_reading()
        fresh.close()


async def test_stop_reading_leaves_datagrams_for_whoever_reads_next(
        pair: tuple[socket.socket, socket.socket]) -> None:
    bot, discord = pair
    inbox, seen = reading(bot)
    inbox.stop_reading()
    discord.send(b"discovery answer")
    await asyncio.sleep(0.05)
    assert seen.data == []
    assert bot.recv(64) == b"discovery answer"


class _NoSocketWatching(asyncio.SelectorEventLoop):
    """What Windows' proactor loop answers to add_reader."""

    def add_reader(self, *args: object) -> None:  # type: ignore[override]
        raise NotImplementedError


def test_a_loop_that_cannot_watch_sockets_leaves_it_to_the_reader_thread(
        pair: tuple[socket.socket, socket.socket]) -> None:
    bot, _discord = pair
    loop = _NoSocketWatching()
    try:
        inbox = DatagramInbox(Seen(), time.monotonic)
        inbox.bind(loop)
        assert not inbox.read_from(bot) and not inbox.reading
    finally:
        loop.close()
    blocking = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other = asyncio.new_event_loop()
    try:  # nor is a blocking socket read on a loop
        inbox = DatagramInbox(Seen(), time.monotonic)
        inbox.bind(other)
        assert not inbox.read_from(blocking)
    finally:
        blocking.close()
        other.close()


def test_the_reader_thread_reads_nothing_while_nobody_listens(
        pair: tuple[socket.socket, socket.socket]) -> None:
    # After IP discovery the listener reads the socket on the loop; a datagram the thread took
    # with no callback to give it to would be lost (it was: one frame in a simulated call).
    bot, discord = pair
    reader = _WakingSocketReader(SimpleNamespace(socket=bot), start_paused=False)  # type: ignore[arg-type]
    got: list[bytes] = []
    reader.register(got.append)  # running, as during IP discovery
    reader.start()
    try:
        discord.send(b"discovery answer")
        deadline = time.monotonic() + 2
        while not got and time.monotonic() < deadline:
            time.sleep(0.005)
        assert got == [b"discovery answer"]
        reader._callbacks.clear()  # as if unregistered while the thread sat in select
        discord.send(b"voice")
        time.sleep(0.1)
        assert bot.recv(64) == b"voice"
    finally:
        reader.stop()
        done = threading.Event()
        threading.Thread(target=lambda: (reader.join(2), done.set()), daemon=True).start()
        done.wait(3)


@pytest.mark.skipif(not os.path.exists("/proc/net/udp"), reason="kernel drop counts: Linux only")
async def test_datagrams_the_kernel_dropped_for_a_busy_loop_are_counted_and_said(
        pair: tuple[socket.socket, socket.socket]) -> None:
    # While the loop is busy the socket's buffer holds what arrives; past it the kernel drops
    # datagrams. They cannot be had back, but /transcribe status says how many.
    bot, discord = pair
    inbox, _seen = reading(bot)
    bot.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the smallest the kernel allows
    for _ in range(200):  # no await: the loop is "busy" and reads nothing meanwhile
        discord.send(bytes(300))
    dropped = inbox.socket_dropped
    assert dropped > 0
    inbox.drain_all()
    inbox.stop_reading()
    assert inbox.socket_dropped == dropped  # kept once the socket is no longer read
    counters = ReceiveCounters(socket_dropped=dropped)
    assert f"{dropped:,} lost to a full socket buffer" in counters.summary()


async def test_closing_the_listener_hands_on_what_the_socket_already_received(
        pair: tuple[socket.socket, socket.socket]) -> None:
    # A meeting's stop drains the listener first: what Discord delivered before the stop is
    # heard, also when it still waits in the socket because the loop was busy.
    bot, discord = pair
    receiver = VoiceReceiver(sample_rate=16000, on_audio=lambda _u, _p: None,
                             on_idle=lambda _u: None, is_ignored=lambda _u: False)
    listener = VoiceListener(receiver)
    listener.inbox.bind(asyncio.get_running_loop())
    assert listener.inbox.read_from(bot)
    for i in range(5):  # no await: no loop step reads them before the close
        discord.send(bytes(12) + bytes([i]))
    await listener.aclose()
    assert receiver.counters().received == 5
    assert not listener.inbox.reading
