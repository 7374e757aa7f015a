"""How a session writes its audio-chunk frames: in the call that queues the audio when nothing
is ahead of it, never out of order, and with backpressure when the socket is full. Against the
loopback cantonese.ai fake (a real python-socketio server)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import numpy as np
import pytest

from bot.sim.stt_server import FakeSttServer, SidRecord
from bot.stt import protocol as p
from bot.stt.session import SttSession, _finish

RATE = 16000
KEY = "test-key"
_NOISE = (np.random.default_rng(3).standard_normal(RATE // 10) * 3000).astype("<i2").tobytes()


def tagged(n: int) -> bytes:
    """100 ms of loud noise whose first 4 bytes say ``n`` (the fake records them)."""
    return struct.pack("<I", n) + _NOISE[4:]


def order(record: SidRecord) -> list[int]:
    return [struct.unpack("<I", head)[0] for head in record.chunk_heads]


@pytest.fixture
async def server() -> AsyncIterator[FakeSttServer]:
    async with FakeSttServer(KEY) as fake:
        yield fake


@pytest.fixture
async def session(server: FakeSttServer) -> AsyncIterator[SttSession]:
    s = SttSession(url=server.url, api_key=KEY, sample_rate=RATE, speaker="alice",
                   on_event=lambda _e: None, connect_timeout=5.0, start_timeout=5.0,
                   stop_timeout=20.0)
    await s.start()
    yield s
    await s.aclose()


async def arrived(server: FakeSttServer, n: int) -> SidRecord:
    (record,) = server.records.values()
    async with asyncio.timeout(10):
        while record.chunks < n:  # noqa: ASYNC110 - the fake has no event per chunk
            await asyncio.sleep(0.01)
    return record


async def test_audio_goes_out_in_the_call_that_queues_it(
        server: FakeSttServer, session: SttSession) -> None:
    # No task step per chunk: the frame is written before send_audio returns.
    session.send_audio(tagged(1))
    assert session.stats.chunks_sent == session.stats.chunks_direct == 1
    session.send_audio(tagged(2))
    assert session.stats.chunks_sent == 2
    assert order(await arrived(server, 2)) == [1, 2]


async def test_a_chunk_still_in_socketios_queue_is_not_overtaken_by_the_next(
        server: FakeSttServer, session: SttSession) -> None:
    # A chunk that went through python-socketio's emit (as any does when the direct path is
    # not free) sits in python-engineio's queue. One loop step later its write task has taken
    # it off the queue but not written it yet: the queue is empty, and a frame written now
    # would overtake it. The next chunk must wait its turn.
    link = session.link
    assert link is not None
    await link.client.emit(p.AUDIO_CHUNK, p.audio_chunk(tagged(1), RATE))
    await asyncio.sleep(0)
    await link.send_audio(tagged(2), RATE)
    assert order(await arrived(server, 2)) == [1, 2]


async def test_a_burst_bigger_than_the_socket_buffers_arrives_whole_and_in_order(
        server: FakeSttServer, session: SttSession) -> None:
    # A re-send or a replay at full speed queues far more than the socket takes at once. The
    # writes in the queuing call stop where the socket is full; the sender task goes on once
    # it has drained, and nothing is lost, doubled or reordered.
    link = session.link
    assert link is not None
    sock = link.client.eio.ws.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    burst = 400
    for n in range(burst):
        session.send_audio(tagged(n))
    assert 0 < session.stats.chunks_sent < burst  # the socket pushed back
    record = await arrived(server, burst)
    assert order(record) == list(range(burst))
    await session.stop()
    assert session.stats.chunks_sent == burst and record.chunks == burst


async def test_drain_lets_other_tasks_run_even_when_the_socket_took_everything(
        server: FakeSttServer, session: SttSession) -> None:
    # A producer faster than real time loops on drain(). While the socket takes each chunk in
    # the call that queues it nothing is unsent, and drain must still step the loop: that is
    # where the server's transcripts and pings are read.
    other_task_ran = asyncio.Event()
    asyncio.get_running_loop().call_soon(other_task_ran.set)
    session.send_audio(tagged(1))
    assert session.core.unsent_samples == 0  # written in the call
    await session.drain(2.0)
    assert other_task_ran.is_set()


# -- finishing a write that was started by hand ---------------------------------------------


async def test_a_coroutine_started_by_hand_is_finished_where_it_waited() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[str] = loop.create_future()
    steps: list[str] = []

    async def write() -> str:
        steps.append("written")
        steps.append(await gate)
        return "done"

    coro = write()
    waiting_on = coro.send(None)  # runs to its first real wait
    assert steps == ["written"] and waiting_on is gate
    finishing = asyncio.ensure_future(_finish(coro, waiting_on))
    await asyncio.sleep(0)
    assert not finishing.done()
    gate.set_result("drained")
    assert await finishing == "done"
    assert steps == ["written", "drained"]


async def test_its_error_and_its_cancellation_reach_the_coroutine() -> None:
    loop = asyncio.get_running_loop()

    async def write(gate: asyncio.Future[None], seen: list[BaseException]) -> None:
        try:
            await gate
        except BaseException as exc:
            seen.append(exc)
            raise

    failing: asyncio.Future[None] = loop.create_future()
    seen: list[BaseException] = []
    coro = write(failing, seen)
    finishing = asyncio.ensure_future(_finish(coro, coro.send(None)))
    failing.set_exception(ConnectionResetError("peer gone"))
    with pytest.raises(ConnectionResetError):
        await finishing
    assert isinstance(seen[0], ConnectionResetError)

    hanging: asyncio.Future[None] = loop.create_future()
    seen = []
    coro = write(hanging, seen)
    finishing = asyncio.ensure_future(_finish(coro, coro.send(None)))
    await asyncio.sleep(0)
    finishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await finishing
    assert isinstance(seen[0], asyncio.CancelledError) and hanging.cancelled()
