"""The capacity guard (``stt.max_sessions``): slots in arrival order, waiting speakers keep their
audio and are transcribed when a slot frees, against the loopback cantonese.ai fake."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bot.config import Secret, SttConfig
from bot.pipeline import SessionSlots, SpeakerStream, Transcriber
from bot.sim.stt_server import FakeSttServer
from bot.sim.tonecode import speech_track
from bot.stt.session import SegmentCommitted, StateChanged, SttEvent, SttState

RATE = 16000
KEY = "test-key"
#: Bound on each test (seconds).
TEST_TIMEOUT = 30.0


async def test_slots_are_given_in_arrival_order_and_handed_straight_to_the_next() -> None:
    slots = SessionSlots(2)
    await slots.acquire()
    await slots.acquire()
    assert slots.would_wait() and slots.in_use == 2
    order: list[str] = []

    async def wait(name: str) -> None:
        await slots.acquire()
        order.append(name)

    tasks = [asyncio.create_task(wait(n), name=f"waiter-{n}") for n in ("a", "b", "c")]
    await asyncio.sleep(0)
    assert slots.waiting == 3
    tasks[1].cancel()  # b gives up its place
    slots.release()
    slots.release()
    async with asyncio.timeout(TEST_TIMEOUT):
        await asyncio.gather(*tasks, return_exceptions=True)
    assert order == ["a", "c"]
    assert slots.in_use == 2 and slots.waiting == 0
    slots.release()
    slots.release()
    assert slots.in_use == 0 and not slots.would_wait()
    with pytest.raises(RuntimeError):
        slots.release()
    with pytest.raises(ValueError):
        SessionSlots(0)


async def test_a_waiter_cancelled_as_the_slot_arrives_passes_the_slot_on() -> None:
    slots = SessionSlots(1)
    await slots.acquire()
    first = asyncio.create_task(slots.acquire(), name="first")
    second = asyncio.create_task(slots.acquire(), name="second")
    await asyncio.sleep(0)
    slots.release()  # hands the slot to `first` ...
    first.cancel()  # ... which is cancelled before it runs
    async with asyncio.timeout(TEST_TIMEOUT):
        with pytest.raises(asyncio.CancelledError):
            await first
        await second
    assert slots.in_use == 1 and slots.waiting == 0


def pcm_of(text: str) -> np.ndarray:
    track = speech_track([(0.3, text)], RATE, None)
    return np.round(track * 32767).astype(np.int16)


async def test_past_max_sessions_a_speaker_waits_in_turn_and_is_still_transcribed() -> None:
    events: list[SttEvent] = []
    waits: list[tuple[str, int]] = []
    async with asyncio.timeout(TEST_TIMEOUT), FakeSttServer(KEY) as server:
        config = SttConfig(url=server.url, api_key=Secret(KEY), max_sessions=1)

        def on_wait(stream: SpeakerStream, position: int) -> None:
            waits.append((stream.speaker, position))

        transcriber = Transcriber(config, events.append, on_wait=on_wait)
        try:
            streams = {}
            starts = []
            for name, text in (("alice", "大家好"), ("bob", "預算OK"), ("carol", "今日開會")):
                stream = transcriber.open(name, speaker=name, in_rate=RATE)
                streams[name] = stream
                starts.append(asyncio.create_task(stream.start(), name=f"start-{name}"))
                await asyncio.sleep(0)
                stream.feed_converted(pcm_of(text))  # waiting speakers' audio is kept
            await starts[0]
            assert transcriber.slots.in_use == 1 and transcriber.slots.waiting == 2
            assert streams["bob"].waiting_for_slot and streams["carol"].waiting_for_slot
            # Finishing everyone: alice's slot passes to bob, then to carol, in that order.
            await transcriber.finish_all()
            await asyncio.gather(*starts)
        finally:
            await transcriber.aclose()
    assert waits == [("bob", 1), ("carol", 2)]
    lines = [(e.segment.speaker, e.segment.text) for e in events
             if isinstance(e, SegmentCommitted)]
    assert lines == [("alice", "大家好"), ("bob", "預算OK"), ("carol", "今日開會")]
    streaming = [e.speaker for e in events
                 if isinstance(e, StateChanged) and e.state is SttState.STREAMING]
    closed = [e.speaker for e in events
              if isinstance(e, StateChanged) and e.state is SttState.CLOSED]
    assert streaming == closed == ["alice", "bob", "carol"]
    # Never two sessions at once: each starts only after the one before it closed.
    states = [(e.speaker, e.state) for e in events if isinstance(e, StateChanged)
              and e.state in (SttState.STREAMING, SttState.CLOSED)]
    assert states == [(n, s) for n in ("alice", "bob", "carol")
                      for s in (SttState.STREAMING, SttState.CLOSED)]
    assert transcriber.slots.in_use == 0


async def test_closing_a_speaker_who_waits_gives_up_the_place_without_sending() -> None:
    events: list[SttEvent] = []
    async with asyncio.timeout(TEST_TIMEOUT), FakeSttServer(KEY) as server:
        config = SttConfig(url=server.url, api_key=Secret(KEY), max_sessions=1)
        transcriber = Transcriber(config, events.append)
        try:
            alice = transcriber.open("alice", speaker="alice", in_rate=RATE)
            await alice.start()
            bob = transcriber.open("bob", speaker="bob", in_rate=RATE)
            bob_start = asyncio.create_task(bob.start(), name="start-bob")
            await asyncio.sleep(0)
            bob.feed_converted(pcm_of("預算OK"))
            assert bob.waiting_for_slot
            await transcriber.discard("bob")  # e.g. bob opted out while waiting
            await bob_start
            assert transcriber.slots.waiting == 0 and transcriber.slots.in_use == 1
            alice.feed_converted(pcm_of("大家好"))
            await transcriber.finish_all()
        finally:
            await transcriber.aclose()
    texts = [e.segment.text for e in events if isinstance(e, SegmentCommitted)]
    assert texts == ["大家好"]
    assert server.committed_texts == ["大家好"] and len(server.records) == 1  # bob never connected
    assert transcriber.slots.in_use == 0
